"""Compare two finished run directories file by file: the proof that a refactor changed nothing.

    python scripts/compare_runs.py checkpoints/before/default checkpoints/after/default

Every mask, seed, prediction and saved map (``*.png``, ``*.npz``) must be byte-identical, and
``report.json`` and each ``stage.json`` must be equal once the keys that measure the machine
rather than the method are dropped (wall-clock seconds, images per second) and the run
directory's own path is written the same way in both. Exits 1 and lists every difference otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

# keys whose values depend on the machine's load or on where the run lives, not on the method
VOLATILE_KEYS = {
    "seconds",
    "stage_seconds",
    "images_per_second",
    "seconds_per_image",
    "panels",
    "wandb_runs",
    "run_dir",
    "library_seconds",
}
COMPARED_SUFFIXES = (".png", ".npz")
SKIPPED_PARTS = {
    "wandb",
    "logs",
    ".calibration",
}  # tracker files and scratch space hold ids and times


def without_volatile(value: Any, root: Path) -> Any:
    """The JSON value with every volatile key removed, at any depth, and the run directory's
    own path written as ``<run>`` (a run records where its masks lie)."""
    if isinstance(value, dict):
        return {k: without_volatile(v, root) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [without_volatile(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(str(root.resolve()), "<run>").replace(str(root), "<run>")
    return value


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compared_files(root: Path) -> dict[str, Path]:
    """Output files under a run directory, by relative path."""
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if not path.is_file() or SKIPPED_PARTS & set(relative.parts):
            continue
        if path.suffix in COMPARED_SUFFIXES or path.name in (
            "report.json",
            "stage.json",
            "manifest.json",
        ):
            files[str(relative)] = path
    return files


def differences(before: Path, after: Path) -> list[str]:
    """Every way the two run directories differ, one line each."""
    left, right = compared_files(before), compared_files(after)
    problems = [f"only in {before}: {name}" for name in sorted(set(left) - set(right))]
    problems += [f"only in {after}: {name}" for name in sorted(set(right) - set(left))]
    for name in sorted(set(left) & set(right)):
        if name.endswith(".json"):
            a = without_volatile(json.loads(left[name].read_text()), before)
            b = without_volatile(json.loads(right[name].read_text()), after)
            if a != b:
                keys = (
                    sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                    if isinstance(a, dict)
                    else []
                )
                problems.append(f"{name}: differs in {keys or 'content'}")
        elif digest(left[name]) != digest(right[name]):
            problems.append(f"{name}: bytes differ")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "before", type=Path, help="finished run directory (e.g. checkpoints/default)"
    )
    parser.add_argument("after", type=Path, help="the run directory to compare with it")
    args = parser.parse_args(argv)
    for root in (args.before, args.after):
        if not (root / "report.json").is_file():
            parser.error(f"{root} holds no report.json: pass a finished run directory")
    problems = differences(args.before, args.after)
    count = len(compared_files(args.before))
    if problems:
        print("\n".join(problems))
        print(f"{len(problems)} differences over {count} compared files")
        return 1
    print(f"identical: {count} files (masks byte for byte, JSON without timing keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
