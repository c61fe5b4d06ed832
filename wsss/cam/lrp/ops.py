"""How relevance crosses each kind of node of a traced model (torch.fx): the op rules.

An op rule looks at one graph node when RelevanceCAM is built and returns a `Step`: which of the
node's inputs receive relevance, which values the forward pass must record for it, and the
function mapping the relevance at the node's output to its inputs. Rules are found by the
node's target: a module type (call_module), a function (call_function) or a method name
(call_method). `register_rule` adds or replaces one.

Built-in rules (relevance R is (B*K, ...), recorded values (B, ...)):
- Conv1d/2d/3d, Linear (also F.linear / F.conv*d with constant weights): the LRP rule the
  composite picks for that layer (rules.py), with a following BatchNorm folded in when
  batchnorm="fold" (modules only);
- BatchNorm, LayerNorm, GroupNorm: identity (BN: the reference's treatment, or folded into the
  conv before it; LN/GN: the identity-on-normalisation rule of CP-LRP / AttnLRP, which holds
  the statistics constant and ignores the affine shift);
- element-wise activations (ReLU, ReLU6, LeakyReLU, ELU, SiLU, GELU, Hardswish, Mish, Tanh,
  Sigmoid, Hardsigmoid, ...), dropout, stochastic depth, identity, contiguous: pass-through;
- add / sub of two signals: the residual split (signed, positive or abs parts); with a
  constant: pass-through to the signal;
- mul by a constant, div by a constant: pass-through; mul by a gate (an operand produced by a
  sigmoid / hardsigmoid / softmax, as in squeeze-excitation): the gate is held constant and all
  relevance goes to the gated input;
- cat: split by channel (or any non-batch) slices; chunk / split + getitem: reassembled;
- max pooling (also adaptive): winner-take-all; average / adaptive-average pooling and mean
  over dimensions: spread in proportion to the positive inputs (z⁺), or to the negative ones
  where the pooled value is negative (only possible without a ReLU before the pool);
- flatten / view / reshape / squeeze / unsqueeze / permute / transpose / tensor indexing /
  channel shuffle: relevance moved back to where the values came from.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, fx, nn
from torch.nn import grad as nn_grad

from wsss.cam.lrp.rules import LinearMap, Rule, as_compute, mul_per_image, propagate, safe_inverse


class UnsupportedOp(Exception):
    """Raised by an op rule that cannot handle this particular node (the reason is the text)."""


@dataclass(frozen=True)
class Shape:
    """A request to record the shape of a node's value (not the value)."""

    node: fx.Node


@dataclass(frozen=True)
class Part:
    """Relevance for one element of a multi-output node (chunk / split)."""

    index: int
    relevance: Tensor


@dataclass
class Step:
    """How relevance crosses one node.

    sources: the input nodes that receive relevance, in the order `backward` returns them;
    reads: the values (fx.Node) or shapes (Shape) the forward must record;
    backward(r, values) -> one relevance (a Tensor, a Part or None) per source.
    """

    sources: tuple[fx.Node, ...]
    reads: tuple[Any, ...]
    backward: Callable[[Any, list[Any]], Sequence[Any]]


@dataclass
class NodeContext:
    """What an op rule may know about its node when the relevance plan is built."""

    node: fx.Node
    module: nn.Module | None
    path: str
    config: Any  # the LRPConfig (composite)
    is_signal: Callable[[Any], bool]  # does this argument depend on the input image?
    is_gate: Callable[[Any], bool]  # is this argument produced by a gate (sigmoid-like) op?
    is_multi_output: Callable[[Any], bool]
    layer_rule: Rule | None = None  # the composite's rule for a conv / linear node
    fold: nn.Module | None = None  # BatchNorm to fold into this conv (batchnorm="fold")
    fold_node: fx.Node | None = None

    @property
    def args(self) -> tuple[Any, ...]:
        return self.node.args

    def bind(self, names: Sequence[str], **defaults: Any) -> dict[str, Any]:
        """The node's arguments by name (positional names in order, then keyword arguments)."""
        values = dict(defaults)
        values.update(zip(names, self.node.args))
        values.update(self.node.kwargs)
        return values

    def signal(self, value: Any, what: str = "input") -> fx.Node:
        if not self.is_signal(value):
            raise UnsupportedOp(f"its {what} does not depend on the image")
        return value


class OpRule:
    """An op rule: `plan(ctx)` returns the node's Step (or raises UnsupportedOp).

    gate: the op's output gates another signal when multiplied with it (sigmoid-like);
    kind: how LIFT-CAM's DeepLIFT treats the op: "linear" (exact: its own transpose),
    "elementwise" (a nonlinearity per element: the rescale rule), "maxpool", or "other".
    """

    def __init__(self, plan: Callable[[NodeContext], Step], gate: bool = False,
                 kind: str = "other"):
        self._plan = plan
        self.gate = gate
        self.kind = kind

    def plan(self, ctx: NodeContext) -> Step:
        return self._plan(ctx)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------

_MODULE_RULES: dict[type, OpRule] = {}
_FUNCTION_RULES: dict[Any, OpRule] = {}
_METHOD_RULES: dict[str, OpRule] = {}
_VERSION = [0]  # bumped by every (un)registration, so cached relevance plans are rebuilt


def registry_version() -> int:
    return _VERSION[0]


def _registry(target: Any) -> dict:
    if isinstance(target, str):
        return _METHOD_RULES
    if isinstance(target, type) and issubclass(target, nn.Module):
        return _MODULE_RULES
    if callable(target):
        return _FUNCTION_RULES
    raise TypeError(f"a rule target is a module type, a function or a method name, got {target!r}")


def register_rule(target: Any, rule: Any) -> None:
    """Teach RelevanceCAM how relevance crosses an op.

    target: a module type (its instances become single nodes of the traced graph), a function
    (e.g. torch.roll) or a Tensor method name (e.g. "roll").
    rule: one of
    - "identity": relevance passes through to the first input unchanged (e.g. an activation);
    - "gate": like "identity", and the op's output counts as a gate when it multiplies another
      signal (the gated signal then receives all relevance);
    - fn(module, input, output, relevance) -> input relevance, for a single-input op: input and
      output are the recorded (B, ...) tensors in float32, relevance is (B, K, *output.shape[1:])
      and the result must be (B, K, *input.shape[1:]); module is None for functions and methods;
    - an `OpRule` (advanced: builds the node's `Step` itself).
    """
    registry = _registry(target)
    _VERSION[0] += 1
    if isinstance(rule, OpRule):
        registry[target] = rule
    elif rule == "identity":
        registry[target] = OpRule(plan_pass, kind="elementwise")
    elif rule == "gate":
        registry[target] = OpRule(plan_pass, gate=True, kind="elementwise")
    elif callable(rule):
        registry[target] = OpRule(lambda ctx: plan_custom(ctx, rule))
    else:
        raise TypeError("rule must be 'identity', 'gate', fn(module, input, output, relevance) "
                        "or an OpRule")


def unregister_rule(target: Any) -> None:
    """Remove the rule registered for `target` (built-in or not)."""
    _VERSION[0] += 1
    _registry(target).pop(target, None)


def register_handler(module_type: type, handler: Any) -> None:
    """The earlier name of `register_rule`, for module types."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError("register_handler takes a module type; use register_rule for functions")
    register_rule(module_type, handler)


def _forward_overridden(module_type: type, base: type) -> bool:
    return module_type.forward is not base.forward


def module_rule(module: nn.Module) -> OpRule | None:
    """The rule for a module: by its exact type, or by a base class whose forward it keeps."""
    kind = type(module)
    if kind in _MODULE_RULES:
        return _MODULE_RULES[kind]
    for base in kind.__mro__[1:]:
        if base in _MODULE_RULES and not _forward_overridden(kind, base):
            return _MODULE_RULES[base]
    return None


def node_rule(node: fx.Node, modules: dict[str, nn.Module]) -> OpRule | None:
    """The rule for a graph node, or None."""
    if node.op == "call_module":
        return module_rule(modules[node.target])
    if node.op == "call_function":
        return _FUNCTION_RULES.get(node.target)
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target)
    return None


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _first_signal(ctx: NodeContext) -> fx.Node:
    for value in ctx.node.args:
        if ctx.is_signal(value):
            return value
    for value in ctx.node.kwargs.values():
        if ctx.is_signal(value):
            return value
    raise UnsupportedOp("none of its inputs depends on the image")


def _reduce_to(r: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum relevance (N, *out) over the dimensions along which an operand of `shape` was
    broadcast, giving (N, *shape[1:])."""
    if tuple(r.shape[1:]) == tuple(shape[1:]):
        return r
    if len(shape) != r.dim():
        raise RuntimeError(f"cannot return relevance of shape {tuple(r.shape)} to an operand of "
                           f"shape {tuple(shape)} (broadcast over the batch dimension)")
    dims = [i for i in range(1, r.dim()) if shape[i] == 1 and r.shape[i] != 1]
    return r.sum(dims, keepdim=True) if dims else r


def _dim(dim: int, rank: int) -> int:
    dim = dim + rank if dim < 0 else dim
    if dim == 0:
        raise UnsupportedOp("it acts along the batch dimension")
    return dim


def _varargs(ctx: NodeContext, start: int, name: str) -> Any:
    """Methods like x.permute(0, 2, 1) or x.permute((0, 2, 1)) / x.permute(dims=...)."""
    rest = ctx.node.args[start:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        return tuple(rest[0])
    if rest:
        return tuple(rest)
    return tuple(ctx.node.kwargs[name])


# --------------------------------------------------------------------------------------------
# Pass-through, custom
# --------------------------------------------------------------------------------------------


def plan_pass(ctx: NodeContext) -> Step:
    """Relevance passes unchanged to the op's first signal input (activations, dropout, BN in
    the reference's treatment, LayerNorm / GroupNorm with their statistics held constant)."""
    return Step((_first_signal(ctx),), (), lambda r, values: [r])


def plan_custom(ctx: NodeContext, fn: Callable[..., Tensor]) -> Step:
    """A user rule fn(module, input, output, relevance) for a single-input op."""
    x_node = _first_signal(ctx)

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        x, y = as_compute(values[0], r.dtype), as_compute(values[1], r.dtype)
        b = x.shape[0]
        out = fn(ctx.module, x, y, r.view(b, -1, *r.shape[1:]))
        return [out.reshape(r.shape[0], *x.shape[1:])]

    return Step((x_node,), (x_node, ctx.node), backward)


# --------------------------------------------------------------------------------------------
# Conv and Linear
# --------------------------------------------------------------------------------------------

_CONV_FUNCTIONS = {1: (F.conv1d, nn_grad.conv1d_input), 2: (F.conv2d, nn_grad.conv2d_input),
                   3: (F.conv3d, nn_grad.conv3d_input)}


def batchnorm_affine(bn: nn.Module, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """BatchNorm in eval mode as y = scale·x + shift (per channel)."""
    mean = bn.running_mean.detach().to(dtype) if bn.running_mean is not None else 0.0
    var = bn.running_var.detach().to(dtype) if bn.running_var is not None else 1.0
    scale = torch.rsqrt(torch.as_tensor(var + bn.eps, dtype=dtype))
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(dtype)
    return scale, shift


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


def conv_map(conv: nn.Module, x_shape: Sequence[int], weight: Tensor, bias: Tensor | None
             ) -> LinearMap:
    """A ConvNd as a LinearMap (stride, padding, dilation and groups respected)."""
    n = len(conv.kernel_size)
    fwd, input_grad = _CONV_FUNCTIONS[n]
    stride, dilation, groups, padding = conv.stride, conv.dilation, conv.groups, _conv_padding(conv)
    in_shape = tuple(x_shape[1:])

    def forward(inp: Tensor, w: Tensor) -> Tensor:
        return fwd(inp, w, None, stride, padding, dilation, groups)

    def backward(s: Tensor, w: Tensor) -> Tensor:
        return input_grad((s.shape[0], *in_shape), w, s, stride, padding, dilation, groups)

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
    rule, bn = ctx.layer_rule, ctx.fold
    x_node = ctx.signal(ctx.args[0])
    output_node = ctx.fold_node if bn is not None else ctx.node
    reads = (x_node, output_node) if rule.kind == "gamma" else (x_node,)

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        x = as_compute(values[0], r.dtype)
        weight = conv.weight.detach().to(r.dtype)
        bias = conv.bias.detach().to(r.dtype) if conv.bias is not None else None
        if bn is not None:
            scale, shift = batchnorm_affine(bn, r.dtype)
            weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
            bias = shift if bias is None else bias * scale + shift
        y = as_compute(values[1], r.dtype) if len(values) > 1 else None
        return [propagate(rule, conv_map(conv, x.shape, weight, bias), x, r, y)]

    return Step((x_node,), reads, backward)


def plan_linear(ctx: NodeContext) -> Step:
    lin, rule = ctx.module, ctx.layer_rule
    x_node = ctx.signal(ctx.args[0])
    reads = (x_node, ctx.node) if rule.kind == "gamma" else (x_node,)

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        x = as_compute(values[0], r.dtype)
        weight = lin.weight.detach().to(r.dtype)
        bias = lin.bias.detach().to(r.dtype) if lin.bias is not None else None
        y = as_compute(values[1], r.dtype) if len(values) > 1 else None
        return [propagate(rule, linear_map(weight, bias), x, r, y)]

    return Step((x_node,), reads, backward)


def _ntuple(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


class _ConvParams:
    """A functional conv's arguments, shaped like the nn.ConvNd attributes conv_map reads."""

    def __init__(self, n: int, weight_shape: Sequence[int], stride: Any, padding: Any,
                 dilation: Any, groups: int):
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
    rule = ctx.layer_rule
    reads = [x_node, weight] + ([bias] if isinstance(bias, fx.Node) else [])
    if rule.kind == "gamma":
        reads.append(ctx.node)

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        x, w = as_compute(values[0], r.dtype), values[1].detach().to(r.dtype)
        b = values[2].detach().to(r.dtype) if isinstance(bias, fx.Node) else bias
        y = as_compute(values[-1], r.dtype) if rule.kind == "gamma" else None
        if conv_dims is None:
            return [propagate(rule, linear_map(w, b), x, r, y)]
        params = _ConvParams(conv_dims, w.shape, args["stride"], args["padding"],
                             args["dilation"], args["groups"])
        return [propagate(rule, conv_map(params, x.shape, w, b), x, r, y)]

    if conv_dims is not None:  # fails early on uneven 'same' padding
        _conv_padding(_ConvParams(conv_dims, (0, 0) + (3,) * conv_dims, args["stride"],
                                  args["padding"], args["dilation"], args["groups"]))
    return Step((x_node,), tuple(reads), backward)


FUNCTIONAL_LAYERS = (F.linear, F.conv1d, F.conv2d, F.conv3d)


# --------------------------------------------------------------------------------------------
# Add, sub, mul, div
# --------------------------------------------------------------------------------------------


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
        return Step((s,), (Shape(s),), lambda r, v: [_reduce_to(r, v[0])])
    mode = ctx.config.residual

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        va, vb = as_compute(values[0], r.dtype), as_compute(values[1], r.dtype)
        ra, rb = residual_split(r, va, sign * vb, mode)  # broadcasts if shapes differ
        return [_reduce_to(ra, va.shape), _reduce_to(rb, vb.shape)]

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
            raise UnsupportedOp("it multiplies two signals, neither (or both) of them a gate "
                                "(an output of sigmoid / hardsigmoid / softmax)")
        gated = b if gates[0] else a
        return Step((gated,), (Shape(gated),), lambda r, v: [_reduce_to(r, v[0])])
    if not signals:
        raise UnsupportedOp("none of its inputs depends on the image")
    (s,) = signals  # times a constant (e.g. a layer scale): pass-through
    return Step((s,), (Shape(s),), lambda r, v: [_reduce_to(r, v[0])])


def plan_div(ctx: NodeContext) -> Step:
    args = ctx.bind(("input", "other"))
    if ctx.is_signal(args["other"]):
        raise UnsupportedOp("it divides by a signal (only division by a constant is supported)")
    s = ctx.signal(args["input"])
    return Step((s,), (Shape(s),), lambda r, v: [_reduce_to(r, v[0])])


# --------------------------------------------------------------------------------------------
# Concatenation, chunk / split, indexing
# --------------------------------------------------------------------------------------------


def plan_cat(ctx: NodeContext) -> Step:
    args = ctx.bind(("tensors", "dim"), dim=0)
    tensors, dim = list(args["tensors"]), args["dim"]
    sources = [t for t in tensors if ctx.is_signal(t)]
    if not sources:
        raise UnsupportedOp("none of its inputs depends on the image")
    is_source = [ctx.is_signal(t) for t in tensors]

    def backward(r: Tensor, shapes: list[Any]) -> list[Tensor]:
        d = _dim(dim, len(shapes[0]))
        sizes = [s[d] for s in shapes]
        pieces = r.split(sizes, dim=d)
        return [p for p, keep in zip(pieces, is_source) if keep]

    if dim == 0:
        raise UnsupportedOp("it concatenates along the batch dimension")
    return Step(tuple(sources), tuple(Shape(t) for t in tensors), backward)


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
        d = _dim(dim, len(shape))
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
    return _plan_pieces(ctx, "split", ("input", "split_size_or_sections", "dim"),
                        "split_size_or_sections")


def plan_getitem(ctx: NodeContext) -> Step:
    source, index = ctx.node.args
    if ctx.is_multi_output(source):
        if not isinstance(index, int):
            raise UnsupportedOp("it indexes a chunk / split result with a non-integer")
        return Step((source,), (), lambda r, v: [Part(index, r)])
    ctx.signal(source)
    idx = index if isinstance(index, tuple) else (index,)
    if not idx or idx[0] != slice(None) or not all(isinstance(i, (int, slice)) for i in idx):
        raise UnsupportedOp(f"tensor indexing {index!r} (supported: integers and slices, the "
                            "batch dimension kept whole)")

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
    x = _first_signal(ctx)

    def backward(r: Tensor, shapes: list[Any]) -> list[Tensor]:
        in_shape, out_shape = shapes
        if in_shape[0] != out_shape[0]:
            raise RuntimeError(f"RelevanceCAM: node {ctx.node.name!r} ({ctx.path}) reshapes "
                               f"{tuple(in_shape)} to {tuple(out_shape)}, mixing the batch "
                               "dimension with others")
        return [r.reshape(r.shape[0], *in_shape[1:])]

    return Step((x,), (Shape(x), Shape(ctx.node)), backward)


def plan_permute(ctx: NodeContext) -> Step:
    x = _first_signal(ctx)
    if ctx.node.op == "call_method":
        dims = _varargs(ctx, 1, "dims")
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


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------


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
    p = _pool_params(ctx, ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
                     stride=None, padding=0, dilation=1, ceil_mode=False)
    if (ctx.module is not None and not isinstance(ctx.module, nn.MaxPool2d)) or \
            (ctx.module is None and ctx.node.kwargs.get("return_indices", False)):
        raise UnsupportedOp("only 2-d max pooling without returned indices")
    stride = p.get("stride") or p["kernel_size"]

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        x, y = values
        _, index = F.max_pool2d(x, p["kernel_size"], stride, p["padding"], p["dilation"],
                                p["ceil_mode"], return_indices=True)
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


def _zplus_pool(r: Tensor, x: Tensor, pool: Callable[[Tensor], Tensor],
                transpose: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
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
    p = _pool_params(ctx, ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                           "divisor_override"), stride=None, padding=0, ceil_mode=False,
                     count_include_pad=True, divisor_override=None)
    kernel = _pair(p["kernel_size"])
    stride = _pair(p["stride"] or p["kernel_size"])
    padding = _pair(p["padding"])

    def pool(v: Tensor) -> Tensor:
        return F.avg_pool2d(v, kernel, stride, padding, p["ceil_mode"], p["count_include_pad"],
                            p["divisor_override"])

    def transpose(s: Tensor, like: Tensor) -> Tensor:
        return torch.ops.aten.avg_pool2d_backward(s, like, kernel, stride, padding, p["ceil_mode"],
                                                  p["count_include_pad"], p["divisor_override"])

    return Step((x,), (x,), lambda r, v: [_zplus_pool(r, as_compute(v[0], r.dtype), pool,
                                                      transpose)])


def plan_adaptive_avg_pool(ctx: NodeContext) -> Step:
    x = ctx.signal(ctx.args[0])
    if ctx.module is not None and not isinstance(ctx.module, nn.AdaptiveAvgPool2d):
        raise UnsupportedOp("only 2-d adaptive average pooling")
    size = _pool_params(ctx, ("output_size",))["output_size"]

    def backward(r: Tensor, values: list[Any]) -> list[Tensor]:
        x = as_compute(values[0], r.dtype)
        out = tuple(int(x.shape[-2 + i]) if s is None else int(s)
                    for i, s in enumerate(_pair(size)))
        if out == (1, 1):
            return [_zplus_mean(r, x, (-2, -1), keepdim=True)]
        return [_zplus_pool(r, x, lambda v: F.adaptive_avg_pool2d(v, out),
                            torch.ops.aten._adaptive_avg_pool2d_backward)]

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


def _pair(v: Any) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# --------------------------------------------------------------------------------------------
# The built-in table
# --------------------------------------------------------------------------------------------

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU,
               nn.GELU, nn.Hardswish, nn.Mish, nn.Hardtanh, nn.Softplus, nn.Tanh)
GATES = (nn.Sigmoid, nn.Hardsigmoid)
IDENTITIES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _register_builtins() -> None:
    def add(targets: Sequence[Any], plan: Callable[[NodeContext], Step], kind: str,
            gate: bool = False) -> None:
        for target in targets:
            _registry(target)[target] = OpRule(plan, gate, kind)

    linear, elementwise = "linear", "elementwise"
    add(CONVS, plan_conv, linear)
    add([nn.Linear], plan_linear, linear)
    add(FUNCTIONAL_LAYERS, plan_functional_layer, linear)
    add(BATCHNORMS + IDENTITIES, plan_pass, linear)
    add(NORMS, plan_pass, "other")
    add(ACTIVATIONS, plan_pass, elementwise)
    add(GATES, plan_pass, elementwise, gate=True)
    add([F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.silu, F.gelu, F.hardswish,
         F.mish, F.hardtanh, F.softplus, torch.tanh, F.tanh, torch.relu_, F.relu_,
         "relu", "relu_", "tanh", "clamp_min", "clamp_min_"], plan_pass, elementwise)
    add([torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.softmax, F.softmax,
         "sigmoid", "softmax", "sigmoid_"], plan_pass, elementwise, gate=True)
    add([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
         torchvision.ops.stochastic_depth, F.batch_norm, "contiguous", "clone", "float", "to",
         "type_as"], plan_pass, linear)
    add([F.layer_norm, F.group_norm], plan_pass, "other")
    add([operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"], plan_add,
        linear)
    add([operator.sub, operator.isub, torch.sub, "sub", "sub_"], plan_sub, linear)
    add([operator.mul, operator.imul, torch.mul, "mul", "mul_"], plan_mul, linear)
    add([operator.truediv, operator.itruediv, torch.div, "div", "div_"], plan_div, linear)
    add([torch.cat, torch.concat, torch.concatenate], plan_cat, linear)
    add([torch.chunk, "chunk"], plan_chunk, linear)
    add([torch.split, "split"], plan_split, linear)
    add([operator.getitem], plan_getitem, linear)
    add([nn.Flatten, nn.Unflatten, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
         "flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten", "view_as",
         "reshape_as"], plan_reshape, linear)
    add([torch.permute, "permute"], plan_permute, linear)
    add([torch.transpose, torch.swapaxes, "transpose", "swapaxes"], plan_transpose, linear)
    add([nn.ChannelShuffle, torch.channel_shuffle, F.channel_shuffle], plan_channel_shuffle,
        linear)
    add([nn.MaxPool2d, F.max_pool2d, torch.max_pool2d], plan_max_pool, "maxpool")
    add([nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d], plan_adaptive_max_pool, "maxpool")
    add([nn.AvgPool2d, F.avg_pool2d], plan_avg_pool, linear)
    add([nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d], plan_adaptive_avg_pool, linear)
    add([torch.mean, "mean"], plan_mean, linear)


_register_builtins()
