"""Pixel pairs within a radius, the affinities' layout: the pair labels that train them (from seed
masks) and the affinities a network's embeddings predict (AffinityNet / IRN)."""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.label_maps import IGNORE_INDEX
from wsss.pseudo.pixels import check_scores, shifted


class Affinities(NamedTuple):
    """Predicted affinities in the half-plane neighbour layout of ``neighbour_offsets(radius)``:
    ``values[b, k, y, x]`` in [0, 1] is the affinity of feature cell (y, x) with
    (y + dy_k, x + dx_k); the feature grid is the image at 1/``stride`` (ceil)."""

    values: Tensor
    radius: int
    stride: int


@lru_cache(maxsize=None)
def neighbour_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """Each unordered pair of cells closer than ``radius`` once: (dy, dx) with
    ``0 < dy^2 + dx^2 < radius^2`` in the half plane dy > 0, or dy = 0 and dx > 0, row-major.
    radius 5 gives 34 offsets (68 neighbours), the AffinityNet / IRN setting."""
    if radius < 2:
        raise ValueError(f"radius must be >= 2 (radius 1 has no neighbour), got {radius}")
    return tuple(
        (dy, dx)
        for dy in range(radius)
        for dx in range(-radius + 1, radius)
        if (dy > 0 or dx > 0) and dy * dy + dx * dx < radius * radius
    )


def downsample_labels(labels: Tensor, stride: int) -> Tensor:
    """(B, H, W) label map -> (B, ceil(H/s), ceil(W/s)): each s x s block takes its label when
    all its pixels share it, else 255 (a block across an edge or the ignore band is uncertain)."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    if stride == 1:
        return labels.long()
    b, h, w = labels.shape
    hs, ws = -(-h // stride), -(-w // stride)
    padded = F.pad(labels.long(), (0, ws * stride - w, 0, hs * stride - h), value=IGNORE_INDEX)
    blocks = padded.view(b, hs, stride, ws, stride).permute(0, 1, 3, 2, 4).flatten(3)
    low, high = blocks.min(-1).values, blocks.max(-1).values
    return torch.where(low == high, low, torch.full_like(low, IGNORE_INDEX))


def affinity_labels(seeds: Tensor, radius: int, stride: int = 1) -> dict[str, Tensor]:
    """Pair labels from a seed label map, in the half-plane layout of ``neighbour_offsets``.

    seeds: (B, H, W), 0 = background, 255 = uncertain; taken to the feature grid first by
    ``downsample_labels(seeds, stride)``. Returns bool (B, K, h, w) tensors, for the pair of cell
    p = (y, x) and p + offset_k:
    - ``bg_pos``: both background;
    - ``fg_pos``: both the same foreground class;
    - ``neg``: two different labels.
    Pairs touching 255, or whose partner falls outside the map, are in none of them.
    """
    cells = downsample_labels(seeds, stride)
    h, w = cells.shape[-2:]
    offsets = neighbour_offsets(radius)
    pad = radius
    padded = F.pad(cells, [pad] * 4, value=IGNORE_INDEX)
    partner = torch.stack([shifted(padded, dy, dx, pad, h, w) for dy, dx in offsets], 1)
    here = cells[:, None].expand_as(partner)
    known = (here != IGNORE_INDEX) & (partner != IGNORE_INDEX)
    same = known & (here == partner)
    return {
        "bg_pos": same & (here == 0),
        "fg_pos": same & (here != 0),
        "neg": known & (here != partner),
    }


def pairwise_affinity(embeddings: Tensor, radius: int) -> Tensor:
    """(B, K, h, w) affinities ``exp(-mean_c |e_c(p) - e_c(q)|)`` between each cell p and
    p + offset_k (``neighbour_offsets(radius)``) of (B, D, h, w) embeddings (AffinityNet);
    0 where the partner is outside the map. Differentiable."""
    check_scores(embeddings, "embeddings")
    h, w = embeddings.shape[-2:]
    pad = radius
    padded = F.pad(embeddings, [pad] * 4)
    inside = F.pad(embeddings.new_ones(1, 1, h, w), [pad] * 4)
    out = []
    for dy, dx in neighbour_offsets(radius):
        distance = (shifted(padded, dy, dx, pad, h, w) - embeddings).abs().mean(1)
        out.append(torch.exp(-distance) * shifted(inside, dy, dx, pad, h, w)[:, 0])
    return torch.stack(out, 1)
