"""Seed and pseudo-mask quality of every attribution method on the built-in synthetic data, from
one trained classifier, plus the pseudo stage's throughput and peak memory.

    .venv/bin/python scripts/benchmark_pseudo.py quality --run checkpoints/default [--images 200]
    .venv/bin/python scripts/benchmark_pseudo.py speed --run checkpoints/default --images 200 [--scales 4]

quality: for each method, map normalisation and layer (alone and fused), seed mIoU at the fixed
threshold (pseudo.threshold), mIoU with per-class thresholds calibrated by each objective on other
training images (no pixel labels; one set of masked queries feeds all objectives), and the oracle:
the best single fixed threshold found with the ground truth (for reference only). Labels come from
wsss.pseudo.labels.scores_to_labels with no ignore band, so the columns compare thresholds only.
Libra-CAM (cam.method=libra) uses a reference library built first from the whole training split
(--references per class, scores below --bound). For every group that computes three layers, the
"libra-filter" view fuses them with Libra's reference filter instead of the mean (the classifier
chooses among its own layers): keep the layers whose map, multiplied into the image, raises the
class's sigmoid score (official keep rule), then average. Cost columns: images through the
classifier per image (masked copies included, backward passes and LRP sweeps not; the
"libra-filter" view adds 3 per present class) and map images per second.
speed: runs the real make-pseudo-masks stage (fixed threshold, so calibration is not timed) into
a scratch run directory and prints a table row: images/s of the predict loop, the stage's seconds
(predict + scoring), and the peak RSS of the main process and of the largest data-loader worker,
for 1 scale or 4 scales + flip. Run each row in its own process.
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

from wsss import stages
from wsss.cam import LibrarySettings, build_library, relu_max_normalize
from wsss.cam.libra import filter_and_average
from wsss.cam.methods import method_title
from wsss.config import load_config
from wsss.data.datamodule import build_source, make_loader
from wsss.io import read_json, write_json_atomic
from wsss.metrics import ForwardCounter, SegmentationScores
from wsss.pseudo.calibrate import ThresholdCalibrator, masked_confidences
from wsss.pseudo.labels import scores_to_labels
from wsss.stages import pseudo_masks as pseudo_stage
from wsss.stages import records as stage_records

ALL_LAYERS = ["layer2", "layer3", "layer4"]
GROUPS = [  # (name, method, preset, normalisation, layers reported alone, layers computed)
    (
        method_title("relevance", "default"),
        "relevance",
        "default",
        "centred",
        ALL_LAYERS,
        ALL_LAYERS,
    ),
    (
        method_title("relevance", "reference"),
        "relevance",
        "reference",
        "centred",
        ALL_LAYERS,
        ALL_LAYERS,
    ),
    (
        method_title("relevance", "default"),
        "relevance",
        "default",
        "relu_max",
        ["layer4"],
        ALL_LAYERS,
    ),
    (
        method_title("relevance", "reference"),
        "relevance",
        "reference",
        "minmax",
        ["layer4"],
        ALL_LAYERS,
    ),
    (
        method_title("relevance", "attnlrp"),
        "relevance",
        "attnlrp",
        "centred",
        ALL_LAYERS,
        ALL_LAYERS,
    ),
    (
        method_title("relevance", "default, position weights"),
        "relevance",
        "default",
        "centred",
        ALL_LAYERS,
        ALL_LAYERS,
    ),
    (
        method_title("relevance", "attnlrp, position weights"),
        "relevance",
        "attnlrp",
        "centred",
        ALL_LAYERS,
        ALL_LAYERS,
    ),
    (method_title("gradcam"), "gradcam", None, "centred", ALL_LAYERS, ALL_LAYERS),
    (method_title("gradcam"), "gradcam", None, "relu_max", ["layer4"], ALL_LAYERS),
    (method_title("gradcampp"), "gradcampp", None, "centred", ["layer4"], ALL_LAYERS),
    (method_title("gradcampp"), "gradcampp", None, "relu_max", ["layer4"], ALL_LAYERS),
    (method_title("liftcam"), "liftcam", None, "centred", ["layer4"], ["layer4"]),
    (method_title("liftcam"), "liftcam", None, "relu_max", ["layer4"], ["layer4"]),
    (method_title("libra"), "libra", None, "centred", ALL_LAYERS, ALL_LAYERS),
    (method_title("libra"), "libra", None, "minmax", ["layer4"], ["layer4"]),
]
# RelevanceCAM options a group sets beyond its preset (by group name)
GROUP_OPTIONS = {
    method_title("relevance", "default, position weights"): {"weights": "position"},
    method_title("relevance", "attnlrp, position weights"): {"weights": "position"},
}
ORACLE_GRID = [round(0.05 * i, 2) for i in range(1, 20)]
OBJECTIVES = ("increase", "keep_delete", "area", "delete")


def miou(batches, thresholds_of, num_classes) -> float:
    meter = SegmentationScores(num_classes)
    for maps, targets, valid, masks in batches:
        labels = scores_to_labels(maps, targets + 1, valid, thresholds_of(targets), 0.0)
        meter.update(labels.long(), masks)
    return meter.compute()["miou"]


def collect(module, dataset, cfg) -> tuple[list, float, float]:
    """Per batch: ({'layer2': ..., 'fused': ...} maps, targets, valid, masks, images), seconds and
    images through the classifier per image."""
    started = time.perf_counter()
    out = []
    with ForwardCounter(module.model) as counter:
        for batch in make_loader(dataset, cfg, cfg.cam.batch_size, shuffle=False):
            maps = module.fused_maps(batch["image"], batch["labels"], batch["size"])
            views = {**maps["layers"], "fused": maps["fused"]}
            out.append((views, maps["targets"], maps["valid"], batch["mask"], batch["image"]))
    return out, time.perf_counter() - started, counter.images / len(dataset)


@torch.no_grad()
def add_filtered_view(model, collected: list, layers: list[str]) -> list[float]:
    """Adds the "libra-filter" view (layers kept by Libra's filter, averaged) to every batch;
    returns the fraction of present (image, class) pairs that kept each layer."""
    kept = torch.zeros(len(layers))
    pairs = 0
    for views, targets, valid, _, images in collected:
        candidates = torch.stack([views[layer] for layer in layers], 2)  # (B, K, L, H, W)
        base = model(images).float().sigmoid().gather(1, targets)
        slots = valid[..., None].expand(-1, -1, len(layers))
        mean, keep, _ = filter_and_average(
            model, images, candidates, targets, base, slots, "sigmoid"
        )
        views["libra-filter"] = relu_max_normalize(mean) * valid[:, :, None, None]
        kept += keep[valid].float().sum(0)
        pairs += int(valid.sum())
    return (kept / max(pairs, 1)).tolist()


def quality(args) -> None:
    run = Path(args.run)  # the run folder may have been moved or renamed since it was trained
    cfg = load_config(
        run / "config.yaml", ["data.num_workers=0", f"run.dir={run.parent}", f"run.name={run.name}"]
    )
    classifier = stages.load_classifier(cfg)
    mean, std = classifier.hparams.mean, classifier.hparams.std
    dataset = build_source(cfg, cfg.data.train_split, mean=mean, std=std)
    n_eval = min(args.images, len(dataset))
    evaluation = Subset(dataset, list(range(n_eval)))
    calibration = Subset(
        dataset,
        list(
            range(len(dataset) - min(args.calibration_images, len(dataset) - n_eval), len(dataset))
        ),
    )
    num_fg = len(classifier.hparams.class_names)
    p = cfg.pseudo
    groups = [g for g in GROUPS if args.groups is None or f"{g[0]} [{g[3]}]" in args.groups]
    all_layers = args.layers.split(",") if args.layers else ALL_LAYERS
    if args.layers:  # another backbone's layers (e.g. a ViT's blocks) in place of layer2-4

        def swap(layers: list[str]) -> list[str]:
            return all_layers if layers == ALL_LAYERS else [all_layers[-1]]

        groups = [(n, m, pre, norm, swap(a), swap(lay)) for n, m, pre, norm, a, lay in groups]
    library = None
    if any(group[1] == "libra" for group in groups):
        started = time.perf_counter()
        library = build_library(
            classifier.export().eval(),
            make_loader(dataset, cfg, cfg.cam.batch_size, shuffle=False),
            LibrarySettings(tuple(all_layers), args.references, args.bound),
            progress=True,
        )
        print(
            f"Libra-CAM library: {len(dataset)} training images, {time.perf_counter() - started:.1f} s, "
            f"references per class {library.counts.tolist()}",
            file=sys.stderr,
            flush=True,
        )
    print(
        f"classifier {classifier.hparams.backbone}; {n_eval} images scored, {len(calibration)} other "
        f"training images for calibration; grid {p.grid}; area rho {p.rho}; min_confidence "
        f"{args.min_confidence}; delete delta {p.delta}",
        file=sys.stderr,
    )
    rows = []
    for name, method, preset, normalize, alone, layers in groups:
        run_cfg = dataclasses.replace(
            cfg,
            cam=dataclasses.replace(
                cfg.cam,
                method=method,
                layers=layers,
                preset=preset or cfg.cam.preset,
                layer_weights=None,
                normalize=normalize,
            ),
        )
        module = pseudo_stage.pseudo_module(
            run_cfg, classifier, library=library if method == "libra" else None
        )
        module.options.update(GROUP_OPTIONS.get(name, {}))
        scored, seconds, forwards = collect(module, evaluation, run_cfg)
        queried, _, _ = collect(module, calibration, run_cfg)
        views = alone + (["fused"] if len(layers) > 1 else [])
        if layers == all_layers and normalize == "centred":
            kept = add_filtered_view(module.model, scored, layers)
            add_filtered_view(module.model, queried, layers)
            print(
                f"{name} [{normalize}] libra-filter keeps {dict(zip(layers, kept))} of present pairs",
                file=sys.stderr,
                flush=True,
            )
            views.append("libra-filter")
        for view in views:
            batches = [(v[view], t, ok, m) for v, t, ok, m, _ in scored]
            fixed = miou(batches, lambda t: p.threshold, num_fg + 1)
            oracle = max((miou(batches, lambda t, v=v: v, num_fg + 1), v) for v in ORACLE_GRID)
            calibrators = {
                o: ThresholdCalibrator(
                    p.grid,
                    o,
                    p.rho,
                    num_fg,
                    p.threshold,
                    min_confidence=args.min_confidence,
                    delta=p.delta,
                )
                for o in OBJECTIVES
            }
            for v, t, ok, _, images in queried:
                keep, delete, base = masked_confidences(
                    module.model, images, v[view], t, ok, p.grid, min_confidence=args.min_confidence
                )
                for calibrator in calibrators.values():
                    calibrator.update_from_confidences(keep, delete, base, t, ok)
            calibrated = {
                o: miou(batches, lambda t, pc=c.compute(): pc[t], num_fg + 1)
                for o, c in calibrators.items()
            }
            label = f"{name}, {view}"
            rows.append((label, normalize, fixed, calibrated, oracle, n_eval / seconds, forwards))
            print(
                f"{label} [{normalize}]: seed {fixed:.3f} calibrated {calibrated} oracle {oracle}",
                file=sys.stderr,
                flush=True,
            )
    header = " | ".join(f"calibrated {o}" for o in OBJECTIVES)
    print(
        f"| method, layer | normalisation | seed mIoU (τ={p.threshold}) | {header} | oracle mIoU (τ) | "
        f"area − oracle | delete − oracle | maps img/s | forwards per image |"
    )
    print("|---|---|---|" + "---|" * len(OBJECTIVES) + "---|---|---|---|---|")
    for label, normalize, fixed, calibrated, (best, tau), speed, forwards in rows:
        cells = " | ".join(f"{100 * calibrated[o]:.1f}" for o in OBJECTIVES)
        print(
            f"| {label} | {normalize} | {100 * fixed:.1f} | {cells} | {100 * best:.1f} ({tau}) | "
            f"{100 * (calibrated['area'] - best):+.1f} | {100 * (calibrated['delete'] - best):+.1f} | "
            f"{speed:.1f} | {forwards:.1f} |"
        )


def speed(args) -> None:
    source = Path(args.run)
    scratch = Path(args.scratch) / f"speed_{args.images}_{args.scales}"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(source / "classifier", scratch / "classifier")
    scales = "[1.0]" if args.scales == 1 else "[0.5, 1.0, 1.5, 2.0]"
    flip = "false" if args.scales == 1 else "true"
    cfg = load_config(
        source / "config.yaml",
        [
            f"run.dir={scratch.parent}",
            f"run.name={scratch.name}",
            f"data.num_train={args.images}",
            f"cam.scales={scales}",
            f"cam.flip={flip}",
            "pseudo.calibration=fixed",
            "logger.kind=none",
            "run.overwrite=false",
            *args.set,
        ],
    )
    # the classifier was trained on the source run's data size; reuse its record as-is
    record = read_json(source / "classifier" / "stage.json")
    record["config_hash"] = stage_records.stage_hashes(cfg)["classifier"]
    write_json_atomic(scratch / "classifier" / "stage.json", record)
    started = time.perf_counter()
    result = stages.make_pseudo_masks(cfg)
    total = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(
        f"| {args.images} | {args.scales} scale(s){' + flip' if flip == 'true' else ''} | "
        f"{result['images_per_second']:.1f} | {total:.1f} | {peak:.0f} | {workers:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["quality", "speed"])
    parser.add_argument("--run", default="checkpoints/default")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--scales", type=int, default=1, choices=[1, 4])
    parser.add_argument("--scratch", default="/tmp/wsss_bench")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--min-confidence", type=float, default=0.5)
    parser.add_argument(
        "--references", type=int, default=30, help="Libra-CAM: references per class"
    )
    parser.add_argument("--bound", type=float, default=0.1, help="Libra-CAM: reference score bound")
    parser.add_argument(
        "--layers", help="quality: comma-separated layers in place of layer2,layer3,layer4"
    )
    parser.add_argument(
        "--groups",
        nargs="*",
        default=None,
        help="quality: only the groups whose 'name [normalisation]' is listed",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="speed: config overrides, e.g. trainer.accelerator=gpu data.image_size=448",
    )
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    quality(args) if args.mode == "quality" else speed(args)


if __name__ == "__main__":
    main()
