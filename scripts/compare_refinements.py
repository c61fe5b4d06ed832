"""The refinement table: seeds -> masks -> segmenter for each ``pseudo.refine`` value, against
the same segmenter trained on ground truth. Every figure comes from the runs' report.json.

    python scripts/compare_refinements.py --config configs/default.yaml --out checkpoints/refine
    python scripts/compare_refinements.py --config configs/synthetic_voc.yaml --out checkpoints/refine_voc \\
        --set data.root=data/synthetic_voc/VOCdevkit/VOC2012

1. ``<out>/none``: the whole pipeline with ``pseudo.refine=none`` (trains the classifier);
2. ``<out>/ground_truth``: the ``none`` run's classifier and pseudo-masks copied in, then the
   pipeline with ``segmenter.masks=ground_truth`` (only the segmenter and evaluation run);
3. ``<out>/<method>`` for each other method: the ``none`` run's classifier copied in, then the
   whole pipeline with ``pseudo.refine=<method>`` (stages already done are skipped).
Every run names ``<out>/ground_truth`` as ``run.reference``, so its report.md shows the ratio.

Runs that finished before are reused (every stage resumes), so an interrupted table continues.
Prints a markdown table: seed / calibrated / refined mask mIoU, segmenter mIoU, segmenter ÷
ground truth, and the refinement's cost per training image: the pseudo-mask and affinity stages'
seconds minus the ``none`` run's pseudo-mask seconds, over the training images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("none", "crf", "par", "affinity")


def wsss(command: str, config: str, out: Path, name: str, extra: list[str]) -> float:
    """One ``wsss`` subcommand on run ``out/name``; returns its wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "wsss.cli",
            command,
            config,
            f"run.dir={out}",
            f"run.name={name}",
            *extra,
        ],
        cwd=ROOT,
        env=env,
        check=True,
    )
    return time.perf_counter() - started


def report(out: Path, name: str) -> dict:
    return json.loads((out / name / "report.json").read_text())


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for every run")
    args = parser.parse_args()
    out = args.out.resolve()
    walls: dict[str, float] = {}
    reference = out / "ground_truth"
    common = [f"run.reference={reference}", *args.set]
    walls["none"] = wsss("run", args.config, out, "none", ["pseudo.refine=none", *common])
    for stage in ("classifier", "pseudo_masks"):
        if not (reference / stage).exists():
            shutil.copytree(out / "none" / stage, reference / stage)
    walls["ground_truth"] = wsss(
        "run",
        args.config,
        out,
        "ground_truth",
        ["pseudo.refine=none", "segmenter.masks=ground_truth", *common],
    )
    walls["none"] += wsss(
        "run", args.config, out, "none", ["pseudo.refine=none", *common]
    )  # report with the ratio
    gt_miou = report(out, "ground_truth")["seg_miou"]
    gt_dice = foreground_dice(report(out, "ground_truth"), "per_class_dice")
    for method in args.methods:
        if method == "none":
            continue
        classifier = out / method / "classifier"
        if not classifier.exists():
            shutil.copytree(out / "none" / "classifier", classifier)
        walls[method] = wsss("run", args.config, out, method, [f"pseudo.refine={method}", *common])
    base = report(out, "none")
    images = None
    rows = []
    for method in args.methods:
        r = report(out, method)
        seconds = r["stage_seconds"]
        images = images or _train_images(out / method)
        extra = (
            (seconds.get("pseudo_masks") or 0)
            + (seconds.get("affinity") or 0)
            - (base["stage_seconds"].get("pseudo_masks") or 0)
        )
        refined = r.get("refined_miou") if method != "none" else None
        ratio = r["seg_miou"] / gt_miou if r.get("seg_miou") and gt_miou else None
        mask_dice = foreground_dice(
            r, "refined_per_class_dice" if refined is not None else "pseudo_per_class_dice"
        )
        seg_dice = foreground_dice(r, "per_class_dice")
        dice_ratio = seg_dice / gt_dice if seg_dice and gt_dice else None
        rows.append(
            f"| {method} | {_pct(r.get('seed_miou'))} | {_pct(r.get('pseudo_miou'))} | {_pct(refined)} | "
            f"{_pct(r.get('ignore_fraction'))} | {_pct(r.get('seg_miou'))} | "
            f"{'n/a' if ratio is None else f'{ratio:.2f}'} | {_pct(mask_dice)} | {_pct(seg_dice)} | "
            f"{'n/a' if dice_ratio is None else f'{dice_ratio:.2f}'} | "
            f"{'—' if method == 'none' else f'{extra / images:.3f}'} |"
        )
    print(
        f"\nground truth segmenter: mIoU {_pct(gt_miou)}, foreground Dice {_pct(gt_dice)}; {images} training "
        f"images; walls (s): { {k: round(v) for k, v in walls.items()} }\n"
    )
    print(
        "| pseudo.refine | seed mIoU | calibrated mIoU | refined mIoU | ignored px % | segmenter mIoU | "
        "segmenter ÷ ground truth | mask fg Dice | segmenter fg Dice | fg Dice ÷ ground truth | "
        "refinement s / image (CPU) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def foreground_dice(r: dict, key: str):
    """Mean Dice over the foreground classes (findings) that have a figure."""
    table = r.get(key) or {}
    values = [table[n] for n in (r.get("class_names") or [])[1:] if table.get(n) is not None]
    return sum(values) / len(values) if values else None


def _train_images(run: Path) -> int:
    manifest = json.loads((run / "pseudo_masks" / "manifest.json").read_text())
    return int(manifest["count"])


if __name__ == "__main__":
    main()
