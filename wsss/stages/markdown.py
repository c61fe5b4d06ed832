"""The report's markdown pieces shared by report.md's sections: a figure as a percentage, and a
per-class table."""

from __future__ import annotations

from typing import Any, Optional, Sequence


def percent(value: Any) -> str:
    """A 0-1 figure as a percentage with one decimal; ``n/a`` for a missing or NaN figure."""
    return "n/a" if not isinstance(value, (int, float)) or value != value else f"{100 * value:.1f}"


def class_table(names: Sequence[str], columns: Sequence[tuple[str, Optional[dict]]]) -> list[str]:
    """A markdown table: one row per class name, one column per (title, {class: figure})."""
    lines = [
        "| class | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    return lines + [
        f"| {name} | " + " | ".join(percent((table or {}).get(name)) for _, table in columns) + " |"
        for name in names
    ]
