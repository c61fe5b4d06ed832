"""Layer fusion weights chosen without pixel labels, from the classifier's masked queries.

Each candidate weighting of the per-layer maps gives a fused map; its top-q pixels (for a few
area fractions q) are kept alone and deleted, and the candidate whose regions best keep the
class score when kept and take it away when deleted wins. Regions are compared at equal area,
not equal threshold: normalisation makes one threshold mean different areas on different maps.
The queries go through ``masked_confidences``, so they are batched and bounded like the
threshold calibration's.
"""

from __future__ import annotations

from itertools import product
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from wsss.cam.postprocess import fuse_layers
from wsss.pseudo.calibrate import masked_confidences

FUSION_WEIGHTS = ("fixed", "calibrated")
"""The ``pseudo.fusion_weights`` choices: ``cam.layer_weights`` as given, or chosen here."""
AREA_FRACTIONS = (0.1, 0.25, 0.5)
"""Fractions of the image each candidate's top region covers in the queries."""


def simplex_candidates(num_layers: int, steps: int = 2) -> list[list[float]]:
    """The equal weights first, then every weighting with entries in {0, 1/steps, ..., 1} that
    sums to 1 (equal weights not repeated)."""
    if num_layers < 1 or steps < 1:
        raise ValueError(f"need num_layers >= 1 and steps >= 1, got {num_layers}, {steps}")
    equal = [1.0 / num_layers] * num_layers
    out = [equal]
    for counts in product(range(steps + 1), repeat=num_layers):
        if sum(counts) != steps:
            continue
        weights = [c / steps for c in counts]
        if any(abs(a - b) > 1e-9 for a, b in zip(weights, equal)):
            out.append(weights)
    return out


def rank_maps(maps: Tensor) -> Tensor:
    """(..., H, W) -> the same shape, each map replaced by its pixels' rank: 1 for the highest,
    down to 1/N for the lowest (ties in pixel order), so ``rank > 1 - q`` is the top ``q·N``
    pixels whatever the map's scale."""
    flat = maps.flatten(-2)
    n = flat.shape[-1]
    order = torch.argsort(flat, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(flat)
    values = 1.0 - torch.arange(n, device=maps.device, dtype=flat.dtype) / n
    ranks.scatter_(-1, order, values.expand_as(flat))
    return ranks.view_as(maps)


def _rank_grid(fractions: Sequence[float], n: int) -> list[float]:
    """Thresholds on ``rank_maps`` output keeping the top ``ceil(q·N)`` pixels (midway between
    two rank levels, so float rounding cannot move a pixel across)."""
    return [1.0 - (torch.tensor(q * n).ceil().item() - 0.5) / n for q in fractions]


def weighting_confidences(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    layer_maps: Mapping[str, Tensor],
    class_index: Tensor,
    valid: Tensor,
    candidates: Sequence[Sequence[float]],
    fractions: Sequence[float] = AREA_FRACTIONS,
    max_batch: int = 64,
    min_confidence: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Masked confidences of each candidate's top regions: ``keep`` and ``delete`` (B, K, W, Q)
    for W candidates and Q area fractions, ``base`` (B, K). layer_maps: {layer: (B, K, H, W)} at
    the images' size. NaN where the slot is invalid or under ``min_confidence``."""
    b, k = class_index.shape
    fused = torch.stack(
        [fuse_layers(layer_maps, images.shape[-2:], list(w)) for w in candidates], 2
    )  # (B, K, W, H, W')
    w = fused.shape[2]
    ranks = rank_maps(fused).flatten(1, 2)
    grid = _rank_grid(fractions, images.shape[-2] * images.shape[-1])
    keep, delete, base = masked_confidences(
        model,
        images,
        ranks,
        class_index.repeat_interleave(w, 1),
        valid.repeat_interleave(w, 1),
        grid,
        max_batch,
        min_confidence,
    )
    q = len(grid)
    return keep.view(b, k, w, q), delete.view(b, k, w, q), base.view(b, k, w)[..., 0]


def weighting_scores(keep: Tensor, delete: Tensor, base: Tensor) -> Tensor:
    """S(w): the mean over answered pairs and area fractions of (keep - delete) / base;
    keep / delete (S, W, Q), base (S,). Returns (W,); NaN everywhere if no pair answered."""
    answered = ~keep[:, 0, 0].isnan() & (base > 0)
    if not bool(answered.any()):
        return torch.full((keep.shape[1],), float("nan"))
    gain = (keep[answered] - delete[answered]) / base[answered][:, None, None]
    return gain.mean(dim=(0, 2))


def choose_weights(scores: Tensor, candidates: Sequence[Sequence[float]]) -> list[float]:
    """The best-scoring candidate, ties to the first (the equal weights); the first when no pair
    answered (NaN scores)."""
    if scores.numel() != len(candidates):
        raise ValueError(f"{scores.numel()} scores for {len(candidates)} candidates")
    if bool(scores.isnan().all()):
        return [float(v) for v in candidates[0]]
    filled = scores.masked_fill(scores.isnan(), float("-inf"))
    best = int((filled == filled.max()).nonzero()[0])
    return [float(v) for v in candidates[best]]
