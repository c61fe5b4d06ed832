"""Padding: nn.ZeroPad / ConstantPad / ReflectionPad / ReplicationPad / CircularPad modules, F.pad
in every mode, and timm's TensorFlow-style "same" padding (amounts computed from the input size).

Constant padding (zeros or any value c): the padded positions hold a constant, which carries no
relevance (like a bias), so relevance there is dropped and the rest is cropped back.
Reflect / replicate / circular: every padded position is a copy of one input position, so its
relevance is added onto the position it copies (the transpose of the copy map: conserving).
A zero pad whose only user is a convolution is folded into that convolution (`padding_folds`):
the conv's rule then sees the unpadded input with the pad inside its linear map, exactly as if
the padding were the conv's own, so every rule (z^B and flat included) treats both the same.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from wsss.cam.lrp.ops.layers import plan_conv
from wsss.cam.lrp.ops.types import NodeContext, Shape, Step, UnsupportedOp

PadAmounts = Callable[[Sequence[int]], tuple[int, ...]]

_MODULE_MODES = (
    ((nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d), "constant"),
    ((nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d), "constant"),
    ((nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d), "reflect"),
    ((nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d), "replicate"),
    ((nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d), "circular"),
)
PAD_MODULES = tuple(t for types, _ in _MODULE_MODES for t in types)


@dataclass(frozen=True)
class PadSpec:
    """A pad node as data: its input, F.pad's mode and value, and the amounts (F.pad's order:
    last dimension first, (before, after) pairs) as a function of the input's shape."""

    source: Any
    mode: str
    value: float
    amounts: PadAmounts


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow's "same" padding along one dimension: (before, after), the odd pixel after."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _pair(v: Any) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _same_amounts(kernel: Any, stride: Any, dilation: Any) -> PadAmounts:
    k, s, d = _pair(kernel), _pair(stride), _pair(dilation)

    def amounts(shape: Sequence[int]) -> tuple[int, ...]:
        h, w = shape[-2:]
        return same_padding(w, k[1], s[1], d[1]) + same_padding(h, k[0], s[0], d[0])

    return amounts


def pad_spec(ctx: NodeContext) -> PadSpec:
    """The PadSpec of a pad module, an F.pad call or a timm pad_same call."""
    if ctx.module is not None:
        mode = next(m for types, m in _MODULE_MODES if isinstance(ctx.module, types))
        fixed = tuple(ctx.module.padding)
        value = float(getattr(ctx.module, "value", 0.0))
        return PadSpec(ctx.signal(ctx.args[0]), mode, value, lambda shape: fixed)
    if getattr(ctx.node.target, "__name__", "") == "pad_same":
        args = ctx.bind(("x", "kernel_size", "stride", "dilation", "value"), dilation=1, value=0)
        amounts = _same_amounts(args["kernel_size"], args["stride"], args["dilation"])
        return PadSpec(ctx.signal(args["x"]), "constant", float(args["value"]), amounts)
    args = ctx.bind(("input", "pad", "mode", "value"), mode="constant", value=None)
    fixed = tuple(args["pad"])
    if any(isinstance(p, fx.Node) for p in fixed):
        raise UnsupportedOp("pad amounts computed in the forward (use fixed amounts)")
    value = 0.0 if args["value"] is None else float(args["value"])
    return PadSpec(ctx.signal(args["input"]), args["mode"], value, lambda shape: fixed)


def unpad(r: Tensor, pads: Sequence[int]) -> Tensor:
    """Relevance at a constant-padded output back to the input: the padded positions dropped
    (negative amounts, which crop in F.pad, get zeros back)."""
    return F.pad(r, tuple(-p for p in pads))


def copy_transpose(r: Tensor, in_shape: Sequence[int], pads: Sequence[int], mode: str) -> Tensor:
    """The transpose of a reflect / replicate / circular pad: each output's relevance added onto
    the input position it copies. r is (N, ..., *padded); the result (N, ..., *in_shape[-k:])."""
    k = len(pads) // 2
    spatial = tuple(in_shape[-k:])
    numel = math.prod(spatial)
    index = torch.arange(numel, dtype=torch.float64, device=r.device).view(1, 1, *spatial)
    source = F.pad(index, tuple(pads), mode=mode).round().long().flatten()
    flat = r.reshape(-1, source.numel())
    out = flat.new_zeros(flat.shape[0], numel).index_add_(1, source, flat)
    return out.view(*r.shape[:-k], *spatial)


def plan_pad(ctx: NodeContext) -> Step:
    spec = pad_spec(ctx)
    if spec.mode not in ("constant", "reflect", "replicate", "circular"):
        raise UnsupportedOp(f"padding mode {spec.mode!r}")

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        shape = values[0]
        pads = spec.amounts(shape)
        if len(pads) // 2 >= len(shape):
            raise RuntimeError(f"RelevanceCAM: {ctx.path} pads the batch dimension")
        if spec.mode == "constant":
            return [unpad(r, pads)]
        return [copy_transpose(r, shape, pads, spec.mode)]

    return Step((spec.source,), (Shape(spec.source),), backward)


# --------------------------------------------------------------------------------------------
# A zero pad folded into the convolution after it
# --------------------------------------------------------------------------------------------

_CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class PadFold:
    """A zero pad node folded into the conv that reads it: the conv's rule reads `source` (the
    pad's input) and pads by `amounts(source shape)` inside its linear map."""

    node: fx.Node
    source: fx.Node
    amounts: PadAmounts


def _is_conv(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, _CONV_MODULES) and getattr(m, "padding_mode", "zeros") == "zeros"
    return node.op == "call_function" and node.target in _CONV_FUNCTIONS


def is_pad(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Is the node a padding op this module knows (a pad module, F.pad, timm's pad_same)?"""
    if node.op == "call_module":
        return isinstance(modules[node.target], PAD_MODULES)
    return node.op == "call_function" and (
        node.target is F.pad or node.target in timm_pad_functions()
    )


def padding_folds(
    nodes: list[fx.Node],
    modules: dict[str, nn.Module],
    context: Callable[[fx.Node], NodeContext],
    keep: set[fx.Node],
) -> dict[fx.Node, PadFold]:
    """conv node -> its PadFold, for each zero pad (not in `keep`) whose only user is a conv
    reading it as its input; context(node) is the pad node's NodeContext."""
    folds = {}
    for conv in nodes:
        pad = conv.args[0] if conv.args else None
        if not isinstance(pad, fx.Node) or not _is_conv(conv, modules):
            continue
        if pad in keep or len(pad.users) != 1 or not is_pad(pad, modules):
            continue
        try:
            spec = pad_spec(context(pad))
        except UnsupportedOp:
            continue
        if spec.mode == "constant" and spec.value == 0.0:
            folds[conv] = PadFold(pad, spec.source, spec.amounts)
    return folds


def plan_conv_same(ctx: NodeContext) -> Step:
    """timm's Conv2dSame (a conv whose "same" padding is computed from the input size, which
    torch.fx cannot trace): one node, the conv's rule with that padding folded into its map."""
    conv = ctx.module
    amounts = _same_amounts(conv.kernel_size, conv.stride, conv.dilation)
    ctx.pad = PadFold(ctx.node, ctx.signal(ctx.args[0]), amounts)
    return plan_conv(ctx)


def timm_pad_functions() -> tuple[Any, ...]:
    """timm's pad_same, if timm is loaded: a function the tracer keeps as one node."""
    fn = getattr(sys.modules.get("timm.layers.padding"), "pad_same", None)
    return (fn,) if fn is not None else ()
