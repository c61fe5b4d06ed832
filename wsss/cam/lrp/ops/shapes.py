"""Ops that only move values: concatenation, chunk / split, indexing, reshapes, permutes and
channel shuffle. Relevance goes back to where each value came from."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from wsss.cam.lrp.ops.common import batch_safe_dim, first_signal, varargs
from wsss.cam.lrp.ops.types import NodeContext, Part, Shape, Step, UnsupportedOp


def plan_cat(ctx: NodeContext) -> Step:
    args = ctx.bind(("tensors", "dim"), dim=0)
    tensors, dim = list(args["tensors"]), args["dim"]
    sources = [t for t in tensors if ctx.is_signal(t)]
    if not sources:
        raise UnsupportedOp("none of its inputs depends on the image")
    is_source = [ctx.is_signal(t) for t in tensors]

    def backward(r: Tensor, shapes: list[Any]) -> list[Tensor]:
        d = batch_safe_dim(dim, len(shapes[0]))
        sizes = [s[d] for s in shapes]
        pieces = r.split(sizes, dim=d)
        return [p for p, keep in zip(pieces, is_source) if keep]

    if dim == 0:
        raise UnsupportedOp("it concatenates along the batch dimension")
    return Step(tuple(sources), tuple(Shape(t) for t in tensors), backward)


def plan_stack(ctx: NodeContext) -> Step:
    """torch.stack: each input gets its slice of the new dimension back."""
    args = ctx.bind(("tensors", "dim"), dim=0)
    tensors, dim = list(args["tensors"]), args["dim"]
    is_source = [ctx.is_signal(t) for t in tensors]
    if not any(is_source):
        raise UnsupportedOp("none of its inputs depends on the image")
    if dim == 0:
        raise UnsupportedOp("it stacks along the batch dimension")

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        d = dim if dim >= 0 else dim + r.dim()
        return [p for p, keep in zip(r.unbind(d), is_source) if keep]

    return Step(tuple(t for t, keep in zip(tensors, is_source) if keep), (), backward)


def _piece_sizes(length: int, how: str, amount: Any) -> list[int]:
    """The lengths torch.chunk / torch.split give along one dimension."""
    if how == "chunk":
        return [len(c) for c in torch.arange(length).chunk(amount)]
    if isinstance(amount, int):
        return [len(c) for c in torch.arange(length).split(amount)]
    return list(amount)


def _plan_pieces(ctx: NodeContext, how: str, names: Sequence[str], amount_name: str) -> Step:
    args = ctx.bind(names, dim=0)
    x, amount, dim = ctx.signal(args["input"]), args[amount_name], args["dim"]
    if dim == 0:
        raise UnsupportedOp("it splits the batch dimension")

    def backward(parts: dict[int, Tensor], values: list[Any]) -> list[Tensor]:
        shape = values[0]
        d = batch_safe_dim(dim, len(shape))
        sizes = _piece_sizes(shape[d], how, amount)
        some = next(iter(parts.values()))
        pieces = []
        for i, size in enumerate(sizes):
            if i in parts:
                pieces.append(parts[i])
            else:
                piece_shape = list(some.shape)
                piece_shape[d] = size
                pieces.append(some.new_zeros(piece_shape))
        return [torch.cat(pieces, dim=d)]

    return Step((x,), (Shape(x),), backward)


def plan_chunk(ctx: NodeContext) -> Step:
    return _plan_pieces(ctx, "chunk", ("input", "chunks", "dim"), "chunks")


def plan_split(ctx: NodeContext) -> Step:
    return _plan_pieces(
        ctx, "split", ("input", "split_size_or_sections", "dim"), "split_size_or_sections"
    )


def plan_getitem(ctx: NodeContext) -> Step:
    source, index = ctx.node.args
    if ctx.is_multi_output(source):
        if not isinstance(index, int):
            raise UnsupportedOp("it indexes a chunk / split result with a non-integer")
        return Step((source,), (), lambda r, v: [Part(index, r)])
    ctx.signal(source)
    idx = index if isinstance(index, tuple) else (index,)
    if not idx or idx[0] != slice(None) or not all(isinstance(i, (int, slice)) for i in idx):
        raise UnsupportedOp(
            f"tensor indexing {index!r} (supported: integers and slices, the "
            "batch dimension kept whole)"
        )

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        full = r.new_zeros(r.shape[0], *values[0][1:])
        full[idx] = r
        return [full]

    return Step((source,), (Shape(source),), backward)


# --------------------------------------------------------------------------------------------
# Reshaping
# --------------------------------------------------------------------------------------------


def plan_reshape(ctx: NodeContext) -> Step:
    """flatten / view / reshape / squeeze / unsqueeze / unflatten: relevance reshaped back."""
    x = first_signal(ctx)

    def backward(r: Tensor, shapes: list[Any]) -> list[Tensor]:
        in_shape, out_shape = shapes
        if in_shape[0] != out_shape[0]:
            raise RuntimeError(
                f"RelevanceCAM: node {ctx.node.name!r} ({ctx.path}) reshapes "
                f"{tuple(in_shape)} to {tuple(out_shape)}, mixing the batch "
                "dimension with others"
            )
        return [r.reshape(r.shape[0], *in_shape[1:])]

    return Step((x,), (Shape(x), Shape(ctx.node)), backward)


def plan_permute(ctx: NodeContext) -> Step:
    x = first_signal(ctx)
    if ctx.node.op == "call_method":
        dims = varargs(ctx, 1, "dims")
    else:
        dims = tuple(ctx.bind(("input", "dims"))["dims"])
    rank = len(dims)
    dims = tuple(d + rank if d < 0 else d for d in dims)
    if dims[0] != 0:
        raise UnsupportedOp("it moves the batch dimension")
    inverse = tuple(sorted(range(rank), key=lambda i: dims[i]))
    return Step((x,), (), lambda r, v: [r.permute(inverse)])


def plan_transpose(ctx: NodeContext) -> Step:
    args = ctx.bind(("input", "dim0", "dim1"))
    x = ctx.signal(args["input"])
    d0, d1 = args["dim0"], args["dim1"]
    if 0 in (d0, d1):
        raise UnsupportedOp("it moves the batch dimension")
    return Step((x,), (), lambda r, v: [r.transpose(d0, d1)])


def _unshuffle(r: Tensor, groups: int) -> Tensor:
    n, c = r.shape[:2]
    return r.reshape(n, c // groups, groups, *r.shape[2:]).transpose(1, 2).reshape(r.shape)


def plan_channel_shuffle(ctx: NodeContext) -> Step:
    if ctx.module is not None:
        x, groups = ctx.signal(ctx.args[0]), ctx.module.groups
    else:
        args = ctx.bind(("input", "groups"))
        x, groups = ctx.signal(args["input"]), args["groups"]
    return Step((x,), (), lambda r, v: [_unshuffle(r, groups)])
