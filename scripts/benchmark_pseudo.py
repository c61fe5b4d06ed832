"""Seed and pseudo-mask quality of every attribution method on the built-in synthetic data, from
one trained classifier, plus the pseudo stage's throughput and peak memory.

    .venv/bin/python scripts/benchmark_pseudo.py quality --run checkpoints/default [--images 200]
    .venv/bin/python scripts/benchmark_pseudo.py speed --run checkpoints/default --images 200 [--scales 4]

quality: for each method / layer set, seed mIoU at the fixed threshold (pseudo.threshold), mIoU
with thresholds calibrated by each objective (no pixel labels), and the oracle: the best single
fixed threshold found with the ground truth (for reference only). Labels come from
wsss.pseudo.labels.scores_to_labels with no ignore band, so the columns compare thresholds only.
speed: runs the real make-pseudo-masks stage into a scratch run directory and prints images/s
and the peak RSS, for 1 scale or 4 scales + flip.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from wsss import pipeline
from wsss.config import load_config
from wsss.data.datamodule import build_source, make_loader
from wsss.metrics import IoUMeter
from wsss.models.classifier import ClassifierModule
from wsss.pseudo.calibrate import ThresholdCalibrator
from wsss.pseudo.labels import scores_to_labels

VARIANTS = [  # (name, method, layers, preset)
    ("Relevance-CAM default, layer2", "relevance", ["layer2"], "default"),
    ("Relevance-CAM default, layer3", "relevance", ["layer3"], "default"),
    ("Relevance-CAM default, layer4", "relevance", ["layer4"], "default"),
    ("Relevance-CAM default, fused 2-4", "relevance", ["layer2", "layer3", "layer4"], "default"),
    ("Relevance-CAM reference, layer4", "relevance", ["layer4"], "reference"),
    ("Relevance-CAM reference, fused 2-4", "relevance", ["layer2", "layer3", "layer4"], "reference"),
    ("Grad-CAM, layer4", "gradcam", ["layer4"], None),
    ("Grad-CAM, fused 2-4", "gradcam", ["layer2", "layer3", "layer4"], None),
    ("Grad-CAM++, layer4", "gradcampp", ["layer4"], None),
    ("LIFT-CAM, layer4", "liftcam", ["layer4"], None),
]
ORACLE_GRID = [round(0.05 * i, 2) for i in range(1, 20)]
OBJECTIVES = ("increase", "keep_delete", "area")


def miou(fused_batches, thresholds_of, num_classes) -> float:
    meter = IoUMeter(num_classes)
    for maps, targets, valid, masks in fused_batches:
        labels = scores_to_labels(maps, targets + 1, valid, thresholds_of(targets), 0.0)
        meter.update(labels.long(), masks)
    return meter.compute()["miou"]


def quality(args) -> None:
    cfg = load_config(Path(args.run) / "config.yaml", [f"data.num_workers=0"])
    classifier = pipeline.load_classifier(cfg)
    mean, std = classifier.hparams.mean, classifier.hparams.std
    dataset = build_source(cfg, cfg.data.train_split, mean=mean, std=std)
    subset = Subset(dataset, list(range(min(args.images, len(dataset)))))
    calib = Subset(dataset, list(range(len(dataset) - min(args.calibration_images, len(dataset)), len(dataset))))
    num_fg = len(classifier.hparams.class_names)
    rows = []
    for name, method, layers, preset in VARIANTS:
        run_cfg = dataclasses.replace(cfg, cam=dataclasses.replace(cfg.cam, method=method, layers=layers,
                                                                   preset=preset or cfg.cam.preset,
                                                                   layer_weights=None))
        module = pipeline._pseudo_module(run_cfg, classifier)
        started = time.perf_counter()
        batches = []
        for batch in make_loader(subset, run_cfg, run_cfg.cam.batch_size, shuffle=False):
            out = module.fused_maps(batch["image"], batch["labels"])
            batches.append((out["fused"], out["targets"], out["valid"], batch["mask"]))
        seconds = time.perf_counter() - started
        fixed = miou(batches, lambda t: cfg.pseudo.threshold, num_fg + 1)
        oracle = max((miou(batches, lambda t, v=v: v, num_fg + 1), v) for v in ORACLE_GRID)
        calibrated = {}
        for objective in OBJECTIVES:
            calibrator = ThresholdCalibrator(cfg.pseudo.grid, objective, cfg.pseudo.rho, num_fg, cfg.pseudo.threshold)
            for batch in make_loader(calib, run_cfg, run_cfg.cam.batch_size, shuffle=False):
                out = module.fused_maps(batch["image"], batch["labels"])
                calibrator.update(module.model, batch["image"], out["fused"], out["targets"], out["valid"])
            per_class = calibrator.compute()
            calibrated[objective] = miou(batches, lambda t, pc=per_class: pc[t], num_fg + 1)
        rows.append((name, fixed, calibrated, oracle, len(subset) / seconds))
        print(f"{name}: seed {fixed:.3f} calibrated {calibrated} oracle {oracle}", file=sys.stderr)
    header = " | ".join(f"calibrated {o}" for o in OBJECTIVES)
    print(f"| method | seed mIoU (τ={cfg.pseudo.threshold}) | {header} | oracle mIoU (τ) | maps img/s |")
    print("|---|---|" + "---|" * len(OBJECTIVES) + "---|---|")
    for name, fixed, calibrated, (best, tau), speed in rows:
        cells = " | ".join(f"{100 * calibrated[o]:.1f}" for o in OBJECTIVES)
        print(f"| {name} | {100 * fixed:.1f} | {cells} | {100 * best:.1f} ({tau}) | {speed:.1f} |")


def speed(args) -> None:
    source = Path(args.run)
    scratch = Path(args.scratch) / f"speed_{args.images}_{args.scales}"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(source / "classifier", scratch / "classifier")
    scales = "[1.0]" if args.scales == 1 else "[0.5, 1.0, 1.5, 2.0]"
    flip = "false" if args.scales == 1 else "true"
    cfg = load_config(source / "config.yaml", [
        f"run.dir={scratch.parent}", f"run.name={scratch.name}", f"data.num_train={args.images}",
        f"cam.scales={scales}", f"cam.flip={flip}", "pseudo.calibration=fixed", "logger.kind=none",
        "run.overwrite=false"])
    # the classifier was trained on the source run's data size; reuse its record as-is
    record = pipeline.read_json(source / "classifier" / "stage.json")
    record["config_hash"] = pipeline.stage_hashes(cfg)["classifier"]
    pipeline.write_json_atomic(scratch / "classifier" / "stage.json", record)
    started = time.perf_counter()
    result = pipeline.make_pseudo_masks(cfg)
    total = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {args.images} | {args.scales} scale(s){' + flip' if flip == 'true' else ''} | "
          f"{result['images_per_second']:.1f} | {total:.1f} | {peak:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["quality", "speed"])
    parser.add_argument("--run", default="checkpoints/default")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--scales", type=int, default=1, choices=[1, 4])
    parser.add_argument("--scratch", default="/tmp/wsss_bench")
    parser.add_argument("--calibration-images", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    quality(args) if args.mode == "quality" else speed(args)


if __name__ == "__main__":
    main()
