"""Faithfulness of each attribution method and layer on a trained classifier (synthetic data).

    .venv/bin/python scripts/evaluate_faithfulness.py [--run checkpoints/default] [--images 64]
        [--methods "Libra-CAM" "Grad-CAM" ...] [--references 30] [--bound 0.1]

Uses the run's trained classifier (train one first: `wsss train-classifier configs/default.yaml`).
Per method and layer (layer2, layer3, layer4, fused), a first table: Average Drop / Increase with
the Grad-CAM++ definitions and with the Relevance-CAM protocol (top 50% soft mask), insertion and
deletion AUC (sigmoid scores, 16 steps), over every present (image, class) pair; and
the mIoU of the maps thresholded at the best single threshold (the synthetic set has ground
truth), on all images. A second table: Libra-CAM's five metrics (wsss.metrics.libra_scores: AUC
over 10 soft percentile cuts, API, APD, IR, DR; sigmoid scores; Libra's masking, the normalised
tensor times the map, so removed pixels take the mean colour) over every present (image, class)
pair that the classifier predicts (sigmoid >= 0.5: the paper explains the predicted class, and
for a barely recognised class the relative API / APD terms explode). A third: the cost of each
method, images through the classifier per image (masked copies included, backward passes and LRP
sweeps not) and seconds per image, all its layers at once. Libra-CAM's reference library is built
first from the training split (its time is printed once).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from wsss import stages
from wsss.cam import LibrarySettings, aggregate_scales, build_cam, build_library, fuse_layers
from wsss.cam.methods import METHODS as CAM_REGISTRY
from wsss.cam.methods import method_title
from wsss.config import load_config
from wsss.data.datamodule import build_source, make_loader
from wsss.metrics import (
    ForwardCounter,
    SegmentationScores,
    average_drop_increase,
    insertion_deletion_auc,
    libra_scores,
    libra_summary,
)
from wsss.models.pseudo_labeler import present_targets
from wsss.pseudo.labels import scores_to_labels

LAYERS = ["layer2", "layer3", "layer4"]
METHODS = [  # (name, method, options, layers); LIFT-CAM: last layer only, where it is exact
    (method_title("relevance", "reference"), "relevance", {"preset": "reference"}, LAYERS),
    (method_title("relevance", "default"), "relevance", {"preset": "default"}, LAYERS),
    (method_title("relevance", "stable"), "relevance", {"preset": "stable"}, LAYERS),
    (method_title("gradcam"), "gradcam", {}, LAYERS),
    (method_title("gradcampp"), "gradcampp", {}, LAYERS),
    (method_title("liftcam"), "liftcam", {}, ["layer4"]),
    (method_title("libra"), "libra", {}, LAYERS),
    (method_title("libra", "calibrated"), "libra", {"calibrate": True}, ["layer4"]),
]
GRID = [round(0.05 * i, 2) for i in range(1, 20)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="checkpoints/default")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument(
        "--methods", nargs="*", default=None, help="names from METHODS (default: all)"
    )
    parser.add_argument(
        "--references", type=int, default=30, help="Libra-CAM: references per class"
    )
    parser.add_argument("--bound", type=float, default=0.1, help="Libra-CAM: reference score bound")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    run = Path(args.run)  # the run folder may have been moved or renamed since it was trained
    cfg = load_config(
        run / "config.yaml", ["data.num_workers=0", f"run.dir={run.parent}", f"run.name={run.name}"]
    )
    classifier = stages.load_classifier(cfg)
    model = classifier.export()
    mean = torch.tensor(classifier.hparams.mean).view(1, -1, 1, 1)
    std = torch.tensor(classifier.hparams.std).view(1, -1, 1, 1)
    normalize = lambda raw: (raw * 255.0 - mean) / std  # noqa: E731
    dataset = build_source(
        cfg, cfg.data.val_split, mean=classifier.hparams.mean, std=classifier.hparams.std
    )
    loader = make_loader(
        Subset(dataset, range(min(args.images, len(dataset)))), cfg, 16, shuffle=False
    )
    batches = list(loader)
    num_classes = len(classifier.hparams.class_names) + 1
    chosen = [m for m in METHODS if args.methods is None or m[0] in args.methods]
    library = None
    if any(method == "libra" for _, method, _, _ in chosen):
        train = build_source(
            cfg, cfg.data.train_split, mean=classifier.hparams.mean, std=classifier.hparams.std
        )
        started = time.perf_counter()
        library = build_library(
            model,
            make_loader(train, cfg, 16, shuffle=False),
            LibrarySettings(tuple(LAYERS), args.references, args.bound),
            progress=True,
        )
        print(
            f"Libra-CAM library: {len(train)} training images, {time.perf_counter() - started:.1f} s, "
            f"references per class {library.counts.tolist()}",
            file=sys.stderr,
        )
    rows, libra_rows, costs = [], [], []
    for name, method, options, layers in chosen:
        options = {**options, "library": library} if method == "libra" else options
        collected: dict[str, list] = {
            layer: [] for layer in layers + (["fused"] if len(layers) > 1 else [])
        }
        seconds, images_seen = 0.0, 0
        counter = ForwardCounter(model)
        for batch in batches:
            images, labels = batch["image"], batch["labels"]
            targets, valid = present_targets(labels)
            kwargs = {"present": labels > 0.5} if CAM_REGISTRY[method].takes_present else {}
            started = time.perf_counter()
            with counter, build_cam(method, model, layers, **options) as cam:
                per_layer = aggregate_scales(
                    cam, images, [1.0], False, targets=targets, normalize="relu_max", **kwargs
                )
            seconds += time.perf_counter() - started
            images_seen += len(images)
            if len(layers) > 1:
                per_layer["fused"] = fuse_layers(
                    {k: per_layer[k] for k in layers}, images.shape[-2:]
                )
            raw = (images * std + mean) / 255.0
            for layer, maps in per_layer.items():
                collected[layer].append((raw, maps, targets, valid, batch["mask"]))
        costs.append((name, layers, counter.images / images_seen, seconds / images_seen))
        for layer, parts in collected.items():
            meters = {tau: SegmentationScores(num_classes) for tau in GRID}
            drops, incs, rdrops, rincs, dels, inss, weights = [], [], [], [], [], [], []
            libra_terms: dict[str, list] = {}
            for raw, maps, targets, valid, masks in parts:
                for tau, meter in meters.items():
                    meter.update(scores_to_labels(maps, targets + 1, valid, tau).long(), masks)
                # Libra's own masking: the normalised tensor times the map (removed pixels: mean colour)
                terms = libra_scores(model, normalize(raw), maps, targets, None, "sigmoid")
                predicted = valid & (
                    terms["score"] >= 0.5
                )  # as the paper's target: a predicted class
                for term, values in terms.items():
                    libra_terms.setdefault(term, []).append(values[predicted])
                # every present (image, class) pair, each scored as a one-target image (padding
                # slots of images with fewer classes than the batch's maximum are left out)
                bi, ki = valid.nonzero(as_tuple=True)
                if not len(bi):
                    continue
                r, m, t = raw[bi], maps[bi, ki][:, None], targets[bi, ki][:, None]
                g = average_drop_increase(model, r, m, t, normalize, "sigmoid", "gradcampp")
                p = average_drop_increase(model, r, m, t, normalize, "sigmoid", "relevancecam")
                d = insertion_deletion_auc(model, r, m, t, normalize, "sigmoid", mode="deletion")
                i = insertion_deletion_auc(model, r, m, t, normalize, "sigmoid", mode="insertion")
                n = float(t.numel())
                drops.append(g["drop"] * n)
                incs.append(g["increase"] * n)
                rdrops.append(p["drop"] * n)
                rincs.append(p["increase"] * n)
                dels.append(float(d.sum()))
                inss.append(float(i.sum()))
                weights.append(n)
            total = sum(weights)
            best = max((meter.compute()["miou"], tau) for tau, meter in meters.items())
            rows.append(
                (
                    name,
                    layer,
                    sum(drops) / total,
                    sum(incs) / total,
                    sum(rdrops) / total,
                    sum(rincs) / total,
                    sum(inss) / total,
                    sum(dels) / total,
                    best,
                )
            )
            pairs = {term: torch.cat(values) for term, values in libra_terms.items()}
            libra_rows.append((name, layer, libra_summary(pairs), len(pairs["auc"])))
            print(f"{name} {layer} done", file=sys.stderr, flush=True)
    print(
        "| method | layer | AD (Grad-CAM++) ↓ | AI (Grad-CAM++) ↑ | AD (Rel-CAM protocol) ↓ | "
        "AI (Rel-CAM protocol) ↑ | insertion AUC ↑ | deletion AUC ↓ | best-τ mIoU (τ) ↑ |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, layer, ad, ai, rad, rai, ins, dele, (miou, tau) in rows:
        print(
            f"| {name} | {layer} | {ad:.1f} | {ai:.1f} | {rad:.1f} | {rai:.1f} | {ins:.3f} | {dele:.3f} | "
            f"{100 * miou:.1f} ({tau}) |"
        )
    print()
    print("| method | layer | AUC ↑ | API ↑ | APD ↓ | IR ↑ | DR ↓ | IR + DR | pairs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, layer, m, n in libra_rows:
        print(
            f"| {name} | {layer} | {m['auc']:.3f} | {m['api']:.3f} | {m['apd']:.3f} | {m['ir']:.3f} | "
            f"{m['dr']:.3f} | {m['ir'] + m['dr']:.3f} | {n} |"
        )
    print()
    print("| method | layers | forwards per image | seconds per image |")
    print("|---|---|---|---|")
    for name, layers, forwards, per_image in costs:
        print(f"| {name} | {', '.join(layers)} | {forwards:.1f} | {per_image:.3f} |")


if __name__ == "__main__":
    main()
