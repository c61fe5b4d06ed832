"""Foreground thresholds without pixel labels, in the style of Libra-CAM.

For each image and present class, the classifier is queried on the image masked by the
thresholded map (the kept region, K = 1[map >= t]) and by its complement (the deleted region),
for every threshold t of a grid. An objective picks one threshold per (image, class); the
per-class threshold is the median over a calibration subset. Only pairs the classifier recognises
on the whole image (confidence >= ``min_confidence``) take part: for a class it does not see, every
mask "keeps" its low confidence and the query says nothing. What a class with few or no pairs
takes is ``fallback``: ``global``, the median over all classes, or ``shrink``, its own median pulled
toward the fixed threshold by ``shrinkage`` pseudo-pairs (no pair: the fixed threshold itself),
so calibration never does worse than the fixed threshold where it knows nothing. Masking multiplies
the normalised image by the {0, 1} mask, so removed pixels take the data-set mean colour. The cut
that was scored is the cut returned (Libra's code returns the next one).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

OBJECTIVES = ("increase", "keep_delete", "area", "delete", "delete_preserve")
"""The ``pseudo.objective`` choices, in the order the config lists them (``choose_thresholds``)."""
FALLBACKS = ("shrink", "global")


def _grid(grid: Sequence[float], device: torch.device) -> Tensor:
    taus = torch.as_tensor(list(grid), dtype=torch.float32, device=device)
    if taus.dim() != 1 or taus.numel() == 0 or not bool(taus.isfinite().all()):
        raise ValueError(
            f"the threshold grid must be a non-empty list of finite numbers, got {list(grid)}"
        )
    return taus


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown calibration objective {objective!r}; choose one of {OBJECTIVES}")


class _EvalMode:
    """Runs an nn.Module in eval mode, then restores every submodule's own mode: a training-mode
    BatchNorm would make the confidences depend on how queries are batched, and would update its
    running statistics on masked images."""

    def __init__(self, model: Callable[[Tensor], Tensor]) -> None:
        self.modes = (
            [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
        )

    def __enter__(self) -> None:
        for module, _ in self.modes:
            module.training = False

    def __exit__(self, *exc: object) -> None:
        for module, mode in self.modes:
            module.training = mode


@torch.no_grad()
def masked_confidences(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    maps: Tensor,
    class_index: Tensor,
    valid: Tensor,
    grid: Sequence[float],
    max_batch: int = 64,
    min_confidence: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid confidence of each slot's class on the image with its map's region kept or deleted.

    images: (B, Ch, H, W) normalised; maps: (B, K, H, W) in [0, 1]; class_index: (B, K) index
    into the (B, C) logits (any value on invalid slots); valid: (B, K). Returns float32
    ``keep`` (B, K, T) on ``image * 1[map >= t]``, ``delete`` (B, K, T) on ``image * 1[map < t]``
    and ``base`` (B, K) on the plain image; invalid slots are NaN and cost no forward pass, and
    so do slots whose ``base`` is under ``min_confidence`` (their keep / delete are NaN).

    Every (valid slot, threshold, keep/delete) query is one row of a batch; rows are sent in
    chunks of ``max_batch`` so memory is bounded whatever B, K and T are. An nn.Module in training
    mode is switched to eval mode for the queries and back afterwards.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if images.dim() != 4 or maps.dim() != 4:
        raise ValueError(
            f"images and maps must be 4-D, got {tuple(images.shape)} and {tuple(maps.shape)}"
        )
    b, k = class_index.shape
    if maps.shape[:2] != (b, k) or valid.shape != (b, k) or images.shape[0] != b:
        raise ValueError(
            f"maps (B, K, H, W), class_index and valid (B, K) disagree: {tuple(maps.shape)}, "
            f"{tuple(class_index.shape)}, {tuple(valid.shape)}, images {tuple(images.shape)}"
        )
    if maps.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"maps are {tuple(maps.shape[-2:])} but images are {tuple(images.shape[-2:])}: "
            "upsample the maps first"
        )
    device = images.device
    taus = _grid(grid, device)
    t = taus.numel()
    maps = maps.to(device)
    valid = valid.to(device, torch.bool)
    index = torch.where(valid, class_index.to(device, torch.long), 0)  # padding may hold anything
    nan = float("nan")

    with _EvalMode(model):
        logits = torch.cat([model(images[i : i + max_batch]) for i in range(0, b, max_batch)])
        num_classes = logits.shape[1]
        if bool(((index < 0) | (index >= num_classes)).any()):
            raise ValueError(f"class_index of a valid slot is outside the {num_classes} logits")
        base = torch.sigmoid(logits.float()).gather(1, index).masked_fill(~valid, nan)

        queried = valid & (base >= min_confidence)
        slot_b, slot_k = queried.nonzero(as_tuple=True)  # (S,) each
        # query q <-> slot q // (2T), threshold (q // 2) % T, keep (q even) or delete (q odd)
        out = torch.empty(slot_b.numel() * t * 2, device=device)
        for start in range(0, out.numel(), max_batch):
            q = torch.arange(start, min(start + max_batch, out.numel()), device=device)
            s, ti, delete = q // (2 * t), (q // 2) % t, (q % 2).bool()
            bi, ki = slot_b[s], slot_k[s]
            kept = maps[bi, ki] >= taus[ti][:, None, None]  # (Q, H, W)
            region = (kept ^ delete[:, None, None]).to(images.dtype)
            probs = torch.sigmoid(model(images[bi] * region[:, None]).float())
            out[q] = probs.gather(1, index[bi, ki][:, None])[:, 0]

    out = out.view(-1, t, 2)
    keep = torch.full((b, k, t), nan, device=device)
    drop = torch.full((b, k, t), nan, device=device)
    keep[slot_b, slot_k] = out[..., 0]
    drop[slot_b, slot_k] = out[..., 1]
    return keep, drop, base


def choose_thresholds(
    keep: Tensor,
    delete: Tensor,
    base: Tensor,
    grid: Sequence[float],
    objective: str,
    rho: float = 0.9,
    delta: float = 0.3,
) -> Tensor:
    """One threshold per (image, slot) from the masked confidences: (B, K), NaN for invalid slots
    (NaN ``base``).

    - ``increase``: Libra's max(0, keep - base); the best threshold, ties to the lowest one (so
      "no gain anywhere" gives the lowest threshold). The scored cut itself is returned.
    - ``keep_delete``: keep - delete, the best threshold, ties to the lowest.
    - ``area``: the largest threshold (smallest kept region) with keep >= rho * base, or the
      lowest threshold of the grid if none qualifies. The smallest *sufficient* region: a
      classifier that recognises a class from a small patch makes it small.
    - ``delete``: the largest threshold (smallest deleted region) with delete <= delta * base:
      the smallest region whose removal takes the evidence away, so every part the classifier
      could still recognise the class from is inside. NaN (no answer, left out of the medians)
      if deleting even the largest region leaves more than ``delta`` of the confidence.
    - ``delete_preserve``: the largest threshold passing ``delete``'s test whose region alone
      also keeps ``rho`` of the confidence: a classifier that leans on one part stops
      ``delete`` at the part, and the preservation test grows the region past it. NaN if no
      threshold passes both.
    """
    _check_objective(objective)
    taus = _grid(grid, keep.device)
    if (
        keep.shape != delete.shape
        or keep.shape[:-1] != base.shape
        or keep.shape[-1] != taus.numel()
    ):
        raise ValueError(
            f"keep/delete must be (B, K, T={taus.numel()}) and base (B, K), got "
            f"{tuple(keep.shape)}, {tuple(delete.shape)}, {tuple(base.shape)}"
        )
    invalid = base.isnan()
    if objective in ("area", "delete", "delete_preserve"):
        # NaN compares False
        kept = keep >= rho * base[..., None]
        deleted = delete <= delta * base[..., None]
        ok = {"area": kept, "delete": deleted, "delete_preserve": kept & deleted}[objective]
        largest = torch.where(ok, taus, float("-inf")).amax(-1)
        fallback = (
            taus.min() if objective == "area" else torch.tensor(float("nan"), device=taus.device)
        )
        chosen = torch.where(ok.any(-1), largest, fallback)
    else:
        score = (keep - base[..., None]).clamp(min=0) if objective == "increase" else keep - delete
        score = score.masked_fill(score.isnan(), float("-inf"))
        ties = score == score.amax(-1, keepdim=True)
        chosen = torch.where(ties, taus, float("inf")).amin(-1)
    return chosen.masked_fill(invalid, float("nan"))


def aggregate_thresholds(
    per_slot: Tensor, class_index: Tensor, num_classes: int, default: float
) -> Tensor:
    """Per-class median of the chosen thresholds, (num_classes,) on the CPU.

    NaNs are dropped; classes without a value get ``default``. The median is the lower median
    (torch.median), so with a grid objective the result is always a threshold that was chosen.
    """
    per_slot, class_index = per_slot.flatten().float().cpu(), class_index.flatten().long().cpu()
    if per_slot.shape != class_index.shape:
        raise ValueError(
            f"per_slot and class_index differ in size: {per_slot.numel()} vs {class_index.numel()}"
        )
    seen = ~per_slot.isnan()
    per_slot, class_index = per_slot[seen], class_index[seen]
    if per_slot.numel() and (int(class_index.min()) < 0 or int(class_index.max()) >= num_classes):
        raise ValueError(
            f"class_index must lie in 0..{num_classes - 1}, got {sorted(set(class_index.tolist()))}"
        )
    out = torch.full((num_classes,), float(default))
    for c in class_index.unique().tolist():
        out[c] = per_slot[class_index == c].median()
    return out


class ThresholdCalibrator:
    """Collects one threshold per (image, present class) over batches, then aggregates them per
    class (``compute``) or over everything (``global_threshold``). Stored on the CPU."""

    def __init__(
        self,
        grid: Sequence[float],
        objective: str = "delete",
        rho: float = 0.9,
        num_classes: int = 1,
        default: float = 0.25,
        max_batch: int = 64,
        min_confidence: float = 0.0,
        delta: float = 0.3,
        fallback: str = "global",
        shrinkage: float = 0.0,
    ) -> None:
        _check_objective(objective)
        if fallback not in FALLBACKS:
            raise ValueError(
                f"unknown calibration fallback {fallback!r}; choose one of {FALLBACKS}"
            )
        if shrinkage < 0:
            raise ValueError(f"shrinkage is a number of pseudo-pairs >= 0, got {shrinkage}")
        self.fallback, self.shrinkage = fallback, float(shrinkage)
        _grid(grid, torch.device("cpu"))
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence is a sigmoid score in [0, 1], got {min_confidence}")
        self.grid, self.objective, self.rho = [float(g) for g in grid], objective, float(rho)
        self.num_classes, self.default, self.max_batch = num_classes, float(default), max_batch
        self.min_confidence, self.delta = float(min_confidence), float(delta)
        self.skipped = 0  # valid pairs left out for low confidence
        self._thresholds: list[Tensor] = []
        self._classes: list[Tensor] = []

    def update(
        self,
        model: Callable[[Tensor], Tensor],
        images: Tensor,
        maps: Tensor,
        class_index: Tensor,
        valid: Tensor,
    ) -> Tensor:
        """Score one batch (see ``masked_confidences``); returns its (B, K) chosen thresholds, NaN
        where the slot is invalid or its confidence is under ``min_confidence``."""
        keep, delete, base = masked_confidences(
            model, images, maps, class_index, valid, self.grid, self.max_batch, self.min_confidence
        )
        return self.update_from_confidences(keep, delete, base, class_index, valid)

    def update_from_confidences(
        self, keep: Tensor, delete: Tensor, base: Tensor, class_index: Tensor, valid: Tensor
    ) -> Tensor:
        """As ``update``, from the output of ``masked_confidences`` (one set of queries can feed
        calibrators with different objectives)."""
        chosen = choose_thresholds(
            keep, delete, base, self.grid, self.objective, self.rho, self.delta
        )
        valid = valid.to(chosen.device, torch.bool)
        confident = valid & (base >= self.min_confidence)
        self.skipped += int((valid & ~confident).sum())
        chosen = chosen.masked_fill(~confident, float("nan"))
        self._thresholds.append(chosen[confident].cpu())
        self._classes.append(class_index.to(chosen.device)[confident].cpu())
        return chosen

    @property
    def num_samples(self) -> int:
        """How many (image, class) pairs gave a threshold."""
        return int(sum(int((~t.isnan()).sum()) for t in self._thresholds))

    def compute(self) -> Tensor:
        """Per-class threshold, (num_classes,): the median of the class's scored pairs, then
        the fallback. ``global``: classes without a pair take the global median (``default``
        when nothing was scored). ``shrink``: (n * median + k * default) / (n + k) for a class
        with n pairs and k = ``shrinkage``; without a pair, ``default`` (the fixed threshold)."""
        if not self._thresholds:
            return torch.full((self.num_classes,), self.default)
        fill = self.global_threshold() if self.fallback == "global" else self.default
        medians = aggregate_thresholds(
            torch.cat(self._thresholds), torch.cat(self._classes), self.num_classes, fill
        )
        if self.fallback == "global" or self.shrinkage == 0:
            return medians
        pairs = torch.tensor(self.pairs_per_class(), dtype=torch.float32)
        return (pairs * medians + self.shrinkage * self.default) / (pairs + self.shrinkage)

    def sources(self) -> list[str]:
        """Where each class's threshold comes from: ``calibrated``, ``shrunk`` toward the fixed
        threshold, or the ``global`` median / the ``fixed`` threshold for a class without pairs."""
        out = []
        for count in self.pairs_per_class():
            if count == 0:
                out.append("global" if self.fallback == "global" else "fixed")
            else:
                out.append(
                    "shrunk" if self.fallback == "shrink" and self.shrinkage > 0 else "calibrated"
                )
        return out

    def pairs_per_class(self) -> list[int]:
        """How many (image, class) pairs gave a threshold, per class: what its median rests on."""
        if not self._classes:
            return [0] * self.num_classes
        answered = ~torch.cat(self._thresholds).isnan()
        return torch.bincount(
            torch.cat(self._classes)[answered].long(), minlength=self.num_classes
        ).tolist()

    def global_threshold(self) -> float:
        """Median over all scored (image, class) pairs; ``default`` before any."""
        values = torch.cat(self._thresholds) if self._thresholds else torch.empty(0)
        values = values[~values.isnan()]
        return float(values.median()) if values.numel() else self.default
