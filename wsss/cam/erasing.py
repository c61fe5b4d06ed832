"""Erasing-style expansion: the classifier is asked again with the region found so far removed,
and the evidence it still has for the class (the rest of the object) is added, bounded by how
much of the class's score is left, until that score falls under a floor (docs/ALGORITHMS.md,
"Erasing-style expansion"). For classes whose classifier fires on a telling part only.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from wsss.cam.libra.filter import masked_score_changes, probabilities

RECOGNISED = 0.5
"""The sigmoid score from which a class counts as seen on the whole image; below it a score
ratio says nothing and the slot is not expanded."""

EvidenceFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""evidence(images (S, ch, H, W), classes (S,), rows (S,)) -> (S, H, W) maps in [0, 1]; ``rows``
are the batch indices the erased images come from (for what the caller keeps per image)."""


@torch.no_grad()
def class_scores(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    """Sigmoid scores (B, K) of each slot's class on the plain images."""
    return probabilities(model(images), "sigmoid").gather(1, targets)


def erase_expand(
    evidence: EvidenceFn,
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    valid: Tensor,
    steps: int,
    floor: float,
    threshold: float,
    chunk: int = 64,
) -> Tensor:
    """The maps (B, K, H, W) in [0, 1] after at most ``steps`` erasing steps.

    Each step erases ``maps >= threshold`` (so far) from each slot's own copy of the image,
    scores the slot's class on it (``masked_score_changes``, the calibration's masked query) and,
    while score / original >= ``floor``, takes ``max(maps, min(1, ratio) * evidence)`` outside the
    erased region. Slots that are invalid or scored under ``RECOGNISED`` stay as they are. All
    slots still going are one batch of ``evidence``.
    """
    if steps < 0 or not 0.0 <= floor <= 1.0 or not 0.0 < threshold <= 1.0:
        raise ValueError(
            f"erasing needs steps >= 0, a score floor in [0, 1] and a threshold in (0, 1], got "
            f"{steps}, {floor}, {threshold}"
        )
    out = maps.float().clone()
    if steps == 0:
        return out
    base = class_scores(model, images, targets)
    going = valid.to(torch.bool) & (base >= RECOGNISED)
    for _ in range(steps):
        if not bool(going.any()):
            break
        kept = (out < threshold).to(images.dtype)  # (B, K, H, W): 1 outside the found region
        changes = masked_score_changes(
            model, images, kept[:, :, None], targets, base, going[..., None], "sigmoid", chunk
        )[..., 0]
        ratio = (base + changes) / base.clamp(min=1e-12)
        going = going & (ratio >= floor)
        rows, slots = going.nonzero(as_tuple=True)
        if rows.numel() == 0:
            break
        keep = kept[rows, slots]  # (S, H, W)
        found = evidence(images[rows] * keep[:, None], targets[rows, slots], rows).float()
        added = ratio[rows, slots].clamp(max=1)[:, None, None] * found * keep
        out[rows, slots] = torch.maximum(out[rows, slots], added)
    return out
