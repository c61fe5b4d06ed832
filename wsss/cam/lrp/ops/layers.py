"""Conv and Linear layers (modules, and F.linear / F.conv*d with constant weights): the LRP rule
the composite picks for the layer, with a BatchNorm the canonizer folded in."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn import grad as nn_grad

from wsss.cam.lrp.canonize import BATCHNORMS
from wsss.cam.lrp.ops.types import NodeContext, Step, UnsupportedOp
from wsss.cam.lrp.rules import LinearMap, Rule, as_compute, propagate

_CONV_FUNCTIONS = {
    1: (F.conv1d, nn_grad.conv1d_input),
    2: (F.conv2d, nn_grad.conv2d_input),
    3: (F.conv3d, nn_grad.conv3d_input),
}


def _conv_padding(conv: nn.Module) -> tuple[int, ...]:
    n = len(conv.kernel_size)
    if conv.padding == "valid":
        return (0,) * n
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                raise UnsupportedOp("padding='same' with an even kernel pads unevenly")
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)


def _padded_shape(shape: Sequence[int], pads: Sequence[int]) -> tuple[int, ...]:
    out = list(shape)
    for i in range(len(pads) // 2):
        out[-1 - i] += pads[2 * i] + pads[2 * i + 1]
    return tuple(out)


def conv_map(
    conv: nn.Module,
    x_shape: Sequence[int],
    weight: Tensor,
    bias: Tensor | None,
    pre_pad: Sequence[int] = (),
) -> LinearMap:
    """A ConvNd as a LinearMap (stride, padding, dilation and groups respected), after a zero
    pad of `pre_pad` (F.pad's order) folded in: the map then reads the unpadded input."""
    n = len(conv.kernel_size)
    fwd, input_grad = _CONV_FUNCTIONS[n]
    stride, dilation, groups, padding = conv.stride, conv.dilation, conv.groups, _conv_padding(conv)
    pre_pad = tuple(pre_pad)
    in_shape = _padded_shape(tuple(x_shape[1:]), pre_pad)

    def forward(inp: Tensor, w: Tensor) -> Tensor:
        inp = F.pad(inp, pre_pad) if any(pre_pad) else inp
        return fwd(inp, w, None, stride, padding, dilation, groups)

    def backward(s: Tensor, w: Tensor) -> Tensor:
        g = input_grad((s.shape[0], *in_shape), w, s, stride, padding, dilation, groups)
        return F.pad(g, tuple(-p for p in pre_pad)) if any(pre_pad) else g

    return LinearMap(weight, bias, forward, backward, (1, -1) + (1,) * n)


def linear_map(weight: Tensor, bias: Tensor | None) -> LinearMap:
    """nn.Linear over the last dimension (any leading dimensions) as a LinearMap."""

    def backward(s: Tensor, w: Tensor) -> Tensor:
        # one 2-d product: a permuted (channels-last) s would otherwise run as a slow batched one
        return (s.reshape(-1, s.shape[-1]) @ w).view(*s.shape[:-1], w.shape[1])

    return LinearMap(weight, bias, lambda inp, w: F.linear(inp, w), backward, (-1,))


def plan_conv(ctx: NodeContext) -> Step:
    conv = ctx.module
    if conv.padding_mode != "zeros":
        raise UnsupportedOp(f"padding_mode={conv.padding_mode!r} (only 'zeros' is supported)")
    if len(conv.kernel_size) not in _CONV_FUNCTIONS:
        raise UnsupportedOp(f"{len(conv.kernel_size)}-d convolution")
    _conv_padding(conv)  # fails early on uneven 'same' padding
    rule, fold, pad = ctx.layer_rule, ctx.fold, ctx.pad
    x_node = pad.source if pad is not None else ctx.signal(ctx.args[0])
    reads = (x_node,) + _output_read(ctx)

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        x = as_compute(values[0], r.dtype)
        weight = conv.weight.detach().to(r.dtype)
        bias = conv.bias.detach().to(r.dtype) if conv.bias is not None else None
        if fold is not None:
            weight, bias = fold.fold_into(weight, bias)
        y = as_compute(values[1], r.dtype) if len(values) > 1 else None
        pre_pad = pad.amounts(x.shape) if pad is not None else ()
        return [propagate(rule, conv_map(conv, x.shape, weight, bias, pre_pad), x, r, y)]

    return Step((x_node,), reads, backward)


def _output_read(ctx: NodeContext) -> tuple[fx.Node, ...]:
    """The layer's output, for the sign-aware γ rule: after a folded BatchNorm. When the folded
    node's value is not the affine map's (a BatchNorm subclass made one node with its activation)
    nothing is read, and γ computes the output from x and the folded weights."""
    if ctx.layer_rule.kind != "gamma":
        return ()
    fold = ctx.fold
    if fold is None:
        return (ctx.node,)
    affine = fold.node.op == "call_function" or type(fold.batchnorm) in BATCHNORMS
    return (fold.node,) if affine else ()


def reads_linear_output(rule: Rule) -> bool:
    """Does a Linear layer's rule use its recorded output y = Wx + b? γ needs it; ε with the
    bias counted once and z⁺ on signed inputs save a product with it."""
    return rule.kind in ("gamma", "zplus") or (rule.kind == "epsilon" and rule.bias == 1.0)


def linear_output(rule: Rule, value: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The recorded output as the rule takes it: γ in any dtype, the others only when it was
    computed in the relevance dtype (under autocast they compute it again, in full precision)."""
    if rule.kind == "gamma":
        return as_compute(value, dtype)
    return value if value.dtype == dtype else None


def plan_linear(ctx: NodeContext) -> Step:
    lin, rule = ctx.module, ctx.layer_rule
    x_node = ctx.signal(ctx.args[0])
    reads = (x_node, ctx.node) if reads_linear_output(rule) else (x_node,)

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        x = as_compute(values[0], r.dtype)
        weight = lin.weight.detach().to(r.dtype)
        bias = lin.bias.detach().to(r.dtype) if lin.bias is not None else None
        y = linear_output(rule, values[1], r.dtype) if len(values) > 1 else None
        return [propagate(rule, linear_map(weight, bias), x, r, y)]

    return Step((x_node,), reads, backward)


def _ntuple(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


class _ConvParams:
    """A functional conv's arguments, shaped like the nn.ConvNd attributes conv_map reads."""

    def __init__(
        self,
        n: int,
        weight_shape: Sequence[int],
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: int,
    ):
        self.kernel_size = tuple(weight_shape[2:])
        self.stride, self.dilation = _ntuple(stride, n), _ntuple(dilation, n)
        self.padding = padding if isinstance(padding, str) else _ntuple(padding, n)
        self.groups = groups


def plan_functional_layer(ctx: NodeContext) -> Step:
    """F.linear / F.conv1d-3d called with constant weights (e.g. timm's Linear, StdConv2d): the
    composite's rule, with the weight and bias recorded in the forward."""
    conv_dims = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}.get(ctx.node.target)
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    args = ctx.bind(names, bias=None, stride=1, padding=0, dilation=1, groups=1)
    x_node, weight, bias = ctx.signal(args["input"]), args["weight"], args["bias"]
    if ctx.is_signal(weight) or ctx.is_signal(bias):
        raise UnsupportedOp("its weight depends on the image")
    rule, fold, pad = ctx.layer_rule, ctx.fold, ctx.pad
    if pad is not None:
        x_node = pad.source
    reads = [x_node, weight] + ([bias] if isinstance(bias, fx.Node) else [])
    is_linear = conv_dims is None
    output = (ctx.node,) if is_linear and reads_linear_output(rule) else _output_read(ctx)
    reads.extend(output)

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        x, w = as_compute(values[0], r.dtype), values[1].detach().to(r.dtype)
        b = values[2].detach().to(r.dtype) if isinstance(bias, fx.Node) else bias
        if isinstance(b, Tensor):
            b = b.detach().to(r.dtype)
        if fold is not None:
            w, b = fold.fold_into(w, b)
        if is_linear:
            y = linear_output(rule, values[-1], r.dtype) if output else None
            return [propagate(rule, linear_map(w, b), x, r, y)]
        y = as_compute(values[-1], r.dtype) if output else None
        params = _ConvParams(
            conv_dims, w.shape, args["stride"], args["padding"], args["dilation"], args["groups"]
        )
        pre_pad = pad.amounts(x.shape) if pad is not None else ()
        return [propagate(rule, conv_map(params, x.shape, w, b, pre_pad), x, r, y)]

    if conv_dims is not None:  # fails early on uneven 'same' padding
        _conv_padding(
            _ConvParams(
                conv_dims,
                (0, 0) + (3,) * conv_dims,
                args["stride"],
                args["padding"],
                args["dilation"],
                args["groups"],
            )
        )
    return Step((x_node,), tuple(reads), backward)


FUNCTIONAL_LAYERS = (F.linear, F.conv1d, F.conv2d, F.conv3d)
