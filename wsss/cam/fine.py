"""The fine-scale gate: a deep fused map says where the object is, a shallow layer's map (or the
pixel-level relevance) says which pixels inside belong to it (docs/ALGORITHMS.md, "Fine-scale
gate"). Thin parts and the gaps between them share one deep cell; the fine map tells them apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.cam.postprocess import relu_max_normalize, upsample


def smooth_box(maps: Tensor, size: int) -> Tensor:
    """Mean over a ``size`` x ``size`` window (odd size; 1 = unchanged) of (B, K, H, W) maps,
    counting only pixels inside the map at its borders."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"the smoothing window must be an odd size >= 1, got {size}")
    if size == 1:
        return maps
    return F.avg_pool2d(maps, size, stride=1, padding=size // 2, count_include_pad=False)


def fine_gate(
    deep: Tensor, fine: Tensor, power: float, smooth: int = 1, eps: float = 1e-12
) -> Tensor:
    """``deep * min(1, F_s / m) ** power``, renormalised to a maximum of 1 per map.

    deep: (B, K, H, W) fused maps in [0, 1]; fine: (B, K, h, w) normalised fine maps (resized to
    H x W here); F_s the fine map smoothed by ``smooth_box`` and m its deep-weighted mean, the
    fine evidence's level inside the object (where it is 0 the gate is 1). power 0 gives ``deep``.
    """
    if power < 0:
        raise ValueError(f"the fine-gate power must be >= 0, got {power}")
    deep = deep.float()
    fine = smooth_box(upsample(fine.float(), deep.shape[-2:]).clamp(min=0), smooth)
    weight = deep.sum((-2, -1), keepdim=True)
    level = (deep * fine).sum((-2, -1), keepdim=True) / weight.clamp(min=eps)
    ratio = (fine / level.clamp(min=eps)).clamp(max=1)
    gate = torch.where(level > eps, ratio, torch.ones_like(ratio))
    return relu_max_normalize(deep * gate**power)
