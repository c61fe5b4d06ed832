"""Faithfulness of each attribution method and layer on a trained classifier (synthetic data).

    .venv/bin/python scripts/evaluate_faithfulness.py [--run checkpoints/default] [--images 64]

Uses the run's trained classifier (train one first: `wsss train-classifier configs/default.yaml`).
Per method and layer (layer2, layer3, layer4, fused): Average Drop / Increase with the
Grad-CAM++ definitions and with the Relevance-CAM protocol (top 50% soft mask), insertion and
deletion AUC (sigmoid scores, 16 steps), and the mIoU of the maps thresholded at the best single
threshold (the synthetic set has ground truth). Every present class of every image is scored.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch.utils.data import Subset

from wsss import stages
from wsss.cam import aggregate_scales, build_cam, fuse_layers
from wsss.config import load_config
from wsss.data.datamodule import build_source, make_loader
from wsss.metrics import SegmentationScores, average_drop_increase, insertion_deletion_auc
from wsss.models.pseudo_labeler import present_targets
from wsss.pseudo.labels import scores_to_labels

METHODS = [("Relevance-CAM reference", "relevance", {"preset": "reference"}),
           ("Relevance-CAM default", "relevance", {"preset": "default"}),
           ("Relevance-CAM stable", "relevance", {"preset": "stable"}),
           ("Grad-CAM", "gradcam", {}), ("Grad-CAM++", "gradcampp", {}), ("LIFT-CAM", "liftcam", {})]
LAYERS = ["layer2", "layer3", "layer4"]
GRID = [round(0.05 * i, 2) for i in range(1, 20)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="checkpoints/default")
    parser.add_argument("--images", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg = load_config(Path(args.run) / "config.yaml", ["data.num_workers=0"])
    classifier = stages.load_classifier(cfg)
    model = classifier.export()
    mean = torch.tensor(classifier.hparams.mean).view(1, -1, 1, 1)
    std = torch.tensor(classifier.hparams.std).view(1, -1, 1, 1)
    normalize = lambda raw: (raw * 255.0 - mean) / std  # noqa: E731
    dataset = build_source(cfg, cfg.data.val_split, mean=classifier.hparams.mean, std=classifier.hparams.std)
    loader = make_loader(Subset(dataset, range(min(args.images, len(dataset)))), cfg, 16, shuffle=False)
    batches = list(loader)
    num_classes = len(classifier.hparams.class_names) + 1
    rows = []
    for name, method, options in METHODS:
        layers = ["layer4"] if method == "liftcam" else LAYERS  # LIFT-CAM: last layer only (§4)
        collected: dict[str, list] = {layer: [] for layer in layers + (["fused"] if len(layers) > 1 else [])}
        for batch in batches:
            images, labels = batch["image"], batch["labels"]
            targets, valid = present_targets(labels)
            kwargs = {"present": labels > 0.5} if method == "relevance" else {}
            with build_cam(method, model, layers, **options) as cam:
                per_layer = aggregate_scales(cam, images, [1.0], False, targets=targets, **kwargs)
            if len(layers) > 1:
                per_layer["fused"] = fuse_layers({k: per_layer[k] for k in layers}, images.shape[-2:])
            raw = (images * std + mean) / 255.0
            for layer, maps in per_layer.items():
                collected[layer].append((raw, maps, targets, valid, batch["mask"]))
        for layer, parts in collected.items():
            meters = {tau: SegmentationScores(num_classes) for tau in GRID}
            drops, incs, rdrops, rincs, dels, inss, weights = [], [], [], [], [], [], []
            for raw, maps, targets, valid, masks in parts:
                for tau, meter in meters.items():
                    meter.update(scores_to_labels(maps, targets + 1, valid, tau).long(), masks)
                sel = valid.all(1)  # faithfulness on images whose slots are all real
                if not sel.any():
                    continue
                r, m, t = raw[sel], maps[sel], targets[sel]
                g = average_drop_increase(model, r, m, t, normalize, "sigmoid", "gradcampp")
                p = average_drop_increase(model, r, m, t, normalize, "sigmoid", "relevancecam")
                d = insertion_deletion_auc(model, r, m, t, normalize, "sigmoid", mode="deletion")
                i = insertion_deletion_auc(model, r, m, t, normalize, "sigmoid", mode="insertion")
                n = float(t.numel())
                drops.append(g["drop"] * n); incs.append(g["increase"] * n)
                rdrops.append(p["drop"] * n); rincs.append(p["increase"] * n)
                dels.append(float(d.sum())); inss.append(float(i.sum())); weights.append(n)
            total = sum(weights)
            best = max((meter.compute()["miou"], tau) for tau, meter in meters.items())
            rows.append((name, layer, sum(drops) / total, sum(incs) / total, sum(rdrops) / total,
                         sum(rincs) / total, sum(inss) / total, sum(dels) / total, best))
            print(f"{name} {layer} done", file=sys.stderr)
    print("| method | layer | AD (Grad-CAM++) ↓ | AI (Grad-CAM++) ↑ | AD (Rel-CAM protocol) ↓ | "
          "AI (Rel-CAM protocol) ↑ | insertion AUC ↑ | deletion AUC ↓ | best-τ mIoU (τ) ↑ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, layer, ad, ai, rad, rai, ins, dele, (miou, tau) in rows:
        print(f"| {name} | {layer} | {ad:.1f} | {ai:.1f} | {rad:.1f} | {rai:.1f} | {ins:.3f} | {dele:.3f} | "
              f"{100 * miou:.1f} ({tau}) |")


if __name__ == "__main__":
    main()
