"""CAM faithfulness, batched on any device: Average Drop / Increase, insertion / deletion AUC,
Libra-CAM's five metrics, and the forward passes a method costs.

Conventions shared by the functions:
- images are raw (B, C, H, W) tensors in [0, 1]; `normalize` (e.g. mean/std) is applied after
  masking, so removed pixels are black, as the official Relevance-CAM evaluation does;
- maps are (B, K, h, w) saliency maps for targets (B, K) (or (B, h, w) with targets (B,));
  they are resized to the image size bilinearly and min-max normalised per map;
- activation is "softmax" (single-label, as the papers) or "sigmoid" (multi-label classifiers).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Normalize = Callable[[Tensor], Tensor] | None


def _prepare(images: Tensor, maps: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    targets = targets.unsqueeze(1) if targets.dim() == 1 else targets
    maps = maps.unsqueeze(1) if maps.dim() == 3 else maps
    if maps.shape[:2] != targets.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and targets {tuple(targets.shape)} disagree")
    maps = (
        F.interpolate(maps.float(), size=images.shape[-2:], mode="bilinear", align_corners=False)
        if maps.shape[-2:] != images.shape[-2:]
        else maps.float()
    )
    low = maps.amin((-2, -1), keepdim=True)
    high = maps.amax((-2, -1), keepdim=True)
    return (maps - low) / (high - low).clamp(min=1e-12), targets.to(images.device, torch.long)


@torch.no_grad()
def class_scores(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    normalize: Normalize = None,
    activation: str = "softmax",
) -> Tensor:
    """Probability of each target class, (B, K), for raw images (B, C, H, W)."""
    targets = targets.unsqueeze(1) if targets.dim() == 1 else targets
    logits = model(normalize(images) if normalize is not None else images).float()
    if activation == "softmax":
        probs = logits.softmax(1)
    elif activation == "sigmoid":
        probs = logits.sigmoid()
    else:
        raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")
    return probs.gather(1, targets.to(probs.device, torch.long))


def _masked_scores(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    targets: Tensor,
    normalize: Normalize,
    activation: str,
) -> Tensor:
    """Scores of target k on image b masked by masks[b, k]: (B, K)."""
    b, k = targets.shape
    masked = (images.unsqueeze(1) * masks.unsqueeze(2)).flatten(0, 1)  # (B*K, C, H, W)
    scores = class_scores(model, masked, targets.reshape(-1, 1), normalize, activation)
    return scores.view(b, k)


def average_drop_increase(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    normalize: Normalize = None,
    activation: str = "softmax",
    protocol: str = "gradcampp",
) -> dict[str, float]:
    """Average Drop and Average Increase, in percent.

    protocol="gradcampp" (Chattopadhay et al.): the image times the whole soft map;
      drop = 100·mean(max(0, y - o) / y), increase = 100·mean(o > y), over all N (image, class).
    protocol="relevancecam" (the official Relevance-CAM evaluation code, its quirks kept so its
      figures can be reproduced): the soft map restricted to its top 50% (M > 50th percentile,
      strict); drop divides by the number of pairs whose confidence dropped (0 if none);
      increase = 100·(1 - mean(y - o > 0)), ties count as increase.
    """
    maps, targets = _prepare(images, maps, targets)
    if protocol == "relevancecam":
        median = torch.quantile(maps.flatten(-2), 0.5, dim=-1)[..., None, None]
        maps = maps * (maps > median)
    elif protocol != "gradcampp":
        raise ValueError(f"protocol must be 'gradcampp' or 'relevancecam', got {protocol!r}")
    y = class_scores(model, images, targets, normalize, activation)
    o = _masked_scores(model, images, maps, targets, normalize, activation)
    drop = (y - o).clamp(min=0) / y.clamp(min=1e-12)
    if protocol == "gradcampp":
        return {
            "drop": 100.0 * float(drop.mean()),
            "increase": 100.0 * float((o > y).float().mean()),
        }
    dropped = (y - o) > 0
    count = int(dropped.sum())
    return {
        "drop": 100.0 * float(drop.sum()) / count if count else 0.0,
        "increase": 100.0 * (1.0 - float(dropped.float().mean())),
    }


def _blur(images: Tensor, sigma: float = 5.0) -> Tensor:
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-x.pow(2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.conv2d(
        F.pad(images, (radius, radius, 0, 0), mode="replicate"),
        kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1),
        groups=c,
    )
    return F.conv2d(
        F.pad(out, (0, 0, radius, radius), mode="replicate"),
        kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1),
        groups=c,
    )


def _baseline(images: Tensor, baseline: str | Tensor) -> Tensor:
    if isinstance(baseline, Tensor):
        return baseline.expand_as(images)
    if baseline == "zero":
        return torch.zeros_like(images)
    if baseline == "blur":
        return _blur(images)
    if baseline == "mean":
        return images.mean((-2, -1), keepdim=True).expand_as(images)
    raise ValueError(f"baseline must be 'zero', 'blur', 'mean' or a tensor, got {baseline!r}")


def _salience_rank(maps: Tensor) -> Tensor:
    """(B, K, H, W) rank of each pixel in its map, 0 for the most salient; ties keep pixel order."""
    h, w = maps.shape[-2:]
    order = maps.flatten(-2).argsort(dim=-1, descending=True, stable=True)  # (B, K, HW)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(h * w, device=order.device).expand_as(order)
    )
    return rank.view(maps.shape)


def _trapezoid_area(curve: Tensor) -> Tensor:
    """Area under (..., steps + 1) scores at equally spaced fractions of [0, 1] (trapezoid rule)."""
    steps = curve.shape[-1] - 1
    return (curve.sum(-1) - 0.5 * (curve[..., 0] + curve[..., -1])) / steps


def insertion_deletion_auc(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    normalize: Normalize = None,
    activation: str = "softmax",
    steps: int = 16,
    mode: str = "deletion",
    baseline: str | Tensor | None = None,
) -> Tensor:
    """Area under the score curve while pixels are deleted (or inserted) in map order.

    deletion: start from the image, replace the most salient pixels by the baseline (default
    "zero") in `steps` equal chunks; lower is better. insertion: start from the baseline
    (default "blur") and put the most salient pixels back; higher is better.
    Returns the (B, K) AUCs (trapezoid rule over the fraction of pixels, in [0, 1]).
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    maps, targets = _prepare(images, maps, targets)
    b, k = targets.shape
    h, w = images.shape[-2:]
    base = _baseline(
        images, baseline if baseline is not None else ("zero" if mode == "deletion" else "blur")
    )
    rank = _salience_rank(maps)
    curve = []
    for i in range(steps + 1):
        revealed = (rank < round(i * h * w / steps)).float()  # the top pixels, (B, K, H, W)
        keep = 1.0 - revealed if mode == "deletion" else revealed
        mixed = (
            images.unsqueeze(1) * keep.unsqueeze(2) + base.unsqueeze(1) * (1.0 - keep.unsqueeze(2))
        ).flatten(0, 1)
        scores = class_scores(model, mixed, targets.reshape(-1, 1), normalize, activation)
        curve.append(scores.view(b, k))
    return _trapezoid_area(torch.stack(curve, -1))


# Libra-CAM's five metrics: AUC, API, APD, IR, DR
# Libra-CAM (IJCAI'22) reports AUC↑, API↑, APD↓, IR↑, DR↓ but released no evaluation code, so the
# definitions below are ours, chosen to be consistent with Libra's own masking (the soft map
# multiplied into the image, percentile cuts) and with its reported figures: IR + DR = 1 minus the
# fraction of ties, which is why the README's rows give 0.997, 0.996, 0.999 and, for a saturated
# VOC VGG-16, 0.819. docs/benchmarks.md ("Libra-CAM") gives the reasoning.


def libra_scores(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    normalize: Normalize = None,
    activation: str = "softmax",
    steps: int = 10,
) -> dict[str, Tensor]:
    """Per (image, class) terms of the five Libra-CAM metrics, each (B, K) float.

    With y = s_t(x) and o = s_t(x ⊙ M) (the whole soft map M, min–max normalised, as in the
    Grad-CAM++ "explanation map" and Libra's calibration):
    - ``auc``: area under s_t(x ⊙ M·1[top f of M]) for the kept fraction f = 0, 1/steps, …, 1
      (trapezoid rule): Libra's percentile cut (lowest pixels zeroed, the rest soft) swept over
      the whole range; higher when the map's top pixels alone carry the class. The f = 1 end is o.
    - ``increase``: max(0, o − y) / y, the relative confidence gain (API is its mean);
    - ``drop``: max(0, y − o) / y, the relative confidence loss (APD is its mean; 100·APD is
      Grad-CAM++'s Average Drop);
    - ``increased``: 1[o > y] (IR is its mean; 100·IR is Grad-CAM++'s Average Increase);
    - ``dropped``: 1[o < y] (DR is its mean). Ties count in neither, so IR + DR <= 1;
    - ``score`` y and ``masked`` o themselves (e.g. to keep the pairs the classifier predicts:
      the relative terms explode for a tiny y).
    Masking follows this module's convention: `images` are multiplied, then `normalize`d.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    maps, targets = _prepare(images, maps, targets)
    h, w = images.shape[-2:]
    y = class_scores(model, images, targets, normalize, activation)
    rank = _salience_rank(maps)
    curve = torch.stack(
        [
            _masked_scores(
                model,
                images,
                maps * (rank < round(i * h * w / steps)),
                targets,
                normalize,
                activation,
            )
            for i in range(steps + 1)
        ],
        -1,
    )  # (B, K, steps + 1)
    auc = _trapezoid_area(curve)
    o = curve[..., -1]
    ratio = (o - y) / y.clamp(min=1e-12)
    return {
        "auc": auc,
        "increase": ratio.clamp(min=0),
        "drop": (-ratio).clamp(min=0),
        "increased": (o > y).float(),
        "dropped": (o < y).float(),
        "score": y,
        "masked": o,
    }


LIBRA_METRICS = {"auc": "auc", "api": "increase", "apd": "drop", "ir": "increased", "dr": "dropped"}


def libra_summary(scores: dict[str, Tensor], select: Tensor | None = None) -> dict[str, float]:
    """AUC, API, APD, IR, DR: means of ``libra_scores`` terms over all (image, class) pairs, or the
    pairs where `select` (B, K) is true. Concatenate the terms of several batches first."""
    out = {}
    for name, term in LIBRA_METRICS.items():
        values = scores[term] if select is None else scores[term][select.to(scores[term].device)]
        out[name] = float(values.float().mean()) if values.numel() else float("nan")
    return out


def libra_metrics(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    normalize: Normalize = None,
    activation: str = "softmax",
    steps: int = 10,
) -> dict[str, float]:
    """The five Libra-CAM metrics (``libra_scores`` averaged): auc↑, api↑, apd↓, ir↑, dr↓."""
    return libra_summary(libra_scores(model, images, maps, targets, normalize, activation, steps))


class ForwardCounter:
    """Counts the images that go through a model's forward passes while active (the batch sizes
    seen by its first Conv2d, or by the model itself if it has none): the "forwards per image"
    cost of an attribution method. Backward passes and LRP sweeps are not counted."""

    def __init__(self, model: nn.Module) -> None:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        self.module = convs[0] if convs else model
        self.images = 0
        self._handle = None

    def __enter__(self) -> "ForwardCounter":
        self._handle = self.module.register_forward_pre_hook(self._count)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _count(self, module: nn.Module, args: tuple) -> None:
        self.images += int(args[0].shape[0])
