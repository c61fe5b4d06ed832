"""Stacked tensors such as a transformer's packed q, k, v: a permute that moves the batch to
the second dimension of a stack, `unbind`, and an integer index of the stack.

qkv = linear(x).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4); q, k, v = qkv.unbind(0)
The stack's relevance is (S, B*K, ...): the batch stays whole, one slot per stacked tensor, and
the inverse permute puts the batch first again.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, fx

from wsss.cam.lrp.ops.common import batch_safe_dim, first_signal, varargs
from wsss.cam.lrp.ops.shapes import plan_getitem, plan_permute
from wsss.cam.lrp.ops.types import NodeContext, Shape, Step, UnsupportedOp

_UNBIND = (torch.unbind, "unbind")


def _permute_dims(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of a permute node, or None for any other node."""
    if node.op == "call_method" and node.target == "permute":
        rest = node.args[1:]
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        dims = dims or node.kwargs.get("dims", ())
    elif node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims", ())
    else:
        return None
    rank = len(dims)
    return tuple(d + rank if d < 0 else d for d in dims)


def is_stack(node: Any) -> bool:
    """Is this value a stack: a permute that puts the batch second (dims (s, 0, ...))?"""
    dims = _permute_dims(node) if isinstance(node, fx.Node) else None
    return dims is not None and len(dims) > 1 and dims[1] == 0


def _reads_stack_slots(node: fx.Node) -> bool:
    """Is every user of the node an unbind along dim 0 or an integer index of dim 0?"""
    for user in node.users:
        if user.op in ("call_function", "call_method") and user.target in _UNBIND:
            dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim", 0)
            if dim != 0:
                return False
        elif user.target is not operator.getitem or not isinstance(user.args[1], int):
            return False
    return True


def plan_permute_or_stack(ctx: NodeContext) -> Step:
    """A permute: the batch-first case (shapes.plan_permute), or a stack's permute whose slots
    are then taken one by one."""
    dims = _permute_dims(ctx.node)
    if dims is None:
        dims = varargs(ctx, 1, "dims")
    if dims[0] == 0:
        return plan_permute(ctx)
    if not (is_stack(ctx.node) and _reads_stack_slots(ctx.node)):
        raise UnsupportedOp(
            "it moves the batch dimension (supported: a stack, dims (s, 0, ...), whose slots "
            "are then taken with unbind(0) or an integer index)"
        )
    x = first_signal(ctx)
    inverse = tuple(sorted(range(len(dims)), key=lambda i: dims[i]))
    return Step((x,), (), lambda r, v: [r.permute(inverse)])


def plan_unbind(ctx: NodeContext) -> Step:
    """unbind(dim): the pieces' relevance stacked back (zeros for pieces that got none)."""
    args = ctx.bind(("input", "dim"), dim=0)
    x, dim = ctx.signal(args["input"]), args["dim"]
    stacked = is_stack(x)
    if dim == 0 and not stacked:
        raise UnsupportedOp("it unbinds the batch dimension")
    if dim != 0 and stacked:
        raise UnsupportedOp("it unbinds a stack along a dimension other than its slots")

    def backward(parts: dict[int, Tensor], values: list[Any]) -> list[Tensor]:
        shape = values[0]
        some = next(iter(parts.values()))
        d = 0 if stacked else batch_safe_dim(dim, len(shape))
        count = shape[d]
        pieces = [parts[i] if i in parts else torch.zeros_like(some) for i in range(count)]
        return [torch.stack(pieces, d)]

    return Step((x,), (Shape(x),), backward)


def plan_getitem_or_slot(ctx: NodeContext) -> Step:
    """getitem: an integer slot of a stack, else shapes.plan_getitem."""
    source, index = ctx.node.args
    if not (isinstance(index, int) and is_stack(source)):
        return plan_getitem(ctx)

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        shape = values[0]
        full = r.new_zeros(shape[0], *r.shape)
        full[index] = r
        return [full]

    return Step((source,), (Shape(source),), backward)


__all__ = ["is_stack", "plan_getitem_or_slot", "plan_permute_or_stack", "plan_unbind"]
