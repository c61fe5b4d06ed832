"""LRP rules for layers that are linear in their input (Conv, Linear): one small unit each.

A rule maps the relevance R at a layer's output to its input x. The layer is seen through a
`LinearMap`: `forward(x, W)` applies it without bias to per-image tensors (B, in...), and
`backward(s, W)` applies its transpose to relevance-shaped tensors (B*K, out...). Relevance for
the K classes of each image is a (B*K, ...) tensor, image-major; x and every denominator stay
(B, ...) and are broadcast over K, so each extra class costs one transposed operation per layer.

Rules (`Rule.kind`), with x⁺ = max(x, 0), x⁻ = min(x, 0), W⁺/W⁻ likewise, ⊘ = safe division
(0 where the denominator is exactly 0, as the official Relevance-CAM code does):
- zplus:     Z = W⁺x⁺ + W⁻x⁻ + bias·b;            R_in = x⁺⊙W⁺ᵀ(R⊘Z) + x⁻⊙W⁻ᵀ(R⊘Z)
- alphabeta: α·(the z⁺ term with bias·b⁺) − β·(the same with W⁻x⁺ + W⁺x⁻ and bias·b⁻)
- epsilon:   Z = Wx + bias·b, shifted away from 0 by ε·sign(Z);  R_in = x⊙Wᵀ(R/Z)
- gamma:     sign-aware, as zennit's Gamma: where the output as the rule counts it,
             y = Wx + bias·b, is > 0 the weights are W + γW⁺ on x⁺ and W + γW⁻ on x⁻ (bias
             b + γb⁺); where y < 0, W + γW⁻ on x⁺ and W + γW⁺ on x⁻ (bias b + γb⁻). Each
             denominator is then y plus terms of y's sign, so it has the sign of y and |Z| ≥ |y|.
- zb:        the z^B (box) rule for the input layer, bounds l ≤ x ≤ h:
             Z = Wx − W⁺l − W⁻h;  R_in = x⊙Wᵀ(R⊘Z) − l⊙W⁺ᵀ(R⊘Z) − h⊙W⁻ᵀ(R⊘Z)
             (bounds None: the per-image minimum and maximum, as the official code does)
- flat:      every input in the receptive field gets an equal share: W = 1, x = 1
- wsquare:   shares in proportion to W²
`bias` says how many times the layer bias enters the denominator (0: ignored, which keeps the
rule conservative; the official code counts a conv bias twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

RULE_KINDS = ("zplus", "alphabeta", "epsilon", "gamma", "zb", "flat", "wsquare")


@dataclass(frozen=True)
class Rule:
    """An LRP rule for Conv / Linear layers (see the module docstring for the formulas).

    kind: one of RULE_KINDS; alpha / beta: alphabeta weights (alpha - beta = 1);
    epsilon: the epsilon rule's stabiliser; gamma: the gamma rule's weight;
    bias: how many times the bias enters the denominator;
    low / high: the zb rule's input bounds (floats or per-channel sequences; None = the
    per-image minimum / maximum).
    """

    kind: str = "zplus"
    alpha: float = 1.0
    beta: float = 0.0
    epsilon: float = 1e-6
    gamma: float = 0.25
    bias: float = 0.0
    low: float | tuple[float, ...] | None = None
    high: float | tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise ValueError(f"unknown LRP rule {self.kind!r}; choose one of {RULE_KINDS}")
        if self.kind == "alphabeta" and abs(self.alpha - self.beta - 1.0) > 1e-6:
            raise ValueError(
                f"alphabeta rule needs alpha - beta = 1, got {self.alpha}, {self.beta}"
            )
        for name in ("low", "high"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if (self.low is None) != (self.high is None):
            raise ValueError("the zb rule needs both bounds (low and high) or neither")


def as_rule(value: Rule | str | dict) -> Rule:
    """Accept a Rule, a rule name ("zplus", "gamma", ...) or a dict of Rule fields."""
    if isinstance(value, Rule):
        return value
    if isinstance(value, str):
        return Rule(kind=value)
    if isinstance(value, dict):
        return Rule(**value)
    raise TypeError(f"expected a Rule, a rule name or a dict, got {type(value).__name__}")


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


def compute_dtype(t: Tensor) -> torch.dtype:
    """Relevance maths runs in float32, or float64 for a float64 model (never in half)."""
    return torch.promote_types(t.dtype, torch.float32) if t.is_floating_point() else torch.float32


def as_compute(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """t in the relevance dtype (float32 under autocast; float64 stays float64)."""
    dtype = dtype or compute_dtype(t)
    return t if t.dtype == dtype else t.to(dtype)


@dataclass
class LinearMap:
    """A layer y = forward(x, W) + b as the rules see it.

    forward(x, W): the layer without bias on per-image tensors (B, in...);
    backward(s, W): its transpose on (N, out...) tensors, giving (N, in...);
    bias_shape: how the bias broadcasts against the output, e.g. (1, -1, 1, 1) for Conv2d.
    """

    weight: Tensor
    bias: Tensor | None
    forward: Callable[[Tensor, Tensor], Tensor]
    backward: Callable[[Tensor, Tensor], Tensor]
    bias_shape: Sequence[int]

    def with_bias(self, z: Tensor, scale: float, bias: Tensor | None) -> Tensor:
        if scale == 0 or bias is None:
            return z
        return z + scale * bias.view(*self.bias_shape)


def _split_input(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """(x⁺, x⁻), with x⁻ None when x has no negative entry (post-ReLU inputs: half the work)."""
    if bool((x < 0).any()):
        return x.clamp(min=0), x.clamp(max=0)
    return x, None


def _paired(
    layer: LinearMap,
    xp: Tensor,
    xn: Tensor | None,
    r: Tensor,
    z: Tensor,
    w_pos_in: Tensor,
    w_neg_in: Tensor,
) -> Tensor:
    """x⁺⊙Aᵀ(R⊘Z) + x⁻⊙Bᵀ(R⊘Z), where A acts on x⁺ and B on x⁻ in the forward."""
    s = mul_per_image(r, safe_inverse(z))
    out = mul_per_image(layer.backward(s, w_pos_in), xp)
    if xn is not None:
        out = out + mul_per_image(layer.backward(s, w_neg_in), xn)
    return out


def _paired_z(
    layer: LinearMap, xp: Tensor, xn: Tensor | None, w_pos_in: Tensor, w_neg_in: Tensor
) -> Tensor:
    z = layer.forward(xp, w_pos_in)
    return z if xn is None else z + layer.forward(xn, w_neg_in)


def zplus(rule: Rule, layer: LinearMap, x: Tensor, r: Tensor, y: Tensor | None) -> Tensor:
    """LRP-z⁺ (α1β0) with the official code's bias count.

    For a signed input whose output y = Wx + b is known (in x's dtype), the denominator takes
    one product instead of two: W⁺x⁺ + W⁻x⁻ = ½(|W||x| + Wx) with Wx = y − b.
    """
    xp, xn = _split_input(x)
    wp, wn = layer.weight.clamp(min=0), layer.weight.clamp(max=0)
    if xn is not None and y is not None and y.dtype == x.dtype:
        wx = layer.with_bias(y, -1.0, layer.bias)
        z = 0.5 * (layer.forward(x.abs(), layer.weight.abs()) + wx)
    else:
        z = _paired_z(layer, xp, xn, wp, wn)
    z = layer.with_bias(z, rule.bias, layer.bias)
    return _paired(layer, xp, xn, r, z, wp, wn)


def alphabeta(rule: Rule, layer: LinearMap, x: Tensor, r: Tensor, y: Tensor | None) -> Tensor:
    """LRP-αβ: positive and negative contributions, each normalised by its own sum."""
    xp, xn = _split_input(x)
    wp, wn = layer.weight.clamp(min=0), layer.weight.clamp(max=0)
    b = layer.bias
    z = layer.with_bias(
        _paired_z(layer, xp, xn, wp, wn), rule.bias, None if b is None else b.clamp(min=0)
    )
    out = rule.alpha * _paired(layer, xp, xn, r, z, wp, wn)
    if rule.beta != 0:
        z = layer.with_bias(
            _paired_z(layer, xp, xn, wn, wp), rule.bias, None if b is None else b.clamp(max=0)
        )
        out = out - rule.beta * _paired(layer, xp, xn, r, z, wn, wp)
    return out


def epsilon(rule: Rule, layer: LinearMap, x: Tensor, r: Tensor, y: Tensor | None) -> Tensor:
    """LRP-ε: Z = Wx + bias·b, moved away from zero by ε with the sign of Z (sign(0) = +1).

    With the bias counted once Z is the layer's output y: taken as given when known (in x's
    dtype), so the rule needs no product of its own in the forward direction.
    """
    if y is not None and rule.bias == 1.0 and y.dtype == x.dtype:
        z = y
    else:
        z = layer.with_bias(layer.forward(x, layer.weight), rule.bias, layer.bias)
    z = z + torch.where(z >= 0, rule.epsilon, -rule.epsilon)
    s = mul_per_image(r, z.reciprocal())
    return mul_per_image(layer.backward(s, layer.weight), x)


def gamma(rule: Rule, layer: LinearMap, x: Tensor, r: Tensor, y: Tensor | None) -> Tensor:
    """LRP-γ, sign-aware (zennit's Gamma): the favoured weights follow the sign of the output
    with the bias counted as in the denominators (`rule.bias` times). y, the layer's output with
    its whole bias, is shifted to that count: with the bias left out, an output that the bias
    alone makes positive would otherwise get the "positive" weights on a sum Wx < 0, and a
    denominator near 0 (RepVGG's folded BatchNorm shifts: amplification by 1e11)."""
    b = layer.bias
    if y is None:
        y = layer.with_bias(layer.forward(x, layer.weight), rule.bias, b)
    elif b is not None and rule.bias != 1.0:
        y = y - (1.0 - rule.bias) * b.view(*layer.bias_shape)
    xp, xn = _split_input(x)
    w = layer.weight
    w_up = w + rule.gamma * w.clamp(min=0)  # favours positive contributions
    w_down = w + rule.gamma * w.clamp(max=0)  # favours negative contributions
    out = None
    for mask, w_on_pos, w_on_neg, b_mod in (
        (y > 0, w_up, w_down, None if b is None else b + rule.gamma * b.clamp(min=0)),
        (y < 0, w_down, w_up, None if b is None else b + rule.gamma * b.clamp(max=0)),
    ):
        if not bool(mask.any()):
            continue
        z = layer.with_bias(_paired_z(layer, xp, xn, w_on_pos, w_on_neg), rule.bias, b_mod)
        # 0 in the denominator where the mask is off: safe division drops those outputs
        part = _paired(layer, xp, xn, r, z.masked_fill(~mask, 0.0), w_on_pos, w_on_neg)
        out = part if out is None else out + part
    if out is None:
        return torch.zeros(r.shape[0], *x.shape[1:], dtype=r.dtype, device=r.device)
    return out


def _bounds(rule: Rule, x: Tensor) -> tuple[Tensor, Tensor]:
    """The zb rule's (low, high), broadcastable against x (B, C, ...)."""
    if rule.low is None:
        dims = tuple(range(1, x.dim()))
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x.amin(dims).view(shape), x.amax(dims).view(shape)

    def as_tensor(v: Any) -> Tensor:
        t = torch.as_tensor(v, dtype=x.dtype, device=x.device)
        return t.view(1, -1, *([1] * (x.dim() - 2))) if t.dim() == 1 and x.dim() > 2 else t

    return as_tensor(rule.low), as_tensor(rule.high)


def zbox(rule: Rule, layer: LinearMap, x: Tensor, r: Tensor, y: Tensor | None) -> Tensor:
    """z^B: relevance for a box-bounded input (the pixel layer), bias cancels as in zennit."""
    low, high = _bounds(rule, x)
    low, high = low.expand_as(x), high.expand_as(x)
    w = layer.weight
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    z = layer.forward(x, w) - layer.forward(low, wp) - layer.forward(high, wn)
    s = mul_per_image(r, safe_inverse(z))
    return (
        mul_per_image(layer.backward(s, w), x)
        - mul_per_image(layer.backward(s, wp), low)
        - mul_per_image(layer.backward(s, wn), high)
    )


def _shared_share(layer: LinearMap, x: Tensor, r: Tensor, w: Tensor) -> Tensor:
    """R_in = Wᵀ(R ⊘ W·1): relevance shared by the weights w alone (flat, wsquare)."""
    ones = torch.ones_like(x[:1])
    z = layer.forward(ones, w)  # (1, out...): the same for every image
    s = r * safe_inverse(z)
    return layer.backward(s, w)


def flat(rule: Rule, layer: LinearMap, x: Tensor, r: Tensor, y: Tensor | None) -> Tensor:
    """Flat rule: equal shares over each output's receptive field."""
    return _shared_share(layer, x, r, torch.ones_like(layer.weight))


def wsquare(rule: Rule, layer: LinearMap, x: Tensor, r: Tensor, y: Tensor | None) -> Tensor:
    """w² rule: shares in proportion to the squared weights."""
    return _shared_share(layer, x, r, layer.weight.square())


RULE_FUNCTIONS: dict[str, Callable[[Rule, LinearMap, Tensor, Tensor, Tensor | None], Tensor]] = {
    "zplus": zplus,
    "alphabeta": alphabeta,
    "epsilon": epsilon,
    "gamma": gamma,
    "zb": zbox,
    "flat": flat,
    "wsquare": wsquare,
}


def propagate(
    rule: Rule, layer: LinearMap, x: Tensor, r: Tensor, y: Tensor | None = None
) -> Tensor:
    """Relevance r (B*K, out...) at the layer's output -> relevance (B*K, in...) at its input x.

    y is the layer's output (B, out...) with its bias: the sign-aware gamma rule reads it
    (computed if None); epsilon (bias counted once) and zplus (signed x) save a product with it.
    """
    return RULE_FUNCTIONS[rule.kind](rule, layer, x, r, y)
