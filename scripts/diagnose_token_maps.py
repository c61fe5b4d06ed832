"""Variants of Relevance-CAM's token map on a trained ViT run, scored by seed mIoU: what makes
a block's α·A map fail (docs/ALGORITHMS.md §7.10).

    python scripts/diagnose_token_maps.py --run /tmp/vitrest_runs/deit_rel [--preset default]
        [--linear-gamma 0.25]   # the preset with the γ-rule on every Linear layer (lxt's ViT choice)

For each layer (blocks.i outputs, (B, N, C) tokens) and the relevance R of the preset there:
- "alpha·A": the Relevance-CAM map Σ_c α_c A_c(n), α_c = Σ_n R_c(n);
- "alpha·A/sigma", "alpha·xhat": A divided by its per-token σ_n, or normalised ((A - μ_n)/σ_n);
- "sign-aligned alpha": α_c times the sign of the channel's token total;
- "position weights": Σ_c R_c(n), RelevanceCAM's weights="position";
- "Grad-CAM" on the same layer.
Seed mIoU at the fixed threshold (pseudo.threshold) with the pipeline's centred normalisation
and horizontal flip, on the first --images training images. Also prints, per layer, the fraction
of channels whose token total is negative and the median over images of max σ_n / min σ_n over
the patch tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Subset

from wsss import stages
from wsss.cam import GradCAM, RelevanceCAM, Rule, to_grid
from wsss.cam.postprocess import aggregate_scales
from wsss.config import load_config
from wsss.data.datamodule import build_source, make_loader
from wsss.metrics import SegmentationScores
from wsss.models.pseudo_labeler import present_targets
from wsss.pseudo.labels import scores_to_labels


class MapVariants:
    """Called as a CAM: {"layer variant": (B, K, h, w)} raw maps from one relevance sweep."""

    def __init__(self, model, layers: list[str], preset: str, **options):
        self.cam = RelevanceCAM(model, layers, preset=preset, **options)
        self.layers = layers
        self.negative: dict[str, list[float]] = {layer: [] for layer in layers}
        self.spread: dict[str, list[Tensor]] = {layer: [] for layer in layers}

    def __call__(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        out = self.cam.relevance(images, targets)
        hw, layout = images.shape[-2:], self.cam.tokens
        maps = {}
        for layer in self.layers:
            a, r = (t.double() for t in out[layer])  # (B, N, C), (B, K, N, C)
            alpha, total = r.sum(2), a.sum(1)  # (B, K, C), (B, C)
            sigma = a.std(-1, unbiased=False, keepdim=True).clamp(min=1e-12)
            xhat = (a - a.mean(-1, keepdim=True)) / sigma
            patches = sigma[:, -to_grid(a, hw, layout).shape[-2:].numel() :, 0]
            self.spread[layer].append(patches.amax(1) / patches.amin(1))
            self.negative[layer].append(float((total < 0).double().mean()))

            def weighted(weights: Tensor, act: Tensor) -> Tensor:
                return torch.einsum("bkc,bchw->bkhw", weights, to_grid(act, hw, layout))

            maps[f"{layer} alpha·A"] = weighted(alpha, a)
            maps[f"{layer} alpha·A/sigma"] = weighted(alpha, a / sigma)
            maps[f"{layer} alpha·xhat"] = weighted(alpha, xhat)
            maps[f"{layer} sign-aligned alpha"] = weighted(alpha * total.sign()[:, None], a)
            maps[f"{layer} position weights"] = to_grid(r, hw, layout, lead=2).sum(2)
        return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--layers", default="blocks.3,blocks.7,blocks.11")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument(
        "--linear-gamma", type=float, help="the γ-rule with this γ on Linear layers"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    cfg = load_config(
        run / "config.yaml", ["data.num_workers=0", f"run.dir={run.parent}", f"run.name={run.name}"]
    )
    classifier = stages.load_classifier(cfg)
    model = classifier.export().eval()
    dataset = build_source(
        cfg, cfg.data.train_split, mean=classifier.hparams.mean, std=classifier.hparams.std
    )
    layers = args.layers.split(",")
    options = (
        {} if args.linear_gamma is None else {"linear": Rule("gamma", gamma=args.linear_gamma)}
    )
    variants = MapVariants(model, layers, args.preset, **options)
    num_classes = len(classifier.hparams.class_names) + 1
    meters: dict[str, SegmentationScores] = {}
    subset = Subset(dataset, range(min(args.images, len(dataset))))
    for batch in make_loader(subset, cfg, cfg.cam.batch_size, shuffle=False):
        targets, valid = present_targets(batch["labels"])
        images = batch["image"]
        maps = aggregate_scales(variants, images, [1.0], True, targets=targets)
        with GradCAM(model, layers) as gradcam:
            grad = aggregate_scales(gradcam, images, [1.0], True, targets=targets)
        maps.update({f"{layer} Grad-CAM": m for layer, m in grad.items()})
        for name, m in maps.items():
            labels = scores_to_labels(m, targets + 1, valid, cfg.pseudo.threshold, 0.0)
            meters.setdefault(name, SegmentationScores(num_classes)).update(
                labels.long(), batch["mask"]
            )
    print(f"{run.name}, preset {args.preset} {options}, {len(subset)} images, seed mIoU (%)")
    for layer in layers:
        negative = sum(variants.negative[layer]) / len(variants.negative[layer])
        spread = torch.cat(variants.spread[layer]).median()
        print(
            f"{layer}: channels with a negative token total {100 * negative:.1f} %, "
            f"max/min sigma_n over patch tokens (median) {float(spread):.2f}"
        )
        for name in sorted(n for n in meters if n.startswith(layer + " ")):
            print(f"  {name[len(layer) + 1 :]:20s} {100 * meters[name].compute()['miou']:.1f}")


if __name__ == "__main__":
    main()
