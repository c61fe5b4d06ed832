"""The random walk (AffinityNet / IRN): learned affinities between each pixel and its neighbours
within a radius, at feature resolution, raised to a power ``beta`` and row-normalised into a
transition matrix kept in sparse neighbour form; scores diffuse ``steps`` times."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.pseudo.affinity_pairs import Affinities, neighbour_offsets
from wsss.pseudo.boundary import cut_by_boundaries
from wsss.pseudo.pixels import as_pixel_mask, check_scores, shifted


def walk_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """The neighbours a random-walk step reads, in the order of ``transition_weights``'s
    channels: the cell itself, then each ``neighbour_offsets(radius)`` offset, then each negated."""
    half = neighbour_offsets(radius)
    return ((0, 0),) + half + tuple((-dy, -dx) for dy, dx in half)


def transition_weights(
    affinity: Tensor, radius: int, beta: float = 8.0, valid: Optional[Tensor] = None
) -> Tensor:
    """(B, 2K+1, h, w) rows of the random walk's transition matrix in sparse neighbour form:
    channel j holds T[p, p + walk_offsets(radius)[j]] at cell p.

    affinity: (B, K, h, w) in the half-plane layout of ``neighbour_offsets(radius)``. Each pair's
    affinity, raised to ``beta``, links both ways (a symmetric matrix A); every cell links to
    itself with weight 1; rows are normalised, T = D^-1 A. Cells outside ``valid`` (B, h, w)
    neither link nor are linked (their row is the identity); nor are cells outside the grid.
    """
    check_scores(affinity, "affinity")
    offsets = neighbour_offsets(radius)
    k, h, w = affinity.shape[1:]
    if k != len(offsets):
        raise ValueError(f"affinity has {k} channels; radius {radius} needs {len(offsets)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    mask = as_pixel_mask(valid, affinity)
    pad = radius - 1
    mask_pad = F.pad(mask, [pad] * 4)
    partner = torch.cat([shifted(mask_pad, dy, dx, pad, h, w) for dy, dx in offsets], 1)
    forward = affinity.float().clamp(0, 1) ** beta * mask * partner  # A(p, p + o)
    padded = F.pad(forward, [pad] * 4)
    backward = torch.stack(
        [
            shifted(padded[:, i], -dy, -dx, pad, h, w)  # A(p - o, p)
            for i, (dy, dx) in enumerate(offsets)
        ],
        1,
    )
    weights = torch.cat([torch.ones_like(mask), forward, backward], 1)
    return weights / weights.sum(1, keepdim=True)


def random_walk(
    scores: Tensor,
    affinity: Tensor,
    radius: int,
    beta: float = 8.0,
    steps: int = 256,
    valid: Optional[Tensor] = None,
) -> Tensor:
    """Diffuse (B, C, h, w) scores ``steps`` times with the transition matrix of
    ``transition_weights``: x <- T x, each cell's scores becoming the weighted mean of its own and
    its neighbours'. T's rows are distributions, so a distribution per cell stays one; identity
    affinities (all 0) change nothing. Memory O((C + 2K) h w), never (hw)^2; time O(steps K C h w).

    How far scores travel grows with sqrt(steps) cells, so ``steps`` scales with the square of
    the grid side: IRN's 256 suit a 128-cell grid (512 px at stride 4); a 28-cell grid (112 px)
    wants about 256 * (28/128)^2 = 12, and more steps there wash the maps out (measured).
    """
    check_scores(scores)
    if scores.shape[0] != affinity.shape[0] or scores.shape[-2:] != affinity.shape[-2:]:
        raise ValueError(
            f"scores {tuple(scores.shape)} and affinity {tuple(affinity.shape)} must "
            f"share batch size and grid (h, w)"
        )
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    weights = transition_weights(affinity, radius, beta, valid)
    offsets = walk_offsets(radius)
    h, w = scores.shape[-2:]
    pad = radius - 1
    x = scores.float()
    for _ in range(steps):
        padded = F.pad(x, [pad] * 4)
        out = x * weights[:, :1]
        for j in range(1, len(offsets)):
            dy, dx = offsets[j]
            out.addcmul_(weights[:, j : j + 1], shifted(padded, dy, dx, pad, h, w))
        x = out
    return x


def random_walk_refine(
    scores: Tensor,
    affinities: Affinities,
    valid: Optional[Tensor] = None,
    beta: float = 8.0,
    steps: int = 256,
    boundary_power: float = 0.0,
) -> Tensor:
    """The random walk on image-resolution scores: (B, C, H, W) scores are averaged into the
    affinities' feature grid (over ``valid`` pixels only), walked, and upsampled back
    (bilinear). Pixels outside ``valid`` (B, H, W) keep their scores. ``boundary_power`` > 0
    first cuts each longer pair by the boundaries on its path (``cut_by_boundaries``)."""
    check_scores(scores)
    height, width = scores.shape[-2:]
    stride, values = affinities.stride, affinities.values
    h, w = values.shape[-2:]
    if (h, w) != (-(-height // stride), -(-width // stride)):
        raise ValueError(
            f"affinity grid {(h, w)} does not match scores of size {(height, width)} "
            f"at stride {stride} (expected ceil(H/stride), ceil(W/stride))"
        )
    mask = as_pixel_mask(valid, scores)
    pad = (0, w * stride - width, 0, h * stride - height)
    total = F.avg_pool2d(F.pad(scores.float() * mask, pad), stride)
    count = F.avg_pool2d(F.pad(mask, pad), stride)
    cells = total / count.clamp_min(1e-8)
    known = (count > 0).float()
    values = cut_by_boundaries(values, affinities.radius, boundary_power)
    walked = random_walk(cells, values, affinities.radius, beta, steps, valid=known[:, 0] > 0)
    # upsampled as a normalised convolution, so cells outside ``valid`` do not bleed in
    size = (h * stride, w * stride)
    up = F.interpolate(walked * known, size=size, mode="bilinear", align_corners=False)
    weight = F.interpolate(known, size=size, mode="bilinear", align_corners=False)
    up = (up / weight.clamp_min(1e-8))[..., :height, :width]
    return torch.where(mask > 0, up, scores.float())
