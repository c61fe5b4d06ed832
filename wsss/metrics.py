"""Metrics: segmentation scores (mIoU, Dice, accuracies) and the classifier's mAP / F1, as
torchmetrics Metrics accumulated over a whole split and synced over processes; and CAM
faithfulness: Average Drop / Increase and insertion / deletion AUC (batched, any device).

Conventions shared by the faithfulness functions:
- images are raw (B, C, H, W) tensors in [0, 1]; `normalize` (e.g. mean/std) is applied after
  masking, so removed pixels are black, as in the Relevance-CAM protocol (docs/ALGORITHMS.md §2);
- maps are (B, K, h, w) saliency maps for targets (B, K) (or (B, h, w) with targets (B,));
  they are resized to the image size bilinearly and min-max normalised per map;
- activation is "softmax" (single-label, as the papers) or "sigmoid" (multi-label classifiers).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex

Normalize = Callable[[Tensor], Tensor] | None
IGNORE_INDEX = 255


def _nan_to_none(values: Tensor) -> list[Optional[float]]:
    return [None if v != v else float(v) for v in values.tolist()]


def scores_from_confusion(matrix: Tensor) -> dict[str, Any]:
    """Segmentation scores from a (C, C) confusion matrix (rows: truth, columns: prediction).

    Only classes present in the ground truth of the split count (a class that never occurs
    cannot be segmented well or badly); the others are listed in ``absent_classes`` and get
    None per-class scores. Keys:
    - ``miou``, ``per_class_iou``: IoU = TP / (TP + FP + FN);
    - ``dice``, ``per_class_dice``: Dice = 2TP / (2TP + FP + FN), ``dice`` the mean over the
      present *foreground* classes (index >= 1), as medical segmentation reports it;
    - ``pixel_accuracy``: correct / all scored pixels;
    - ``mean_class_accuracy``: mean over present classes of TP / (TP + FN);
    - ``absent_classes``: indices of classes without a ground-truth pixel.
    Means are NaN when nothing was scored.
    """
    matrix = matrix.double().cpu()
    hits = matrix.diag()
    truth, predicted = matrix.sum(1), matrix.sum(0)
    present = truth > 0
    nan = torch.full_like(hits, float("nan"))
    iou = torch.where(present, hits / (truth + predicted - hits).clamp(min=1), nan)
    dice = torch.where(present, 2 * hits / (truth + predicted).clamp(min=1), nan)
    recall = torch.where(present, hits / truth.clamp(min=1), nan)

    def mean(values: Tensor, where: Tensor) -> float:
        return float(values[where].mean()) if bool(where.any()) else float("nan")

    foreground = present.clone()
    foreground[0] = False
    return {"miou": mean(iou, present), "per_class_iou": _nan_to_none(iou),
            "dice": mean(dice, foreground), "per_class_dice": _nan_to_none(dice),
            "pixel_accuracy": float(hits.sum() / truth.sum()) if truth.sum() > 0 else float("nan"),
            "mean_class_accuracy": mean(recall, present),
            "absent_classes": (~present).nonzero().flatten().tolist()}


class SegmentationScores(Metric):
    """mIoU, Dice and accuracies over everything passed to ``update`` (a whole split), from one
    confusion matrix. A torchmetrics ``Metric``: its state lives on the module's device and is
    summed over processes by ``compute`` (build it with ``sync_on_compute=False`` to score on one
    process only, e.g. files on global rank zero). Pixels whose target is ``ignore_index`` are
    left out. ``compute`` returns ``scores_from_confusion``'s dict."""

    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.add_state("confusion", default=torch.zeros(num_classes, num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds, target: (B, H, W) class indices; target ``ignore_index`` is left out."""
        if preds.shape != target.shape:
            raise ValueError(f"prediction {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
        preds, target = preds.to(self.confusion.device).long(), target.to(self.confusion.device).long()
        keep = target != self.ignore_index
        preds, target = preds[keep], target[keep]
        c = self.num_classes
        if preds.numel() and (int(preds.min()) < 0 or int(preds.max()) >= c or int(target.min()) < 0
                              or int(target.max()) >= c):
            raise ValueError(f"class indices must lie in 0..{c - 1} (target {self.ignore_index} = ignore), got "
                             f"predictions {sorted(set(preds.unique().tolist()))[:8]} and targets "
                             f"{sorted(set(target.unique().tolist()))[:8]}")
        self.confusion += torch.bincount(target * c + preds, minlength=c * c).view(c, c)

    def compute(self) -> dict[str, Any]:
        return scores_from_confusion(self.confusion)


class MultiLabelScores(Metric):
    """Image-level classifier scores over a whole split: average precision and F1 (at
    ``threshold``) per class, and their macro means over the classes that occur in the split's
    labels. A class without a positive image has no defined AP (and an F1 that can only be 0 or
    undefined), so it is left out of the means and listed in ``absent_classes``; a split that uses
    6 of 20 classes then reads what its 6 classes score. Works for a single label. Probabilities
    and labels are kept (``cat`` states, gathered over processes): a validation split's worth."""

    full_state_update = False

    def __init__(self, num_labels: int, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels, self.threshold = num_labels, threshold
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, labels: Tensor) -> None:
        """probs: (B, C) sigmoid scores; labels: (B, C) multi-hot."""
        if probs.shape != labels.shape or probs.dim() != 2 or probs.shape[1] != self.num_labels:
            raise ValueError(f"probs and labels must both be (B, {self.num_labels}), got "
                             f"{tuple(probs.shape)} and {tuple(labels.shape)}")
        self.probs.append(probs.detach().float())
        self.labels.append(labels.detach().long())

    def compute(self) -> dict[str, Any]:
        from torchmetrics.functional.classification import binary_average_precision

        probs = _cat(self.probs).reshape(-1, self.num_labels)
        labels = _cat(self.labels).reshape(-1, self.num_labels)
        positives = labels.sum(0)
        predicted = probs >= self.threshold
        hits = (predicted & (labels > 0)).sum(0).double()
        f1 = 2 * hits / (predicted.sum(0) + positives).double().clamp(min=1)
        ap = [float(binary_average_precision(probs[:, c], labels[:, c])) if positives[c] > 0 else None
              for c in range(self.num_labels)]
        present = [c for c in range(self.num_labels) if positives[c] > 0]
        mean = (lambda values: float(sum(values) / len(values)) if values else float("nan"))
        return {"mAP": mean([ap[c] for c in present]), "f1": mean([float(f1[c]) for c in present]),
                "per_class_ap": ap, "per_class_f1": [float(f1[c]) if positives[c] > 0 else None
                                                     for c in range(self.num_labels)],
                "absent_classes": [c for c in range(self.num_labels) if positives[c] == 0]}


def _cat(values: Tensor | list[Tensor]) -> Tensor:
    """A ``cat`` state: a list of tensors before syncing, one tensor after."""
    if isinstance(values, Tensor):
        return values
    return torch.cat(values) if values else torch.empty(0)


def miou_reference(preds: Tensor, target: Tensor, num_classes: int) -> float:
    """One-shot torchmetrics mIoU, the definition SegmentationScores must agree with (tests)."""
    metric = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average="macro")
    return float(metric(preds.long(), target.long()))


def _prepare(images: Tensor, maps: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    targets = targets.unsqueeze(1) if targets.dim() == 1 else targets
    maps = maps.unsqueeze(1) if maps.dim() == 3 else maps
    if maps.shape[:2] != targets.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and targets {tuple(targets.shape)} disagree")
    maps = F.interpolate(maps.float(), size=images.shape[-2:], mode="bilinear",
                         align_corners=False) if maps.shape[-2:] != images.shape[-2:] else maps.float()
    low = maps.amin((-2, -1), keepdim=True)
    high = maps.amax((-2, -1), keepdim=True)
    return (maps - low) / (high - low).clamp(min=1e-12), targets.to(images.device, torch.long)


@torch.no_grad()
def class_scores(model: nn.Module, images: Tensor, targets: Tensor, normalize: Normalize = None,
                 activation: str = "softmax") -> Tensor:
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


def _masked_scores(model: nn.Module, images: Tensor, masks: Tensor, targets: Tensor,
                   normalize: Normalize, activation: str) -> Tensor:
    """Scores of target k on image b masked by masks[b, k]: (B, K)."""
    b, k = targets.shape
    masked = (images.unsqueeze(1) * masks.unsqueeze(2)).flatten(0, 1)  # (B*K, C, H, W)
    scores = class_scores(model, masked, targets.reshape(-1, 1), normalize, activation)
    return scores.view(b, k)


def average_drop_increase(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
                          normalize: Normalize = None, activation: str = "softmax",
                          protocol: str = "gradcampp") -> dict[str, float]:
    """Average Drop and Average Increase, in percent.

    protocol="gradcampp" (Chattopadhay et al.): the image times the whole soft map;
      drop = 100·mean(max(0, y - o) / y), increase = 100·mean(o > y), over all N (image, class).
    protocol="relevancecam" (the official snippet, docs/ALGORITHMS.md §2): the soft map restricted to
      its top 50% (M > 50th percentile, strict); drop divides by the number of pairs whose
      confidence dropped (0 if none); increase = 100·(1 - mean(y - o > 0)), ties count as increase.
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
        return {"drop": 100.0 * float(drop.mean()), "increase": 100.0 * float((o > y).float().mean())}
    dropped = (y - o) > 0
    count = int(dropped.sum())
    return {"drop": 100.0 * float(drop.sum()) / count if count else 0.0,
            "increase": 100.0 * (1.0 - float(dropped.float().mean()))}


def _blur(images: Tensor, sigma: float = 5.0) -> Tensor:
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-x.pow(2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="replicate"),
                   kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"),
                    kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


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


def insertion_deletion_auc(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
                           normalize: Normalize = None, activation: str = "softmax",
                           steps: int = 16, mode: str = "deletion",
                           baseline: str | Tensor | None = None) -> Tensor:
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
    base = _baseline(images, baseline if baseline is not None else
                     ("zero" if mode == "deletion" else "blur"))
    order = maps.flatten(-2).argsort(dim=-1, descending=True, stable=True)  # (B, K, HW)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(h * w, device=order.device)
                                            .expand_as(order))
    rank = rank.view(b, k, h, w)
    curve = []
    for i in range(steps + 1):
        revealed = (rank < round(i * h * w / steps)).float()  # the top pixels, (B, K, H, W)
        keep = 1.0 - revealed if mode == "deletion" else revealed
        mixed = (images.unsqueeze(1) * keep.unsqueeze(2)
                 + base.unsqueeze(1) * (1.0 - keep.unsqueeze(2))).flatten(0, 1)
        scores = class_scores(model, mixed, targets.reshape(-1, 1), normalize, activation)
        curve.append(scores.view(b, k))
    curve = torch.stack(curve, -1)
    return (curve.sum(-1) - 0.5 * (curve[..., 0] + curve[..., -1])) / steps


# --------------------------------------------------------------------------------------------
# Libra-CAM's five metrics: AUC, API, APD, IR, DR
# --------------------------------------------------------------------------------------------
# Libra-CAM (IJCAI'22) reports AUC↑, API↑, APD↓, IR↑, DR↓ but released no evaluation code
# (ALGORITHMS.md §2). The definitions below are ours, chosen to be consistent with Libra's own
# masking (the soft map multiplied into the image, percentile cuts) and with its reported figures:
# IR + DR = 1 minus the fraction of ties, which is why the README's rows give 0.997, 0.996, 0.999
# and, for a saturated VOC VGG-16, 0.819. docs/benchmarks.md ("Libra-CAM") gives the reasoning.


def libra_scores(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
                 normalize: Normalize = None, activation: str = "softmax",
                 steps: int = 10) -> dict[str, Tensor]:
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
    b, k = targets.shape
    h, w = images.shape[-2:]
    y = class_scores(model, images, targets, normalize, activation)
    order = maps.flatten(-2).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(h * w, device=order.device)
                                            .expand_as(order)).view(b, k, h, w)
    curve = torch.stack([
        _masked_scores(model, images, maps * (rank < round(i * h * w / steps)), targets, normalize, activation)
        for i in range(steps + 1)], -1)  # (B, K, steps + 1)
    auc = (curve.sum(-1) - 0.5 * (curve[..., 0] + curve[..., -1])) / steps
    o = curve[..., -1]
    ratio = (o - y) / y.clamp(min=1e-12)
    return {"auc": auc, "increase": ratio.clamp(min=0), "drop": (-ratio).clamp(min=0),
            "increased": (o > y).float(), "dropped": (o < y).float(), "score": y, "masked": o}


LIBRA_METRICS = {"auc": "auc", "api": "increase", "apd": "drop", "ir": "increased", "dr": "dropped"}


def libra_summary(scores: dict[str, Tensor], select: Tensor | None = None) -> dict[str, float]:
    """AUC, API, APD, IR, DR: means of ``libra_scores`` terms over all (image, class) pairs, or the
    pairs where `select` (B, K) is true. Concatenate the terms of several batches first."""
    out = {}
    for name, term in LIBRA_METRICS.items():
        values = scores[term] if select is None else scores[term][select.to(scores[term].device)]
        out[name] = float(values.float().mean()) if values.numel() else float("nan")
    return out


def libra_metrics(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
                  normalize: Normalize = None, activation: str = "softmax",
                  steps: int = 10) -> dict[str, float]:
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
