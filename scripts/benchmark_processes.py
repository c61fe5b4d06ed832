"""Pseudo-mask stage throughput with 1 and 2 DDP processes (CPU: gloo), and whether both write
the same masks. Trains one classifier, then runs `wsss make-pseudo-masks` on copies of the run.

    python scripts/benchmark_processes.py --out /tmp/bench_ddp            # default data, CPU
    python scripts/benchmark_processes.py --out /tmp/bench_ddp --set data.num_train=200

Prints a markdown table: processes, images per second (the stage's own figure: predict only,
calibration excluded), the stage's wall seconds, each process's share, and identical masks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wsss(command: str, run_dir: Path, extra: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "wsss.cli",
            command,
            "configs/default.yaml",
            f"run.dir={run_dir}",
            "logger.kind=none",
            "trainer.accelerator=cpu",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        check=True,
    )
    return time.perf_counter() - started


def digest(directory: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(directory.glob("*.png")):
        sha.update(path.name.encode() + path.read_bytes())
    return sha.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every command")
    args = parser.parse_args()
    base = args.out / "one"
    if not (base / "default" / "classifier" / "stage.json").is_file():
        wsss("train-classifier", base, ["trainer.devices=1", *args.set])
    rows = []
    digests = {}
    for processes in (1, 2):
        run = args.out / f"processes{processes}"
        if run.exists():
            shutil.rmtree(run)
        shutil.copytree(base, run)
        strategy = ["trainer.strategy=ddp"] if processes > 1 else []
        seconds = wsss(
            "make-pseudo-masks", run, [f"trainer.devices={processes}", *strategy, *args.set]
        )
        record = json.loads((run / "default" / "pseudo_masks" / "stage.json").read_text())
        digests[processes] = digest(run / "default" / "pseudo_masks")
        rows.append(
            (processes, record["images_per_second"], round(seconds, 1), record["rank_counts"])
        )
    print(
        "\n| processes | images / s (predict) | stage wall s (with calibration, start-up) "
        "| images per process |"
    )
    print("|---|---|---|---|")
    for processes, rate, seconds, shares in rows:
        print(f"| {processes} | {rate} | {seconds} | {shares} |")
    print(f"\nmasks identical with 1 and 2 processes: {digests[1] == digests[2]}")


if __name__ == "__main__":
    main()
