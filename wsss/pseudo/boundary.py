"""Boundary-aware affinities (IRN's inference): a class-boundary map read off the learned local
affinities, and every longer pair's affinity cut by the strongest boundary on the straight path
between its two cells, so that the random walk cannot jump across an edge that a short step
would have to cross."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.pseudo.affinity_pairs import neighbour_offsets
from wsss.pseudo.pixels import check_scores, shifted

ADJACENT = ((0, 1), (1, -1), (1, 0), (1, 1))  # the 8-neighbourhood in the half-plane layout


def boundary_map(affinity: Tensor, radius: int) -> Tensor:
    """(B, 1, h, w) boundary strength in [0, 1]: one minus the lowest affinity between each cell
    and its eight adjacent cells. Inside a region all adjacent affinities are high (0); a cell
    beside an edge has an adjacent cell of the other class (near 1). Cells outside the grid do
    not count (the map's border is not a boundary)."""
    check_scores(affinity, "affinity")
    offsets = neighbour_offsets(radius)
    k, h, w = affinity.shape[1:]
    if k != len(offsets):
        raise ValueError(f"affinity has {k} channels; radius {radius} needs {len(offsets)}")
    values = affinity.float().clamp(0, 1)
    lowest = torch.ones_like(values[:, :1])
    for dy, dx in ADJACENT:
        pair = values[:, offsets.index((dy, dx))][:, None]
        # the pair (p, p + o) is also the pair (q - o, q) of the partner q = p + o
        padded = F.pad(pair, [1] * 4, value=1.0)
        lowest = torch.minimum(lowest, torch.minimum(pair, shifted(padded, -dy, -dx, 1, h, w)))
    return 1.0 - lowest


@lru_cache(maxsize=None)
def path_cells(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    """The cells strictly between (0, 0) and (dy, dx) on the straight line, rounded, without
    repeats: empty for adjacent cells, whose affinity the boundary map was read from."""
    steps = max(abs(dy), abs(dx))
    cells = []
    for i in range(1, steps):
        cell = (round(dy * i / steps), round(dx * i / steps))
        if cell not in cells and cell not in ((0, 0), (dy, dx)):
            cells.append(cell)
    return tuple(cells)


def cut_by_boundaries(affinity: Tensor, radius: int, power: float) -> Tensor:
    """(B, K, h, w) affinities with each pair scaled by (1 - max boundary on its path)^power,
    the path being ``path_cells`` of its offset. power 0 returns the affinities unchanged (the
    plain walk); larger powers cut more sharply. Pairs of adjacent cells are never cut."""
    if power < 0:
        raise ValueError(f"boundary power must be >= 0, got {power}")
    if power == 0:
        return affinity
    boundary = boundary_map(affinity, radius)
    h, w = affinity.shape[-2:]
    pad = radius
    padded = F.pad(boundary, [pad] * 4)
    cut = []
    for k, (dy, dx) in enumerate(neighbour_offsets(radius)):
        strongest = torch.zeros_like(boundary)
        for cy, cx in path_cells(dy, dx):
            strongest = torch.maximum(strongest, shifted(padded, cy, cx, pad, h, w))
        cut.append(affinity[:, k : k + 1].float() * (1.0 - strongest).clamp_min(0) ** power)
    return torch.cat(cut, 1)
