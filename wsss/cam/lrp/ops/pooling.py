"""Pooling and means: winner-take-all for max pooling, z⁺ for average pooling and means."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.cam.lrp.ops.types import NodeContext, Step, UnsupportedOp
from wsss.cam.lrp.rules import as_compute, mul_per_image, safe_inverse


def _winner_take_all(r: Tensor, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
    """Each window's relevance to its arg-max input; nothing from windows whose max is 0."""
    r = mul_per_image(r, (y != 0).to(r.dtype))  # the official safe division R ⊘ y
    b, c = x.shape[:2]
    k = r.shape[0] // b
    out = r.new_zeros(b, k, c, x[0, 0].numel())
    flat_index = index.reshape(b, 1, c, -1).expand(b, k, c, index[0, 0].numel())
    out.scatter_add_(3, flat_index, r.reshape(b, k, c, -1))
    return out.view(b * k, *x.shape[1:])


def _pool_params(ctx: NodeContext, names: Sequence[str], **defaults: Any) -> dict[str, Any]:
    if ctx.module is not None:
        return {n: getattr(ctx.module, n) for n in names if hasattr(ctx.module, n)}
    args = ctx.bind(("input",) + tuple(names), **defaults)
    return {n: args[n] for n in names}


def plan_max_pool(ctx: NodeContext) -> Step:
    x = ctx.signal(ctx.args[0])
    p = _pool_params(
        ctx,
        ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
        stride=None,
        padding=0,
        dilation=1,
        ceil_mode=False,
    )
    if (ctx.module is not None and not isinstance(ctx.module, nn.MaxPool2d)) or (
        ctx.module is None and ctx.node.kwargs.get("return_indices", False)
    ):
        raise UnsupportedOp("only 2-d max pooling without returned indices")
    stride = p.get("stride") or p["kernel_size"]

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        x, y = values
        _, index = F.max_pool2d(
            x,
            p["kernel_size"],
            stride,
            p["padding"],
            p["dilation"],
            p["ceil_mode"],
            return_indices=True,
        )
        return [_winner_take_all(r, x, y, index)]

    return Step((x,), (x, ctx.node), backward)


def plan_adaptive_max_pool(ctx: NodeContext) -> Step:
    x = ctx.signal(ctx.args[0])
    size = _pool_params(ctx, ("output_size",))["output_size"]

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        x, y = values
        _, index = F.adaptive_max_pool2d(x, size, return_indices=True)
        return [_winner_take_all(r, x, y, index)]

    return Step((x,), (x, ctx.node), backward)


def _zplus_pool(
    r: Tensor,
    x: Tensor,
    pool: Callable[[Tensor], Tensor],
    transpose: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """z⁺ through a pooling P with non-negative weights, by the sign of each output.

    Where the output Px >= 0: R_in = x⁺ ⊙ Pᵀ(R ⊘ Px⁺) (the official rule: for non-negative
    inputs, as after a ReLU, that is all there is); where Px < 0, the negative parts take its
    relevance instead: x⁻ ⊙ Pᵀ(R ⊘ Px⁻). Conservative wherever the output is not 0.
    """
    like = x[:1].expand(r.shape[0], *x.shape[1:])  # only its shape is read
    if not bool((x < 0).any()):
        return mul_per_image(transpose(mul_per_image(r, safe_inverse(pool(x))), like), x)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    zp, zn = pool(xp), pool(xn)
    up = (zp + zn) >= 0
    sp = mul_per_image(r, safe_inverse(zp).masked_fill_(~up, 0.0))
    sn = mul_per_image(r, safe_inverse(zn).masked_fill_(up, 0.0))
    return mul_per_image(transpose(sp, like), xp) + mul_per_image(transpose(sn, like), xn)


def plan_avg_pool(ctx: NodeContext) -> Step:
    x = ctx.signal(ctx.args[0])
    if ctx.module is not None and not isinstance(ctx.module, nn.AvgPool2d):
        raise UnsupportedOp("only 2-d average pooling")
    p = _pool_params(
        ctx,
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
        stride=None,
        padding=0,
        ceil_mode=False,
        count_include_pad=True,
        divisor_override=None,
    )
    kernel = as_pair(p["kernel_size"])
    stride = as_pair(p["stride"] or p["kernel_size"])
    padding = as_pair(p["padding"])

    def pool(v: Tensor) -> Tensor:
        return F.avg_pool2d(
            v,
            kernel,
            stride,
            padding,
            p["ceil_mode"],
            p["count_include_pad"],
            p["divisor_override"],
        )

    def transpose(s: Tensor, like: Tensor) -> Tensor:
        return torch.ops.aten.avg_pool2d_backward(
            s,
            like,
            kernel,
            stride,
            padding,
            p["ceil_mode"],
            p["count_include_pad"],
            p["divisor_override"],
        )

    return Step(
        (x,), (x,), lambda r, v: [_zplus_pool(r, as_compute(v[0], r.dtype), pool, transpose)]
    )


def plan_adaptive_avg_pool(ctx: NodeContext) -> Step:
    x = ctx.signal(ctx.args[0])
    if ctx.module is not None and not isinstance(ctx.module, nn.AdaptiveAvgPool2d):
        raise UnsupportedOp("only 2-d adaptive average pooling")
    size = _pool_params(ctx, ("output_size",))["output_size"]

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        x = as_compute(values[0], r.dtype)
        out = tuple(
            int(x.shape[-2 + i]) if s is None else int(s) for i, s in enumerate(as_pair(size))
        )
        if out == (1, 1):
            return [_zplus_mean(r, x, (-2, -1), keepdim=True)]
        return [
            _zplus_pool(
                r,
                x,
                lambda v: F.adaptive_avg_pool2d(v, out),
                torch.ops.aten._adaptive_avg_pool2d_backward,
            )
        ]

    return Step((x,), (x,), backward)


def _zplus_mean(r: Tensor, x: Tensor, dims: Sequence[int], keepdim: bool) -> Tensor:
    """z⁺ through a mean over `dims`: R spread in proportion to x⁺ (to x⁻ where the mean is
    negative, as `_zplus_pool`)."""
    dims = tuple(d % x.dim() for d in dims)
    if not keepdim:
        for d in sorted(dims):
            r = r.unsqueeze(d)
    if not bool((x < 0).any()):
        return mul_per_image(r, safe_inverse(x.sum(dims, keepdim=True)) * x)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    zp, zn = xp.sum(dims, keepdim=True), xn.sum(dims, keepdim=True)
    up = (zp + zn) >= 0
    share = torch.where(up, safe_inverse(zp) * xp, safe_inverse(zn) * xn)
    return mul_per_image(r, share)


def plan_mean(ctx: NodeContext) -> Step:
    args = ctx.bind(("input", "dim", "keepdim"), dim=None, keepdim=False)
    x = ctx.signal(args["input"])
    dims, keepdim = args["dim"], args["keepdim"]
    if dims is None:
        raise UnsupportedOp("a mean over all dimensions (including the batch)")
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if 0 in dims:
        raise UnsupportedOp("a mean over the batch dimension")

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        return [_zplus_mean(r, as_compute(values[0], r.dtype), dims, keepdim)]

    return Step((x,), (x,), backward)


def as_pair(v: Any) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
