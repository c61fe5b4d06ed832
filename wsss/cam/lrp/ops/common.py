"""Helpers every op family uses, and the two generic plans: pass-through and a user's
single-input rule."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import Tensor, fx

from wsss.cam.lrp.ops.types import NodeContext, Step, UnsupportedOp
from wsss.cam.lrp.rules import as_compute


def first_signal(ctx: NodeContext) -> fx.Node:
    for value in ctx.node.args:
        if ctx.is_signal(value):
            return value
    for value in ctx.node.kwargs.values():
        if ctx.is_signal(value):
            return value
    raise UnsupportedOp("none of its inputs depends on the image")


def reduce_to(r: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum relevance (N, *out) over the dimensions along which an operand of `shape` was
    broadcast, giving (N, *shape[1:])."""
    if tuple(r.shape[1:]) == tuple(shape[1:]):
        return r
    if len(shape) != r.dim():
        raise RuntimeError(
            f"cannot return relevance of shape {tuple(r.shape)} to an operand of "
            f"shape {tuple(shape)} (broadcast over the batch dimension)"
        )
    dims = [i for i in range(1, r.dim()) if shape[i] == 1 and r.shape[i] != 1]
    return r.sum(dims, keepdim=True) if dims else r


def batch_safe_dim(dim: int, rank: int) -> int:
    dim = dim + rank if dim < 0 else dim
    if dim == 0:
        raise UnsupportedOp("it acts along the batch dimension")
    return dim


def varargs(ctx: NodeContext, start: int, name: str) -> Any:
    """Methods like x.permute(0, 2, 1) or x.permute((0, 2, 1)) / x.permute(dims=...)."""
    rest = ctx.node.args[start:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return tuple(rest[0])
    if rest:
        return tuple(rest)
    return tuple(ctx.node.kwargs[name])


def plan_pass(ctx: NodeContext) -> Step:
    """Relevance passes unchanged to the op's first signal input (activations, dropout, BN in
    the reference's treatment, LayerNorm / GroupNorm with their statistics held constant)."""
    return Step((first_signal(ctx),), (), lambda r, values: [r])


def plan_custom(ctx: NodeContext, fn: Callable[..., Tensor]) -> Step:
    """A user rule fn(module, input, output, relevance) for a single-input op."""
    x_node = first_signal(ctx)

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        x, y = as_compute(values[0], r.dtype), as_compute(values[1], r.dtype)
        b = x.shape[0]
        out = fn(ctx.module, x, y, r.view(b, -1, *r.shape[1:]))
        return [out.reshape(r.shape[0], *x.shape[1:])]

    return Step((x_node,), (x_node, ctx.node), backward)
