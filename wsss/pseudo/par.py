"""PAR, pixel-adaptive refinement (AFA / ToCo): affinities from colour and position to 8
neighbours at several dilations, no training; scores are averaged over them a few times."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.pseudo.pixels import as_pixel_mask, check_scores, shifted

PAR_DILATIONS = (1, 2, 4, 8, 12, 24)
_EIGHT = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def par_offsets(dilations: Sequence[int] = PAR_DILATIONS) -> list[tuple[int, int]]:
    """The 8 neighbours of a pixel at each dilation, as (dy, dx)."""
    if not dilations or min(dilations) < 1:
        raise ValueError(f"dilations must be positive integers, got {list(dilations)}")
    return [(dy * d, dx * d) for d in dilations for dy, dx in _EIGHT]


def par_affinity(
    images: Tensor,
    valid: Optional[Tensor] = None,
    dilations: Sequence[int] = PAR_DILATIONS,
    colour_scale: float = 0.3,
    position_weight: float = 0.01,
) -> Tensor:
    """(B, N, H, W) weights of each pixel's N = 8 * len(dilations) neighbours (``par_offsets``),
    summing to 1 over the valid ones (0 for neighbours outside the image or ``valid``).

    The colour term is a softmax over neighbours of ``-mean_c (|I_c(q) - I_c(p)| / (s_c(p) *
    colour_scale))^2`` where s_c(p) is the standard deviation of channel c over p's neighbours:
    differences count relative to the local contrast, so the weights do not change under a
    per-channel affine change of the image (normalised or 0..255 images give the same result).
    A position term, a softmax of ``-(distance / s_d / colour_scale)^2`` (s_d: the spread of the
    neighbour distances), weighted by ``position_weight``, prefers near neighbours.
    Pixels with no valid neighbour get all-zero weights.
    """
    check_scores(images, "images")
    b, _, h, w = images.shape
    offsets = par_offsets(dilations)
    pad = max(dilations)
    mask = as_pixel_mask(valid, images)
    img = (
        _standardise(images.float(), mask) * mask
    )  # the weights do not change; fewer rounding errors
    img_pad, mask_pad = F.pad(img, [pad] * 4), F.pad(mask, [pad] * 4)
    present = torch.cat([shifted(mask_pad, dy, dx, pad, h, w) for dy, dx in offsets], 1) * mask
    # local colour spread over the valid neighbours (population standard deviation)
    total, total_sq = torch.zeros_like(img), torch.zeros_like(img)
    for dy, dx in offsets:
        neighbour = shifted(img_pad, dy, dx, pad, h, w)  # 0 outside ``valid``
        total.add_(neighbour)
        total_sq.addcmul_(neighbour, neighbour)
    count = present.sum(1, keepdim=True)
    total, total_sq = total / count.clamp_min(1.0), total_sq / count.clamp_min(1.0)
    inverse = 1.0 / (((total_sq - total * total).clamp_min(0).sqrt() + 1e-8) * colour_scale)
    logits = torch.empty(b, len(offsets), h, w, device=img.device)
    for k, (dy, dx) in enumerate(offsets):
        diff = (shifted(img_pad, dy, dx, pad, h, w) - img).mul_(inverse)
        logits[:, k] = diff.square_().mean(1).neg_()
    colour = torch.softmax(logits.masked_fill_(present == 0, float("-inf")), 1)
    distance = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], device=img.device)
    position = torch.softmax(-((distance / (distance.std() + 1e-8) / colour_scale) ** 2), 0)
    position = position[None, :, None, None] * present
    position = position / position.sum(1, keepdim=True).clamp_min(1e-12)
    colour = colour.masked_fill_(count == 0, 0.0)  # no valid neighbour: all 0 (softmax gave NaN)
    return (colour + position_weight * position) / (1.0 + position_weight)


def _standardise(images: Tensor, mask: Tensor) -> Tensor:
    """Each image's channels shifted and scaled to mean 0, std 1 over its ``mask`` pixels."""
    count = mask.sum((2, 3), keepdim=True).clamp_min(1.0)
    mean = (images * mask).sum((2, 3), keepdim=True) / count
    var = (((images - mean) * mask) ** 2).sum((2, 3), keepdim=True) / count
    return (images - mean) / (var.sqrt() + 1e-8)


def par(
    scores: Tensor,
    images: Tensor,
    valid: Optional[Tensor] = None,
    dilations: Sequence[int] = PAR_DILATIONS,
    iterations: int = 10,
    colour_scale: float = 0.3,
    position_weight: float = 0.01,
) -> Tensor:
    """Pixel-adaptive refinement: ``iterations`` times, each pixel's scores become the weighted
    mean of its neighbours' (weights from ``par_affinity``).

    scores: (B, C, H, W), background included, at the images' size; images: (B, 3 or 1, H, W),
    normalised or not (the weights are invariant to per-channel affine intensity changes);
    valid: optional (B, H, W) pixel mask of the true image inside a padded canvas: padding is
    never a neighbour and keeps its scores. Each output is a convex combination of inputs, so
    distributions stay distributions. float32 result on the inputs' device.
    """
    check_scores(scores)
    check_scores(images, "images")
    if scores.shape[0] != images.shape[0] or scores.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"scores {tuple(scores.shape)} and images {tuple(images.shape)} must share "
            f"batch size and (H, W); resize the scores to the images first"
        )
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    weights = par_affinity(images, valid, dilations, colour_scale, position_weight)
    keep = 1.0 - weights.sum(1, keepdim=True)  # 1 where a pixel has no valid neighbour, else ~0
    offsets, pad = par_offsets(dilations), max(dilations)
    h, w = scores.shape[-2:]
    x = scores.float()
    for _ in range(iterations):
        padded = F.pad(x, [pad] * 4)
        out = x * keep
        for k, (dy, dx) in enumerate(offsets):
            out.addcmul_(weights[:, k : k + 1], shifted(padded, dy, dx, pad, h, w))
        x = out
    return x
