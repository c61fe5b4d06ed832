"""LRP rules and per-module handlers, written as explicit tensor maths (no autograd).

The model is described by a small tree of nodes built from its module structure:
- `Sequence`: children run one after another (nn.Sequential, torchvision ResNet / VGG bodies);
- `Residual`: out = after(main(x) + skip(x)) (torchvision BasicBlock / Bottleneck);
- leaves: one module each (Conv2d, Linear, BatchNorm2d, pools, ReLU, ...), or a module-less op.

A relevance sweep walks this tree backwards. Relevance R for K classes per image is kept as a
(B*K, ...) tensor (image-major), while every stored activation stays (B, ...) and is broadcast
over K. Everything that does not depend on the class (denominators Z, split fractions, pooling
indices) is computed once per image, so each extra class only costs one transposed operation per
layer. Because no rule uses autograd, the sweep works under no_grad and inference_mode.

Add support for a new module type with `register_handler`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_input
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torchvision.models.vgg import VGG

RULE_KINDS = ("zplus", "alphabeta", "epsilon", "gamma")
BATCHNORM_MODES = ("identity", "fold")
RESIDUAL_MODES = ("signed", "positive", "abs")


# --------------------------------------------------------------------------------------------
# Rules and options
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """An LRP rule for Conv2d / Linear layers.

    kind:
    - "zplus": the official Relevance-CAM α1β0 form, Z = W⁺x⁺ + W⁻x⁻ + bias·b (one shared Z);
    - "alphabeta": α·(positive contributions) − β·(negative contributions), each normalised
      by its own Z (bias·b⁺ and bias·b⁻ added to them);
    - "epsilon": Z = Wx + bias·b, stabilised by ±epsilon;
    - "gamma": weights W + γW⁺ (and W + γW⁻ for negative inputs), bias b + γb⁺.
    bias: how many times the layer bias enters the denominator (0 = ignored, conservative;
    the official code uses 2 for Conv2d and 0 for Linear).
    """

    kind: str = "zplus"
    alpha: float = 1.0
    beta: float = 0.0
    epsilon: float = 1e-6
    gamma: float = 0.25
    bias: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(f"unknown LRP rule {self.kind!r}; choose one of {RULE_KINDS}")
        if self.kind == "alphabeta" and abs(self.alpha - self.beta - 1.0) > 1e-6:
            raise ValueError(f"alphabeta rule needs alpha - beta = 1, got {self.alpha}, {self.beta}")


def as_rule(value: Rule | str | dict) -> Rule:
    """Accept a Rule, a rule name ("zplus", "gamma", ...) or a dict of Rule fields."""
    if isinstance(value, Rule):
        return value
    if isinstance(value, str):
        return Rule(kind=value)
    if isinstance(value, dict):
        return Rule(**value)
    raise TypeError(f"expected a Rule, a rule name or a dict, got {type(value).__name__}")


@dataclass(frozen=True)
class LRPConfig:
    """Everything that defines one Relevance-CAM variant (see `relevance.PRESETS`)."""

    conv: Rule = field(default_factory=Rule)
    linear: Rule = field(default_factory=Rule)
    batchnorm: str = "identity"
    residual: str = "signed"
    start: str = "clrp"
    weights: str = "sum"

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv", as_rule(self.conv))
        object.__setattr__(self, "linear", as_rule(self.linear))
        _check_choice("batchnorm", self.batchnorm, BATCHNORM_MODES)
        _check_choice("residual", self.residual, RESIDUAL_MODES)
        _check_choice("start", self.start, ("lrp", "clrp", "clrp_absent", "sglrp"))
        _check_choice("weights", self.weights, ("sum", "mean"))

    def updated(self, **options: Any) -> "LRPConfig":
        unknown = set(options) - set(self.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown RelevanceCAM option(s) {sorted(unknown)}; "
                            f"valid: {sorted(self.__dataclass_fields__)}")
        return replace(self, **options)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {choices}")


# --------------------------------------------------------------------------------------------
# Tensor helpers: R is (B*K, ...), per-image tensors are (B, ...)
# --------------------------------------------------------------------------------------------


def safe_inverse(z: Tensor) -> Tensor:
    """1/z where z != 0 and 0 where z == 0 exactly (the official "safe division")."""
    return z.reciprocal().masked_fill_(z == 0, 0.0)


def mul_per_image(r: Tensor, t: Tensor) -> Tensor:
    """r (B*K, ...) times t (B, ...), broadcast over the K classes of each image."""
    b = t.shape[0]
    return (r.view(b, -1, *r.shape[1:]) * t.unsqueeze(1)).flatten(0, 1)


def _has_negative(x: Tensor) -> bool:
    return bool((x < 0).any())


def apply_rule(rule: Rule, x: Tensor, r: Tensor, weight: Tensor, bias: Tensor | None,
               forward: Callable[[Tensor, Tensor], Tensor],
               backward: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Propagate relevance r (B*K, out...) through a linear map to its input x (B, in...).

    forward(x, w) applies the layer without bias to per-image tensors; backward(s, w) is its
    transpose applied to (B*K, out...) tensors. Denominators only depend on x, so they are
    computed once per image.
    """
    b = 0.0 if bias is None else bias

    def with_bias(z: Tensor, scale: float, bias_part: Tensor | float) -> Tensor:
        if scale == 0 or bias is None:
            return z
        shape = (1, -1) + (1,) * (z.dim() - 2)
        return z + scale * bias_part.view(shape)

    negative = _has_negative(x)
    xp, xn = (x.clamp(min=0), x.clamp(max=0)) if negative else (x, None)
    wp, wn = weight.clamp(min=0), weight.clamp(max=0)

    def pair_relevance(z: Tensor, w_pos_in: Tensor, w_neg_in: Tensor) -> Tensor:
        s = mul_per_image(r, safe_inverse(z))
        out = mul_per_image(backward(s, w_pos_in), xp)
        if negative:
            out = out + mul_per_image(backward(s, w_neg_in), xn)
        return out

    def pair_z(w_pos_in: Tensor, w_neg_in: Tensor) -> Tensor:
        z = forward(xp, w_pos_in)
        return z + forward(xn, w_neg_in) if negative else z

    if rule.kind == "zplus":
        z = with_bias(pair_z(wp, wn), rule.bias, b)
        return pair_relevance(z, wp, wn)
    if rule.kind == "alphabeta":
        bp = b.clamp(min=0) if bias is not None else 0.0
        out = rule.alpha * pair_relevance(with_bias(pair_z(wp, wn), rule.bias, bp), wp, wn)
        if rule.beta != 0:
            bn = b.clamp(max=0) if bias is not None else 0.0
            out = out - rule.beta * pair_relevance(with_bias(pair_z(wn, wp), rule.bias, bn), wn, wp)
        return out
    if rule.kind == "epsilon":
        z = with_bias(forward(x, weight), rule.bias, b)
        z = z + torch.where(z >= 0, rule.epsilon, -rule.epsilon)
        s = mul_per_image(r, z.reciprocal())
        return mul_per_image(backward(s, weight), x)
    # gamma
    wg_pos = weight + rule.gamma * wp
    wg_neg = weight + rule.gamma * wn
    bg = (b + rule.gamma * b.clamp(min=0)) if bias is not None else 0.0
    z = with_bias(pair_z(wg_pos, wg_neg), rule.bias, bg)
    return pair_relevance(z, wg_pos, wg_neg)


# --------------------------------------------------------------------------------------------
# The sweep state
# --------------------------------------------------------------------------------------------


class Sweep:
    """State shared by the nodes during one forward pass and one relevance sweep."""

    def __init__(self, config: LRPConfig, layers: list[str]):
        self.config = config
        self.pending: set[str] = set(layers)
        self.saved: dict[int, Any] = {}
        self.activations: dict[str, Tensor] = {}
        self.relevance: dict[str, Tensor] = {}
        self.plan_only = False
        self.visited: list[Node] = []
        self.captured_nodes: dict[str, Node] = {}

    def save(self, node: "Node", value: Any) -> None:
        self.saved[id(node)] = value

    def take(self, node: "Node") -> Any:
        try:
            return self.saved.pop(id(node))
        except KeyError:
            raise RuntimeError(f"module {node.describe()} did not run in the forward pass; "
                               "the model's forward does not match its module structure") from None

    @property
    def done(self) -> bool:
        return not self.pending


def as_float(t: Tensor) -> Tensor:
    """Relevance maths runs in float32 even when the forward ran under autocast."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------


class Node:
    """One step of the model. `path` is its name in model.named_modules() (None for ops)."""

    def __init__(self, module: nn.Module | None, path: str | None):
        self.module = module
        self.path = path

    def describe(self) -> str:
        kind = type(self.module).__name__ if self.module is not None else type(self).__name__
        return f"'{self.path}' ({kind})" if self.path is not None else kind

    def nodes(self) -> Iterator["Node"]:
        yield self

    def attach(self, sweep: Sweep) -> list[Any]:
        """Register the forward hooks this node needs; return their handles."""
        return []

    def relevance(self, r: Tensor, sweep: Sweep) -> Tensor:
        """Relevance at the module output -> relevance at its input."""
        raise NotImplementedError


def run(node: Node, r: Tensor | None, sweep: Sweep) -> Tensor | None:
    """Walk one node backwards, capturing relevance at requested module outputs.

    Returns None once every requested layer has been captured (the sweep stops there).
    In plan mode (sweep.plan_only) r is None and only the visited nodes are listed.
    """
    if node.path is not None and node.path in sweep.pending:
        sweep.pending.discard(node.path)
        sweep.captured_nodes[node.path] = node
        if not sweep.plan_only:
            sweep.relevance[node.path] = r
        if sweep.done:
            return None
    if isinstance(node, Sequence):
        for child in reversed(node.children):
            r = run(child, r, sweep)
            if sweep.done:
                return None
        return r
    sweep.visited.append(node)
    if isinstance(node, Residual):
        return node.relevance_tree(r, sweep)
    if sweep.plan_only:
        if isinstance(node, Unsupported):
            raise node.error()
        return None
    return node.relevance(r, sweep)


class Sequence(Node):
    """Children applied one after the other."""

    def __init__(self, module: nn.Module | None, path: str | None, children: list[Node]):
        super().__init__(module, path)
        self.children = children

    def nodes(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            yield from child.nodes()


class Residual(Node):
    """out = after(main(x) + skip(x)); skip is None for an identity shortcut.

    The branch values a = main(x) and b = skip(x) are recorded in the forward (a is cloned
    because torchvision adds the shortcut to it in place).
    """

    def __init__(self, module: nn.Module, path: str, main: Node, main_output: nn.Module,
                 skip: Node | None, after: list[Node]):
        super().__init__(module, path)
        self.main, self.main_output, self.skip, self.after = main, main_output, skip, after

    def nodes(self) -> Iterator[Node]:
        yield self
        yield from self.main.nodes()
        if self.skip is not None:
            yield from self.skip.nodes()
        for node in self.after:
            yield from node.nodes()

    def attach(self, sweep: Sweep) -> list[Any]:
        values: dict[str, Tensor] = {}
        sweep.save(self, values)

        def keep_a(module, args, output):
            values["a"] = output.detach().clone()

        def keep_b(module, args, output):
            values["b"] = output.detach()

        def keep_input(module, args):
            values["b"] = args[0].detach()

        handles = [self.main_output.register_forward_hook(keep_a)]
        if self.skip is not None:
            handles.append(self.skip.module.register_forward_hook(keep_b))
        else:
            handles.append(self.module.register_forward_pre_hook(keep_input))
        return handles

    def split(self, r: Tensor, sweep: Sweep) -> tuple[Tensor, Tensor]:
        values = sweep.take(self)
        a, b = as_float(values["a"]), as_float(values["b"])
        mode = sweep.config.residual
        if mode == "positive":
            a, b = a.clamp(min=0), b.clamp(min=0)
        elif mode == "abs":
            a, b = a.abs(), b.abs()
        inv = safe_inverse(a + b)
        return mul_per_image(r, a * inv), mul_per_image(r, b * inv)

    def relevance_tree(self, r: Tensor | None, sweep: Sweep) -> Tensor | None:
        for node in reversed(self.after):
            r = run(node, r, sweep)
            if sweep.done:
                return None
        r_main, r_skip = (None, None) if sweep.plan_only else self.split(r, sweep)
        r_main = run(self.main, r_main, sweep)
        if sweep.done:
            return None
        if self.skip is not None:
            r_skip = run(self.skip, r_skip, sweep)
            if sweep.done:
                return None
        return None if sweep.plan_only else r_main + r_skip


class Leaf(Node):
    """A module whose relevance rule needs nothing recorded (identity for relevance)."""

    def relevance(self, r: Tensor, sweep: Sweep) -> Tensor:
        return r


class InputLeaf(Node):
    """A module whose rule needs its (per-image) input; records it with a pre-hook."""

    def attach(self, sweep: Sweep) -> list[Any]:
        def keep(module, args):
            sweep.save(self, args[0].detach())

        return [self.module.register_forward_pre_hook(keep)]


class Flatten(Node):
    """torch.flatten between two modules; relevance is reshaped back to the input shape."""

    def __init__(self, module: nn.Module | None = None, path: str | None = None,
                 source: nn.Module | None = None):
        super().__init__(module, path)
        self.source = source  # module whose output is flattened (for module-less flattens)

    def attach(self, sweep: Sweep) -> list[Any]:
        if self.module is not None:
            return [self.module.register_forward_pre_hook(
                lambda m, args: sweep.save(self, args[0].shape))]
        return [self.source.register_forward_hook(
            lambda m, args, out: sweep.save(self, out.shape))]

    def relevance(self, r: Tensor, sweep: Sweep) -> Tensor:
        shape = sweep.take(self)
        return r.reshape(r.shape[0], *shape[1:])


class ConvNode(InputLeaf):
    """Conv2d with stride, padding, groups and dilation; optional BatchNorm folded in."""

    def __init__(self, module: nn.Conv2d, path: str):
        super().__init__(module, path)
        if module.padding_mode != "zeros":
            raise NotImplementedError(f"Conv2d {path!r}: padding_mode={module.padding_mode!r} "
                                      "is not supported (only 'zeros')")
        self.padding = _conv_padding(module)
        self.batchnorm: nn.BatchNorm2d | None = None

    def effective_parameters(self, fold: bool) -> tuple[Tensor, Tensor | None]:
        conv = self.module
        weight = conv.weight.detach().float()
        bias = conv.bias.detach().float() if conv.bias is not None else None
        if fold and self.batchnorm is not None:
            scale, shift = batchnorm_affine(self.batchnorm)
            weight = weight * scale.view(-1, 1, 1, 1)
            bias = shift if bias is None else bias * scale + shift
        return weight, bias

    def relevance(self, r: Tensor, sweep: Sweep) -> Tensor:
        conv = self.module
        x = as_float(sweep.take(self))
        weight, bias = self.effective_parameters(sweep.config.batchnorm == "fold")
        stride, dilation, groups, padding = conv.stride, conv.dilation, conv.groups, self.padding

        def forward(inp: Tensor, w: Tensor) -> Tensor:
            return F.conv2d(inp, w, None, stride, padding, dilation, groups)

        def backward(s: Tensor, w: Tensor) -> Tensor:
            return conv2d_input((s.shape[0], *x.shape[1:]), w, s, stride, padding, dilation, groups)

        return apply_rule(sweep.config.conv, x, r, weight, bias, forward, backward)


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                raise NotImplementedError("Conv2d padding='same' with an even kernel is not supported")
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)


def batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """BatchNorm in eval mode as y = scale·x + shift (per channel)."""
    mean = bn.running_mean.detach().float() if bn.running_mean is not None else 0.0
    var = bn.running_var.detach().float() if bn.running_var is not None else 1.0
    scale = torch.rsqrt(torch.as_tensor(var + bn.eps))
    if bn.weight is not None:
        scale = scale * bn.weight.detach().float()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().float()
    return scale, shift


class LinearNode(InputLeaf):
    """nn.Linear (bias handled by the linear rule's `bias` count)."""

    def relevance(self, r: Tensor, sweep: Sweep) -> Tensor:
        lin = self.module
        x = as_float(sweep.take(self))
        weight = lin.weight.detach().float()
        bias = lin.bias.detach().float() if lin.bias is not None else None
        return apply_rule(sweep.config.linear, x, r, weight, bias,
                          lambda inp, w: inp @ w.t(), lambda s, w: s @ w)


class BatchNormNode(Leaf):
    """BatchNorm2d: identity for relevance (reference) or folded into the preceding conv."""


class MaxPoolNode(Node):
    """MaxPool2d, winner-take-all: each window's relevance goes to its arg-max input."""

    def attach(self, sweep: Sweep) -> list[Any]:
        def keep(module, args, output):
            sweep.save(self, (args[0].detach(), output.detach()))

        return [self.module.register_forward_hook(keep)]

    def relevance(self, r: Tensor, sweep: Sweep) -> Tensor:
        x, y = sweep.take(self)
        pool = self.module
        _, index = F.max_pool2d(x, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                pool.ceil_mode, return_indices=True)
        r = mul_per_image(r, (y != 0).to(r.dtype))  # safe division R ⊘ y: nothing from y == 0
        b, c, h, w = x.shape
        k = r.shape[0] // b
        out = r.new_zeros(b, k, c, h * w)
        index = index.view(b, 1, c, -1).expand(b, k, c, index.shape[-2] * index.shape[-1])
        out.scatter_add_(3, index, r.view(b, k, c, -1))
        return out.view(b * k, c, h, w)


class AvgPoolNode(Node):
    """Average pooling: relevance spread in proportion to the positive input (z⁺ rule)."""

    def attach(self, sweep: Sweep) -> list[Any]:
        return [self.module.register_forward_pre_hook(
            lambda m, args: sweep.save(self, args[0].detach()))]

    def relevance(self, r: Tensor, sweep: Sweep) -> Tensor:
        x = as_float(sweep.take(self)).clamp(min=0)
        pool = self.module
        if isinstance(pool, nn.AdaptiveAvgPool2d):
            out_size = _adaptive_size(pool.output_size, x.shape[-2:])
            if out_size == (1, 1):
                z = x.sum((-2, -1), keepdim=True)
                return mul_per_image(mul_per_image(r, safe_inverse(z)), x)
            ph = _adaptive_matrix(x.shape[-2], out_size[0], x)
            pw = _adaptive_matrix(x.shape[-1], out_size[1], x)
            z = torch.einsum("oh,bchw,pw->bcop", ph, x, pw)
            s = mul_per_image(r, safe_inverse(z))
            return mul_per_image(torch.einsum("oh,ncop,pw->nchw", ph, s, pw), x)
        # nn.AvgPool2d as a depthwise convolution with constant weights
        if pool.ceil_mode or not pool.count_include_pad or pool.divisor_override is not None:
            raise NotImplementedError(f"AvgPool2d {self.path!r}: ceil_mode, count_include_pad=False "
                                      "and divisor_override are not supported")
        kh, kw = _pair(pool.kernel_size)
        c = x.shape[1]
        weight = x.new_full((c, 1, kh, kw), 1.0 / (kh * kw))
        stride = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
        padding = _pair(pool.padding)
        z = F.conv2d(x, weight, None, stride, padding, 1, c)
        s = mul_per_image(r, safe_inverse(z))
        back = conv2d_input((s.shape[0], *x.shape[1:]), weight, s, stride, padding, 1, c)
        return mul_per_image(back, x)


def _pair(v: Any) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _adaptive_size(size: Any, in_size: torch.Size) -> tuple[int, int]:
    size = _pair(size)
    return tuple(int(in_size[i]) if s is None else int(s) for i, s in enumerate(size))


def _adaptive_matrix(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """(n_out, n_in) averaging matrix of adaptive average pooling along one axis."""
    m = like.new_zeros(n_out, n_in)
    for i in range(n_out):
        start, end = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


class CustomLeaf(Node):
    """A user handler: fn(module, input, output, relevance) -> relevance at the input.

    input/output are the per-image (B, ...) tensors; relevance is (B, K, *output.shape[1:]).
    """

    def __init__(self, module: nn.Module, path: str, fn: Callable[..., Tensor]):
        super().__init__(module, path)
        self.fn = fn

    def attach(self, sweep: Sweep) -> list[Any]:
        def keep(module, args, output):
            sweep.save(self, (args[0].detach(), output.detach().clone()))

        return [self.module.register_forward_hook(keep)]

    def relevance(self, r: Tensor, sweep: Sweep) -> Tensor:
        x, y = sweep.take(self)
        b = x.shape[0]
        out = self.fn(self.module, as_float(x), as_float(y), r.view(b, -1, *r.shape[1:]))
        return out.reshape(r.shape[0], *x.shape[1:])


class Unsupported(Node):
    """Placeholder for a module without handler: fails only if the sweep has to cross it."""

    def error(self) -> NotImplementedError:
        kind = type(self.module)
        return NotImplementedError(
            f"RelevanceCAM has no LRP handler for module '{self.path}' of type "
            f"{kind.__module__}.{kind.__qualname__}, which lies between the logits and a requested "
            f"layer. Request only layers above it, or add a handler: "
            f"wsss.cam.register_handler({kind.__qualname__}, fn) with "
            f"fn(module, input, output, relevance) -> input relevance, or 'identity'.")

    def relevance(self, r: Tensor, sweep: Sweep) -> Tensor:
        raise self.error()


# --------------------------------------------------------------------------------------------
# Building the tree from a model
# --------------------------------------------------------------------------------------------

Builder = Callable[[nn.Module, str], Node]
_HANDLERS: dict[type, Callable[[nn.Module, str, Builder], Node]] = {}


def register_handler(module_type: type, handler: Callable[..., Any] | str) -> None:
    """Teach RelevanceCAM a new module type.

    handler is one of:
    - "identity": relevance passes through unchanged (activations such as GELU, SiLU);
    - fn(module, input, output, relevance) -> input relevance, for a single-input module;
      input/output are (B, ...) float32 tensors and relevance is (B, K, *output.shape[1:]);
    - a subclass of `Node` (advanced, for containers): called as cls(module, path, build),
      where build(child_module, child_path) makes the child's node.
    """
    if handler == "identity":
        _HANDLERS[module_type] = lambda m, p, build: Leaf(m, p)
    elif isinstance(handler, type) and issubclass(handler, Node):
        _HANDLERS[module_type] = handler
    elif callable(handler):
        _HANDLERS[module_type] = lambda m, p, build: CustomLeaf(m, p, handler)
    else:
        raise TypeError("handler must be 'identity', a callable or a Node subclass")


def _child_path(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _forward_overridden(module: nn.Module, base: type, method: str = "forward") -> bool:
    return getattr(type(module), method) is not getattr(base, method)


def _sequential(module: nn.Sequential, path: str, build: Builder) -> Node:
    children = [build(child, _child_path(path, name)) for name, child in module.named_children()]
    _pair_conv_batchnorm(children)
    return Sequence(module, path, children)


def _pair_conv_batchnorm(children: list[Node]) -> None:
    """Let each conv know the BatchNorm that directly follows it (for batchnorm='fold')."""
    for prev, node in zip(children, children[1:]):
        if isinstance(prev, ConvNode) and isinstance(node, BatchNormNode):
            prev.batchnorm = node.module


def _resnet(model: ResNet, path: str, build: Builder) -> Node:
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    children = [build(getattr(model, n), _child_path(path, n)) for n in names]
    children.append(Flatten(source=model.avgpool))
    children.append(build(model.fc, _child_path(path, "fc")))
    _pair_conv_batchnorm(children)
    return Sequence(model, path, children)


def _vgg(model: VGG, path: str, build: Builder) -> Node:
    children = [build(model.features, _child_path(path, "features")),
                build(model.avgpool, _child_path(path, "avgpool")),
                Flatten(source=model.avgpool),
                build(model.classifier, _child_path(path, "classifier"))]
    return Sequence(model, path, children)


def _block(block: nn.Module, path: str, build: Builder) -> Node:
    names = ["conv1", "bn1", None, "conv2", "bn2"]
    if isinstance(block, Bottleneck):
        names += [None, "conv3", "bn3"]
    steps = [Leaf(None, None) if n is None else build(getattr(block, n), _child_path(path, n))
             for n in names]
    _pair_conv_batchnorm(steps)
    main = Sequence(None, None, steps)
    skip = None
    if block.downsample is not None:
        skip = build(block.downsample, _child_path(path, "downsample"))
    return Residual(block, path, main, getattr(block, names[-1]), skip, [Leaf(None, None)])


def _register_builtin_handlers() -> None:
    leaf = lambda cls: (lambda m, p, build: cls(m, p))  # noqa: E731
    for kind in (nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Dropout2d, nn.Identity):
        _HANDLERS[kind] = leaf(Leaf)
    _HANDLERS[nn.BatchNorm2d] = leaf(BatchNormNode)
    _HANDLERS[nn.Conv2d] = leaf(ConvNode)
    _HANDLERS[nn.Linear] = leaf(LinearNode)
    _HANDLERS[nn.MaxPool2d] = leaf(MaxPoolNode)
    _HANDLERS[nn.AvgPool2d] = leaf(AvgPoolNode)
    _HANDLERS[nn.AdaptiveAvgPool2d] = leaf(AvgPoolNode)
    _HANDLERS[nn.Flatten] = lambda m, p, build: Flatten(m, p)
    _HANDLERS[nn.Sequential] = _sequential
    _HANDLERS[ResNet] = _resnet
    _HANDLERS[VGG] = _vgg
    _HANDLERS[BasicBlock] = _block
    _HANDLERS[Bottleneck] = _block


_register_builtin_handlers()


def build_tree(model: nn.Module, path: str = "") -> Node:
    """The node tree of a model; unknown modules become `Unsupported` placeholders."""

    def build(module: nn.Module, module_path: str) -> Node:
        kind = type(module)
        if kind in _HANDLERS:
            return _HANDLERS[kind](module, module_path, build)
        for base in kind.__mro__[1:]:
            if base in _HANDLERS and base is not nn.Module:
                overridden = _forward_overridden(module, base) or (
                    base is ResNet and _forward_overridden(module, base, "_forward_impl"))
                if not overridden:
                    return _HANDLERS[base](module, module_path, build)
                break
        return Unsupported(module, module_path)

    return build(model, path)


def modules_called_once(tree: Node) -> dict[str, Node]:
    """Nodes that own a named module (the possible capture points), by path."""
    return {n.path: n for n in tree.nodes() if n.path is not None}
