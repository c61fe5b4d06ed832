"""Resampling and sums: F.interpolate / nn.Upsample, and sums over dimensions.

Interpolation is linear in its input with non-negative weights. Nearest (and nearest-exact)
copies one input per output, so relevance goes back to the copied input (the transpose of the
copy map, conserving). Linear / bilinear / bicubic / trilinear / area mix several inputs: the
z⁺ rule of average pooling, R_in = x⁺ ⊙ Pᵀ(R ⊘ Px⁺) (x⁻ instead where the output is negative).
A sum over dimensions shares like a mean over them (same proportions).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.cam.lrp.ops.pooling import _zplus_pool, plan_mean
from wsss.cam.lrp.ops.types import NodeContext, Step, UnsupportedOp
from wsss.cam.lrp.rules import as_compute

_COPYING = ("nearest", "nearest-exact")


def _interpolate_args(ctx: NodeContext) -> tuple[Any, dict[str, Any]]:
    if ctx.module is not None:
        m: nn.Upsample = ctx.module
        return ctx.signal(ctx.args[0]), dict(
            size=m.size,
            scale_factor=m.scale_factor,
            mode=m.mode,
            align_corners=m.align_corners,
            recompute_scale_factor=m.recompute_scale_factor,
        )
    names = ("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor")
    args = ctx.bind(names, size=None, scale_factor=None, mode="nearest", align_corners=None)
    args.setdefault("recompute_scale_factor", None)
    return ctx.signal(args.pop("input")), {k: args.get(k) for k in names[1:]}


def transpose_of(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """Pᵀ for a linear map P given as a function: the gradient of P, at any input like `like`."""

    def transpose(s: Tensor, like: Tensor) -> Tensor:
        with torch.inference_mode(False), torch.enable_grad():
            v = torch.zeros(like.shape, dtype=s.dtype, device=s.device, requires_grad=True)
            (g,) = torch.autograd.grad(fn(v), v, s.clone())
        return g

    return transpose


def plan_interpolate(ctx: NodeContext) -> Step:
    x, options = _interpolate_args(ctx)
    if options.get("antialias"):
        raise UnsupportedOp("antialiased interpolation")

    def resample(v: Tensor) -> Tensor:
        return F.interpolate(v, **options)

    transpose = transpose_of(resample)

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        v = as_compute(values[0], r.dtype)
        like = v[:1].expand(r.shape[0], *v.shape[1:])
        if options["mode"] in _COPYING:
            return [transpose(r, like)]
        return [_zplus_pool(r, v, resample, transpose)]

    return Step((x,), (x,), backward)


def plan_sum(ctx: NodeContext) -> Step:
    """x.sum(dims) / torch.sum(x, dims): the shares of a mean over the same dimensions."""
    if ctx.node.kwargs.get("dtype") is not None:
        raise UnsupportedOp("a sum with a dtype")
    return plan_mean(ctx)


INTERPOLATIONS = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate)
SUMS = (torch.sum, "sum")
