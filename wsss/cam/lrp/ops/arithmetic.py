"""Add, sub, mul and div: residual splits, constants passed through, gates held constant."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from wsss.cam.lrp.ops.common import reduce_to
from wsss.cam.lrp.ops.types import NodeContext, Shape, Step, UnsupportedOp
from wsss.cam.lrp.rules import as_compute, mul_per_image, safe_inverse


def residual_split(r: Tensor, a: Tensor, b: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Relevance of out = a + b split between the operands by `mode` (signed / positive / abs)."""
    if mode == "positive":
        a, b = a.clamp(min=0), b.clamp(min=0)
    elif mode == "abs":
        a, b = a.abs(), b.abs()
    inv = safe_inverse(a + b)
    return mul_per_image(r, a * inv), mul_per_image(r, b * inv)


def _plan_sum(ctx: NodeContext, sign: float) -> Step:
    args = ctx.bind(("input", "other"), alpha=1)
    if args["alpha"] != 1:
        raise UnsupportedOp("add / sub with alpha != 1")
    a, b = args["input"], args["other"]
    signals = [v for v in (a, b) if ctx.is_signal(v)]
    if not signals:
        raise UnsupportedOp("none of its inputs depends on the image")
    if len(signals) == 1:  # a signal plus a constant (bias-like): pass-through
        (s,) = signals
        return Step((s,), (Shape(s),), lambda r, v: [reduce_to(r, v[0])])
    mode = ctx.config.residual

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        va, vb = as_compute(values[0], r.dtype), as_compute(values[1], r.dtype)
        ra, rb = residual_split(r, va, sign * vb, mode)  # broadcasts if shapes differ
        return [reduce_to(ra, va.shape), reduce_to(rb, vb.shape)]

    return Step((a, b), (a, b), backward)


def plan_add(ctx: NodeContext) -> Step:
    return _plan_sum(ctx, 1.0)


def plan_sub(ctx: NodeContext) -> Step:
    return _plan_sum(ctx, -1.0)


def plan_mul(ctx: NodeContext) -> Step:
    args = ctx.bind(("input", "other"))
    a, b = args["input"], args["other"]
    signals = [v for v in (a, b) if ctx.is_signal(v)]
    if len(signals) == 2:
        gates = [ctx.is_gate(v) for v in (a, b)]
        if gates.count(True) != 1:
            raise UnsupportedOp(
                "it multiplies two signals, neither (or both) of them a gate "
                "(an output of sigmoid / hardsigmoid / softmax)"
            )
        gated = b if gates[0] else a
        return Step((gated,), (Shape(gated),), lambda r, v: [reduce_to(r, v[0])])
    if not signals:
        raise UnsupportedOp("none of its inputs depends on the image")
    (s,) = signals  # times a constant (e.g. a layer scale): pass-through
    return Step((s,), (Shape(s),), lambda r, v: [reduce_to(r, v[0])])


def plan_div(ctx: NodeContext) -> Step:
    args = ctx.bind(("input", "other"))
    if ctx.is_signal(args["other"]):
        raise UnsupportedOp("it divides by a signal (only division by a constant is supported)")
    s = ctx.signal(args["input"])
    return Step((s,), (Shape(s),), lambda r, v: [reduce_to(r, v[0])])
