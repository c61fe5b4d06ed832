"""Segmentation scores (mIoU, Dice, accuracies) and the classifier's mAP / F1, as torchmetrics
Metrics accumulated over a whole split and synced over processes."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.functional.classification import binary_average_precision

from wsss.label_maps import IGNORE_INDEX


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
    return {
        "miou": mean(iou, present),
        "per_class_iou": _nan_to_none(iou),
        "dice": mean(dice, foreground),
        "per_class_dice": _nan_to_none(dice),
        "pixel_accuracy": float(hits.sum() / truth.sum()) if truth.sum() > 0 else float("nan"),
        "mean_class_accuracy": mean(recall, present),
        "absent_classes": (~present).nonzero().flatten().tolist(),
    }


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
        self.add_state(
            "confusion",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """preds, target: (B, H, W) class indices; target ``ignore_index`` is left out."""
        if preds.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape"
            )
        preds, target = (
            preds.to(self.confusion.device).long(),
            target.to(self.confusion.device).long(),
        )
        keep = target != self.ignore_index
        preds, target = preds[keep], target[keep]
        c = self.num_classes
        if preds.numel() and (
            int(preds.min()) < 0
            or int(preds.max()) >= c
            or int(target.min()) < 0
            or int(target.max()) >= c
        ):
            raise ValueError(
                f"class indices must lie in 0..{c - 1} (target {self.ignore_index} = "
                f"ignore), got predictions {sorted(set(preds.unique().tolist()))[:8]} "
                f"and targets {sorted(set(target.unique().tolist()))[:8]}"
            )
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
            raise ValueError(
                f"probs and labels must both be (B, {self.num_labels}), got "
                f"{tuple(probs.shape)} and {tuple(labels.shape)}"
            )
        self.probs.append(probs.detach().float())
        self.labels.append(labels.detach().long())

    def compute(self) -> dict[str, Any]:
        probs = _cat(self.probs).reshape(-1, self.num_labels)
        labels = _cat(self.labels).reshape(-1, self.num_labels)
        positives = labels.sum(0)
        predicted = probs >= self.threshold
        hits = (predicted & (labels > 0)).sum(0).double()
        f1 = 2 * hits / (predicted.sum(0) + positives).double().clamp(min=1)
        ap = [
            float(binary_average_precision(probs[:, c], labels[:, c])) if positives[c] > 0 else None
            for c in range(self.num_labels)
        ]
        present = [c for c in range(self.num_labels) if positives[c] > 0]

        def mean(values):
            return float(sum(values) / len(values)) if values else float("nan")

        return {
            "mAP": mean([ap[c] for c in present]),
            "f1": mean([float(f1[c]) for c in present]),
            "per_class_ap": ap,
            "per_class_f1": [
                float(f1[c]) if positives[c] > 0 else None for c in range(self.num_labels)
            ],
            "absent_classes": [c for c in range(self.num_labels) if positives[c] == 0],
        }


def _cat(values: Tensor | list[Tensor]) -> Tensor:
    """A ``cat`` state: a list of tensors before syncing, one tensor after."""
    if isinstance(values, Tensor):
        return values
    return torch.cat(values) if values else torch.empty(0)


def miou_reference(preds: Tensor, target: Tensor, num_classes: int) -> float:
    """One-shot torchmetrics mIoU, the definition SegmentationScores must agree with (tests)."""
    metric = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE_INDEX, average="macro")
    return float(metric(preds.long(), target.long()))
