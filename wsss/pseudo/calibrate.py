"""Foreground thresholds without pixel labels, in the style of Libra-CAM (ALGORITHMS.md §3.5).

For each image and present class the classifier is queried on the image masked by the
thresholded map (kept region) and by its complement (deleted region), for every threshold of a
grid in batches. An objective picks one threshold per (image, class); the per-class threshold is
the median over a calibration subset. Masking multiplies the normalised image by a {0, 1} mask,
so removed pixels take the data-set mean colour. The cut that was scored is the cut returned
(Libra's code returns the next one).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

OBJECTIVES = ("increase", "keep_delete", "area")


@torch.no_grad()
def masked_confidences(model: Callable[[Tensor], Tensor], images: Tensor, maps: Tensor,
                       class_index: Tensor, valid: Tensor, grid: Sequence[float],
                       max_batch: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid confidences of each slot's class on masked images.

    images (B, C, H, W) normalised; maps (B, K, H, W) in [0, 1]; class_index (B, K) logit index;
    valid (B, K). Returns keep (B, K, T) on image * 1[map >= t], delete (B, K, T) on
    image * 1[map < t] and base (B, K) on the plain image; invalid slots are NaN.
    """
    b, k = class_index.shape
    taus = torch.as_tensor(list(grid), dtype=maps.dtype, device=maps.device)
    t = len(taus)
    base_probs = torch.sigmoid(model(images).float())
    base = torch.gather(base_probs, 1, class_index.to(images.device))
    keep = torch.full((b, k, t), float("nan"), device=images.device)
    delete = torch.full_like(keep, float("nan"))
    slots = valid.nonzero().tolist()  # [(image, slot)] of the valid slots
    # one query = (valid slot, threshold, keep|delete); chunked to bound memory
    queries = [(i, j, ti, kind) for i, j in slots for ti in range(t) for kind in (0, 1)]
    for start in range(0, len(queries), max_batch):
        chunk = queries[start:start + max_batch]
        idx = torch.tensor(chunk, device=images.device)
        kept = (maps[idx[:, 0], idx[:, 1]] >= taus[idx[:, 2]][:, None, None]).to(images.dtype)
        region = torch.where(idx[:, 3:4, None] == 0, kept, 1.0 - kept)  # (Q, H, W)
        logits = model(images[idx[:, 0]] * region[:, None])
        probs = torch.sigmoid(logits.float())
        conf = probs.gather(1, class_index.to(images.device)[idx[:, 0], idx[:, 1]][:, None])[:, 0]
        for target, kind in ((keep, 0), (delete, 1)):
            sel = idx[:, 3] == kind
            target[idx[sel, 0], idx[sel, 1], idx[sel, 2]] = conf[sel]
    base = torch.where(valid.to(images.device), base, torch.full_like(base, float("nan")))
    return keep, delete, base


def choose_thresholds(keep: Tensor, delete: Tensor, base: Tensor, grid: Sequence[float],
                      objective: str, rho: float = 0.9) -> Tensor:
    """One threshold per (image, slot), (B, K); NaN for invalid slots.

    - increase: Libra's max(0, s(keep) - s(x)), first maximum (the lowest threshold on ties);
    - keep_delete: s(keep) - s(delete), first maximum;
    - area: the largest threshold (smallest kept area) with s(keep) >= rho * s(x), else the lowest.
    """
    taus = torch.as_tensor(list(grid), dtype=torch.float32, device=keep.device)
    if objective == "increase":
        score = (keep - base[..., None]).clamp(min=0)
    elif objective == "keep_delete":
        score = keep - delete
    elif objective == "area":
        ok = keep >= rho * base[..., None]
        last_ok = torch.where(ok, torch.arange(len(taus), device=keep.device), -1).amax(-1)
        chosen = taus[last_ok.clamp(min=0)]
        return torch.where(base.isnan(), torch.full_like(chosen, float("nan")), chosen)
    else:
        raise ValueError(f"unknown calibration objective {objective!r}; choose one of {OBJECTIVES}")
    score = torch.nan_to_num(score, nan=float("-inf"))
    best = score.argmax(-1)  # argmax returns the first maximum
    chosen = taus[best]
    return torch.where(base.isnan(), torch.full_like(chosen, float("nan")), chosen)


def aggregate_thresholds(per_slot: Tensor, class_index: Tensor, num_classes: int, default: float) -> Tensor:
    """Per-class median of the chosen thresholds (NaNs dropped); ``default`` for unseen classes."""
    out = torch.full((num_classes,), float(default))
    per_slot, class_index = per_slot.flatten().cpu(), class_index.flatten().cpu()
    for c in range(num_classes):
        values = per_slot[(class_index == c) & ~per_slot.isnan()]
        if values.numel():
            out[c] = values.median()
    return out


class ThresholdCalibrator:
    """Accumulates per-(image, class) thresholds over batches; ``compute`` gives per-class medians."""

    def __init__(self, grid: Sequence[float], objective: str = "keep_delete", rho: float = 0.9,
                 num_classes: int = 1, default: float = 0.25, max_batch: int = 64) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown calibration objective {objective!r}; choose one of {OBJECTIVES}")
        if not grid:
            raise ValueError("the threshold grid is empty")
        self.grid, self.objective, self.rho = list(grid), objective, rho
        self.num_classes, self.default, self.max_batch = num_classes, default, max_batch
        self._thresholds: list[Tensor] = []
        self._classes: list[Tensor] = []

    def update(self, model: Callable[[Tensor], Tensor], images: Tensor, maps: Tensor,
               class_index: Tensor, valid: Tensor) -> Tensor:
        keep, delete, base = masked_confidences(model, images, maps, class_index, valid, self.grid,
                                                self.max_batch)
        chosen = choose_thresholds(keep, delete, base, self.grid, self.objective, self.rho)
        self._thresholds.append(chosen[valid].cpu())
        self._classes.append(class_index.to(valid.device)[valid].cpu())
        return chosen

    @property
    def num_samples(self) -> int:
        return int(sum(t.numel() for t in self._thresholds))

    def compute(self) -> Tensor:
        if not self._thresholds:
            return torch.full((self.num_classes,), float(self.default))
        return aggregate_thresholds(torch.cat(self._thresholds), torch.cat(self._classes),
                                    self.num_classes, self.default)

    def global_threshold(self) -> float:
        if not self._thresholds:
            return float(self.default)
        values = torch.cat(self._thresholds)
        values = values[~values.isnan()]
        return float(values.median()) if values.numel() else float(self.default)
