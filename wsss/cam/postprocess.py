"""From raw maps to usable ones: normalisation, resizing, layer fusion, and aggregation over
scales and horizontal flips. All functions take (B, K, h, w) tensors.

Normalisation modes (``NORMALIZATIONS``), each giving maps in [0, 1] with a maximum of 1:
- ``relu_max``: ReLU, then divide by the maximum (the usual CAM convention);
- ``minmax``: (M - min) / (max - min), as the official Relevance-CAM figures do;
- ``centred``: subtract each map's spatial mean, then ReLU and max. For a CAM-style map
  Σ_c α_c A_c this is Σ_c α_c (A_c - mean A_c): evidence relative to the image's own average
  activation (a self-reference, like Libra-CAM's reference subtraction). It
  removes the positive floor that LRP-z⁺ weights put on channels active everywhere; measured in
  docs/benchmarks.md, it is the pipeline's default.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MapsFn = Callable[[Tensor], Mapping[str, Tensor]]


def relu_max_normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """ReLU, then divide each (image, class) map by its maximum; all-zero maps stay zero."""
    maps = maps.float().clamp(min=0)
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return maps / peak.clamp(min=eps)


def minmax_normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-map (M - min) / (max - min), as the official Relevance-CAM figures do (no ReLU)."""
    maps = maps.float()
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - low) / (high - low).clamp(min=eps)


def centred_normalize(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Subtract each (image, class) map's spatial mean, then ReLU and divide by the maximum."""
    maps = maps.float()
    return relu_max_normalize(maps - maps.mean(dim=(-2, -1), keepdim=True), eps)


NORMALIZATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu_max": relu_max_normalize,
    "minmax": minmax_normalize,
    "centred": centred_normalize,
}


def normalize_maps(maps: Tensor, mode: str = "centred") -> Tensor:
    """Normalise (B, K, h, w) maps to [0, 1] by one of ``NORMALIZATIONS`` (``centred`` by
    default, as the pipeline's cam.normalize)."""
    if mode not in NORMALIZATIONS:
        raise ValueError(
            f"unknown map normalisation {mode!r}; choose one of {sorted(NORMALIZATIONS)}"
        )
    return NORMALIZATIONS[mode](maps)


def upsample(maps: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize of (B, K, h, w) maps to `size` (align_corners=False)."""
    size = tuple(int(s) for s in size[-2:])
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)


def fuse_layers(
    maps: Mapping[str, Tensor],
    size: tuple[int, int] | torch.Size,
    weights: Mapping[str, float] | Sequence[float] | None = None,
) -> Tensor:
    """Weighted mean of several layers' maps, each ReLU-max-normalised and resized first.

    weights: per layer (dict or list in the order of `maps`); equal weights by default.
    The result is renormalised to a maximum of 1 per map. Maps already normalised by
    ``aggregate_scales`` (in any mode) pass through the ReLU-max step unchanged.
    """
    names = list(maps)
    if weights is None:
        w = [1.0] * len(names)
    elif isinstance(weights, Mapping):
        w = [float(weights.get(name, 0.0)) for name in names]
    else:
        w = [float(v) for v in weights]
    if len(w) != len(names) or sum(w) <= 0:
        raise ValueError(f"need one non-negative weight per layer {names} with a positive sum")
    fused = sum(wi * upsample(relu_max_normalize(maps[n]), size) for wi, n in zip(w, names))
    return relu_max_normalize(fused / sum(w))


def aggregate_scales(
    maps_fn: MapsFn | Callable[..., Mapping[str, Tensor]],
    images: Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    targets: Tensor | None = None,
    normalize: str = "centred",
    **call_kwargs,
) -> dict[str, Tensor]:
    """Sum of maps over rescaled (and horizontally flipped) inputs, at the input size.

    maps_fn is `maps_fn(images) -> {layer: (B, K, h, w)}`, or a CAM object called as
    `cam(images, targets, **call_kwargs)` when targets is given. Every raw map is normalised
    (``normalize``, the pipeline's ``centred`` by default, at its own resolution) and resized
    before summing; flipped maps are flipped back. The sum is renormalised to max 1.
    """
    size = images.shape[-2:]
    total: dict[str, Tensor] = {}
    for scale in scales:
        scaled = (
            images
            if scale == 1.0
            else F.interpolate(
                images,
                scale_factor=scale,
                mode="bilinear",
                align_corners=False,
                recompute_scale_factor=False,
            )
        )
        variants = [(scaled, False)] + ([(scaled.flip(-1), True)] if flip else [])
        for inputs, flipped in variants:
            maps = maps_fn(inputs) if targets is None else maps_fn(inputs, targets, **call_kwargs)
            for name, m in maps.items():
                m = upsample(normalize_maps(m, normalize), size)
                m = m.flip(-1) if flipped else m
                total[name] = total[name] + m if name in total else m
    return {name: relu_max_normalize(m) for name, m in total.items()}
