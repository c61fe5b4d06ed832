"""From fused class maps to label maps.

The rule: every present class competes through its margin over its own background threshold; the
best positive margin wins, otherwise the pixel is background.
Pixels whose best margin lies close to zero are marked 255 (ignored by the segmenter's loss).
Refinement of the scores before labelling (PAR, random walk, dense CRF) is in ``refine.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from wsss.label_maps import IGNORE_INDEX


def slot_thresholds(thresholds: Tensor | float, shape: torch.Size, device: torch.device) -> Tensor:
    """A scalar, a one-element tensor or a (B, K) tensor -> (B, K) float32 on ``device``."""
    t = torch.as_tensor(thresholds, dtype=torch.float32, device=device)
    if t.numel() == 1:
        return t.reshape(()).expand(shape)
    if t.shape != shape:
        raise ValueError(
            f"thresholds must be a scalar or one value per slot {tuple(shape)}, "
            f"got shape {tuple(t.shape)}"
        )
    return t


def scores_to_labels(
    scores: Tensor,
    classes: Tensor,
    valid: Tensor,
    thresholds: Tensor | float,
    ignore_band: float = 0.0,
) -> Tensor:
    """Label maps (B, H, W) uint8 from per-slot class scores.

    scores: (B, K, H, W) in [0, 1], one slot per present class; classes: (B, K) mask value of
    each slot's class (1..254); valid: (B, K), False for padding slots, which are ignored;
    thresholds: scalar or (B, K) background threshold per slot.

    A pixel takes the class of the valid slot with the largest margin ``score - threshold`` if
    that margin is positive, else background 0. With ``ignore_band > 0`` pixels whose best margin
    satisfies ``|margin| < ignore_band`` become 255. Images without a valid slot are all
    background. NaN scores never win. Runs on the device of ``scores``.
    """
    if scores.dim() != 4:
        raise ValueError(f"scores must be (B, K, H, W), got shape {tuple(scores.shape)}")
    b, k, h, w = scores.shape
    if classes.shape != (b, k) or valid.shape != (b, k):
        raise ValueError(
            f"classes and valid must be (B, K) = {(b, k)}, got "
            f"{tuple(classes.shape)} and {tuple(valid.shape)}"
        )
    if ignore_band < 0:
        raise ValueError(f"ignore_band must be >= 0, got {ignore_band}")
    device = scores.device
    valid = valid.to(device, torch.bool)
    classes = classes.to(device, torch.long)
    if k == 0:
        return torch.zeros((b, h, w), dtype=torch.uint8, device=device)
    chosen = classes[valid]
    if chosen.numel() and (int(chosen.min()) < 1 or int(chosen.max()) >= IGNORE_INDEX):
        raise ValueError(
            f"classes of valid slots must be mask values 1..{IGNORE_INDEX - 1}, "
            f"got {sorted(set(chosen.tolist()))}"
        )
    margins = scores.float() - slot_thresholds(thresholds, classes.shape, device)[:, :, None, None]
    margins = margins.masked_fill(~valid[:, :, None, None] | margins.isnan(), float("-inf"))
    best, slot = margins.max(dim=1)  # (B, H, W); ties go to the first slot
    labels = torch.gather(classes, 1, slot.flatten(1)).view_as(slot)
    labels = torch.where(best > 0, labels, torch.zeros_like(labels))
    if ignore_band > 0:
        labels = labels.masked_fill(best.abs() < ignore_band, IGNORE_INDEX)
    return labels.to(torch.uint8)
