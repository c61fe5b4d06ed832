"""Per-pixel class distributions, the common currency of the refinements: from fused slot maps
to a distribution over {background, slots}, and back to a label map with an ignore band chosen
from the distribution's own certainty."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from wsss.label_maps import IGNORE_INDEX
from wsss.pseudo.labels import slot_thresholds


def slot_distribution(
    fused: Tensor, valid: Tensor, thresholds: Tensor | float, background: float = 0.5
) -> Tensor:
    """(B, 1+K, H, W) distribution over {background, slots} from fused slot maps.

    fused: (B, K, H, W) in [0, 1]; valid: (B, K) real slots; thresholds: scalar or (B, K) per-slot
    background thresholds, as for ``scores_to_labels``. Background scores ``background`` and slot
    k scores ``max(0, background + fused_k - threshold_k)`` (0 for padding slots), normalised per
    pixel. Its argmax is the label rule of ``scores_to_labels`` (ties go to background), so with
    refinement ``none`` the labels do not change; a slot's score grows with its margin.
    """
    if fused.dim() != 4 or valid.shape != fused.shape[:2]:
        raise ValueError(
            f"fused must be (B, K, H, W) and valid (B, K), got {tuple(fused.shape)} "
            f"and {tuple(valid.shape)}"
        )
    t = slot_thresholds(thresholds, valid.shape, fused.device)
    slots = (background + fused.float() - t[:, :, None, None]).clamp_min(0)
    slots = (
        torch.nan_to_num(slots, nan=0.0) * valid.to(fused.device, torch.float32)[:, :, None, None]
    )
    scores = torch.cat([torch.full_like(slots[:, :1], background), slots], 1)
    return scores / scores.sum(1, keepdim=True)


def distribution_labels(probs: Tensor, classes: Tensor, valid: Tensor) -> Tensor:
    """(B, H, W) uint8 label map: the argmax of (B, 1+K, H, W) ``probs`` over background and the
    valid slots, channel k+1 mapped to mask value ``classes[:, k]``; ties go to the lower channel."""
    b, c = probs.shape[:2]
    if classes.shape != (b, c - 1) or valid.shape != (b, c - 1):
        raise ValueError(
            f"classes and valid must be (B, K) = {(b, c - 1)} for {c} channels, got "
            f"{tuple(classes.shape)} and {tuple(valid.shape)}"
        )
    keep = torch.cat([valid.new_ones(b, 1), valid], 1).to(probs.device, torch.bool)
    choice = probs.float().masked_fill(~keep[:, :, None, None], float("-inf")).argmax(1)
    lookup = torch.cat([classes.new_zeros(b, 1), classes], 1).to(probs.device, torch.long)
    return torch.gather(lookup, 1, choice.flatten(1)).view_as(choice).to(torch.uint8)


def top2_margin(probs: Tensor) -> Tensor:
    """(B, H, W) difference between the two largest channels of a (B, C, H, W) distribution
    (1 for a single channel): 0 where two classes tie, 1 where one takes everything."""
    if probs.shape[1] < 2:
        return probs.new_ones(probs.shape[:1] + probs.shape[2:])
    top = probs.float().topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def confidence_levels(probs: Tensor) -> Tensor:
    """(B, H, W) uint8 confidence of each pixel's label, 0..255: ``top2_margin`` of the
    distribution, rounded to 8 bits, the form the pseudo-mask stages store beside the masks."""
    return (top2_margin(probs) * 255.0).round().clamp(0, 255).to(torch.uint8)


def ignore_uncertain(
    labels: Tensor,
    probs: Tensor,
    margin: Optional[float] = None,
    quantile: Optional[float] = None,
    pixel_mask: Optional[Tensor] = None,
) -> Tensor:
    """Labels with the uncertain pixels set to 255, chosen from the refined scores alone.

    A pixel is uncertain when the margin between its two best classes (``top2_margin`` of the
    refined distribution ``probs``) is below a band:
    - ``margin``: a fixed band in probability units (0.1 = the winner leads by under 10 points);
    - ``quantile``: per image, the band is that quantile of the image's own margins over
      ``pixel_mask`` (e.g. 0.1 ignores each image's least certain 10 %), so it adapts to how
      sharp each image's maps are;
    - both: the smaller of the two bands, so a confident image loses no more than ``margin``
      allows and an unsure one no more than ``quantile`` of its pixels.
    Neither: labels unchanged. Pixels already 255 stay 255; pixels outside ``pixel_mask``
    (B, H, W) are left as they are.
    """
    if margin is None and quantile is None:
        return labels
    if quantile is not None and not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if margin is not None and margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    gaps = top2_margin(probs)
    b = gaps.shape[0]
    inside = (
        torch.ones_like(gaps, dtype=torch.bool)
        if pixel_mask is None
        else pixel_mask.to(gaps.device, torch.bool).expand_as(gaps)
    )
    band = gaps.new_full((b,), math.inf if margin is None else float(margin))
    if quantile is not None:
        for i in range(b):
            values = gaps[i][inside[i]]
            if values.numel():
                band[i] = torch.minimum(band[i], torch.quantile(values, quantile))
    uncertain = (gaps < band[:, None, None]) & inside
    return labels.masked_fill(uncertain.to(labels.device), IGNORE_INDEX)
