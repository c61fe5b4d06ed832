"""The quality floor: figures of two reference runs, recorded in quality_floor.json, that a run's
report.json may not fall below by more than the recorded margin. test_pipeline checks the tiny
test run against it, `.ci/run` the CI run:

    python tests/quality_floor.py ci RUN_DIR/default/report.json           # check
    python tests/quality_floor.py ci RUN_DIR/default/report.json --record  # refresh the figures

Refresh only after a change meant to move the figures (say why in the commit); a figure above
its floor passes, so an improvement needs a refresh to be protected.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

FLOOR_FILE = Path(__file__).with_name("quality_floor.json")


def read_floor() -> dict[str, Any]:
    return json.loads(FLOOR_FILE.read_text())


def shortfalls(run: str, report: dict[str, Any]) -> list[str]:
    """One line for each recorded figure of ``run`` that ``report`` misses or falls more than
    the margin below; an empty list when the report clears the floor."""
    floor = read_floor()
    margin = floor["margin"]
    problems = []
    for key, recorded in floor["runs"][run]["figures"].items():
        value = report.get(key)
        if value is None:
            problems.append(f"{key}: missing from the report (recorded {recorded:.4f})")
        elif value < recorded - margin:
            problems.append(
                f"{key}: {value:.4f} is more than {margin} below the recorded {recorded:.4f}"
            )
    return problems


def record(run: str, report: dict[str, Any]) -> None:
    """Write ``report``'s figures as the new reference of ``run``."""
    floor = read_floor()
    figures = floor["runs"][run]["figures"]
    floor["runs"][run]["figures"] = {key: round(float(report[key]), 4) for key in figures}
    FLOOR_FILE.write_text(json.dumps(floor, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the reference run in quality_floor.json (tiny, ci)")
    parser.add_argument("report", type=Path, help="the run's report.json")
    parser.add_argument(
        "--record", action="store_true", help="store the report's figures as the reference"
    )
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    if args.record:
        record(args.run, report)
        print(f"quality floor: {args.run} figures recorded in {FLOOR_FILE}")
        return 0
    problems = shortfalls(args.run, report)
    for line in problems:
        print(f"quality floor ({args.run}): {line}", file=sys.stderr)
    if not problems:
        print(
            f"quality floor ({args.run}): every figure within {read_floor()['margin']} of the recorded value"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
