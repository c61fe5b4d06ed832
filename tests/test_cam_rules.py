"""The LRP rules (wsss/cam/lrp/rules.py) against their formulas written out element by element,
on a small Linear layer with inputs and outputs of both signs; start vectors in closed form."""

from __future__ import annotations

import itertools

import pytest
import torch

from wsss.cam import Rule, start_relevance
from wsss.cam.lrp.ops import linear_map
from wsss.cam.lrp.rules import propagate

torch.set_default_dtype(torch.float64)  # closed forms compared at float64 precision
N_IN, N_OUT, K = 5, 4, 2
GEN = torch.Generator().manual_seed(0)
W = torch.randn(N_OUT, N_IN, generator=GEN, dtype=torch.float64)
B = torch.randn(N_OUT, generator=GEN, dtype=torch.float64) * 0.5
X = torch.randn(2, N_IN, generator=GEN, dtype=torch.float64)  # both signs
R = torch.randn(2 * K, N_OUT, generator=GEN, dtype=torch.float64)  # (B*K, out)
torch.set_default_dtype(torch.float32)


def pos(v: float) -> float:
    return max(v, 0.0)


def neg(v: float) -> float:
    return min(v, 0.0)


def safe(num: float, den: float) -> float:
    """The rules' safe division: 0 where the denominator is exactly 0."""
    return 0.0 if den == 0 else num / den


def per_element(share) -> torch.Tensor:
    """R_in[n, i] = Σ_j share(b, i, j) * R[n, j] / den(b, j), as loops (n = b*K + k)."""
    out = torch.zeros(2 * K, N_IN, dtype=torch.float64)
    for b, k, i in itertools.product(range(2), range(K), range(N_IN)):
        n = b * K + k
        out[n, i] = sum(share(b, i, j) * R[n, j] for j in range(N_OUT))
    return out


def layer():
    return linear_map(W, B)


def test_epsilon_rule():
    eps, bias = 0.1, 1.0

    def z(b, j):
        v = sum(X[b, i] * W[j, i] for i in range(N_IN)) + bias * B[j]
        return v + (eps if v >= 0 else -eps)

    want = per_element(lambda b, i, j: X[b, i] * W[j, i] / z(b, j))
    got = propagate(Rule("epsilon", epsilon=eps, bias=bias), layer(), X, R)
    torch.testing.assert_close(got, want)


def test_zplus_rule_with_bias_count():
    bias = 2.0  # the official Relevance-CAM conv bias count

    def z(b, j):
        return (
            sum(pos(X[b, i]) * pos(W[j, i]) + neg(X[b, i]) * neg(W[j, i]) for i in range(N_IN))
            + bias * B[j]
        )

    want = per_element(
        lambda b, i, j: (pos(X[b, i]) * pos(W[j, i]) + neg(X[b, i]) * neg(W[j, i])) / z(b, j)
    )
    torch.testing.assert_close(propagate(Rule("zplus", bias=bias), layer(), X, R), want)


def test_epsilon_and_zplus_with_the_recorded_output_keep_their_closed_forms():
    """Given the layer's output y = Wx + b, ε (bias counted once) takes Z = y and z⁺ on a signed
    input takes W⁺x⁺ + W⁻x⁻ = ½(|W||x| + y − b): the same relevance as the loops."""
    y = X @ W.t() + B
    eps = 0.1

    def z_eps(b, j):
        v = sum(X[b, i] * W[j, i] for i in range(N_IN)) + B[j]
        return v + (eps if v >= 0 else -eps)

    want = per_element(lambda b, i, j: X[b, i] * W[j, i] / z_eps(b, j))
    got = propagate(Rule("epsilon", epsilon=eps, bias=1.0), layer(), X, R, y)
    torch.testing.assert_close(got, want)
    for bias in (0.0, 2.0):

        def z_plus(b, j, bias=bias):
            return (
                sum(pos(X[b, i]) * pos(W[j, i]) + neg(X[b, i]) * neg(W[j, i]) for i in range(N_IN))
                + bias * B[j]
            )

        want = per_element(
            lambda b, i, j: (
                (pos(X[b, i]) * pos(W[j, i]) + neg(X[b, i]) * neg(W[j, i])) / z_plus(b, j)
            )
        )
        got = propagate(Rule("zplus", bias=bias), layer(), X, R, y)
        torch.testing.assert_close(got, want)


def test_alphabeta_rule():
    alpha, beta = 2.0, 1.0

    def part(b, i, j, sign):
        w = W[j, i]
        if sign > 0:
            return pos(X[b, i]) * pos(w) + neg(X[b, i]) * neg(w)
        return pos(X[b, i]) * neg(w) + neg(X[b, i]) * pos(w)

    def z(b, j, sign):
        return sum(part(b, i, j, sign) for i in range(N_IN)) + (
            pos(B[j]) if sign > 0 else neg(B[j])
        )

    assert any(z(b, j, -1) == 0 for b in range(2) for j in range(N_OUT))  # safe division hit
    want = per_element(
        lambda b, i, j: (
            alpha * safe(part(b, i, j, 1), z(b, j, 1)) - beta * safe(part(b, i, j, -1), z(b, j, -1))
        )
    )
    got = propagate(Rule("alphabeta", alpha=alpha, beta=beta, bias=1.0), layer(), X, R)
    torch.testing.assert_close(got, want)


def test_gamma_rule_follows_the_sign_of_each_output():
    """zennit's Gamma: where y_j > 0 the weights W + γW⁺ act on x⁺ and W + γW⁻ on x⁻ (bias
    b + γb⁺); where y_j < 0 it is the other way round (bias b + γb⁻)."""
    gamma = 0.5
    y = X @ W.t() + B
    assert (y > 0).any() and (y < 0).any()  # both branches are exercised

    def w_mod(j, i, favour):
        w = W[j, i]
        return w + gamma * (pos(w) if favour > 0 else neg(w))

    def contribution(b, i, j):
        favour = 1 if y[b, j] > 0 else -1
        wp, wn = w_mod(j, i, favour), w_mod(j, i, -favour)
        return pos(X[b, i]) * wp + neg(X[b, i]) * wn

    def z(b, j):
        favour = 1 if y[b, j] > 0 else -1
        bias = B[j] + gamma * (pos(B[j]) if favour > 0 else neg(B[j]))
        return sum(contribution(b, i, j) for i in range(N_IN)) + bias

    want = per_element(lambda b, i, j: contribution(b, i, j) / z(b, j))
    got = propagate(Rule("gamma", gamma=gamma, bias=1.0), layer(), X, R, y)
    torch.testing.assert_close(got, want)
    # the denominators share the sign of the outputs, so nothing is amplified through zeros
    assert all(z(b, j) * y[b, j] > 0 for b in range(2) for j in range(N_OUT))


def test_gamma_rule_conserves_without_bias():
    """With the bias left out of the denominators, the sign that picks the weights is the sign of
    Wx, not of the layer's output Wx + b: where the bias alone flips it, the favoured weights
    would act on a sum of the other sign and the denominator could pass through 0."""
    y0 = X @ W.t()
    flip = -1.5 * y0[0]  # a bias that flips every output of the first image
    y = y0 + flip  # the layer's output, as the engine passes it
    assert ((y0 * y)[0] < 0).all() and ((y0 * y)[1] > 0).any()
    for output in (y, None):
        got = propagate(Rule("gamma", gamma=0.25), linear_map(W, flip), X, R, output)
        torch.testing.assert_close(got.sum(1), R.sum(1))


def test_gamma_rule_without_bias_follows_the_sign_of_the_bias_free_output():
    gamma = 0.5
    y0 = X @ W.t()

    def contribution(b, i, j):
        favour = 1 if y0[b, j] > 0 else -1
        w = W[j, i]
        wp = w + gamma * (pos(w) if favour > 0 else neg(w))
        wn = w + gamma * (neg(w) if favour > 0 else pos(w))
        return pos(X[b, i]) * wp + neg(X[b, i]) * wn

    def z(b, j):
        return sum(contribution(b, i, j) for i in range(N_IN))

    want = per_element(lambda b, i, j: contribution(b, i, j) / z(b, j))
    flip = -1.5 * y0[0]
    got = propagate(Rule("gamma", gamma=gamma), linear_map(W, flip), X, R, y0 + flip)
    torch.testing.assert_close(got, want)


def test_zbox_rule_with_bounds():
    low, high = -1.5, 2.0

    def z(b, j):
        return sum(
            X[b, i] * W[j, i] - low * pos(W[j, i]) - high * neg(W[j, i]) for i in range(N_IN)
        )

    want = per_element(
        lambda b, i, j: (X[b, i] * W[j, i] - low * pos(W[j, i]) - high * neg(W[j, i])) / z(b, j)
    )
    torch.testing.assert_close(propagate(Rule("zb", low=low, high=high), layer(), X, R), want)


def test_zbox_rule_default_bounds_are_the_image_range():
    got = propagate(Rule("zb"), layer(), X, R)
    per_image = torch.cat(
        [
            propagate(
                Rule("zb", low=float(X[b].min()), high=float(X[b].max())),
                layer(),
                X[b : b + 1],
                R[b * K : (b + 1) * K],
            )
            for b in range(2)
        ]
    )
    torch.testing.assert_close(got, per_image)


def test_flat_rule_shares_equally():
    want = R.sum(1, keepdim=True).expand(-1, N_IN) / N_IN  # every input feeds every output
    torch.testing.assert_close(propagate(Rule("flat"), layer(), X, R), want)


def test_rule_validation():
    with pytest.raises(ValueError, match="alpha - beta = 1"):
        Rule("alphabeta", alpha=2.0, beta=0.5)
    with pytest.raises(ValueError, match="unknown LRP rule"):
        Rule("zero")
    with pytest.raises(ValueError, match="both bounds"):
        Rule("zb", low=0.0)


# ---- start vectors ---------------------------------------------------------------------------


LOGITS = torch.tensor([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, -3.0]])
TARGETS = torch.tensor([[0, 2], [3, 1]])


def test_clrp_absent_start_vector():
    present = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    got = start_relevance(LOGITS, TARGETS, "clrp_absent", present)
    c = 4
    # image 0, target 0: class 2 is present (not contrasted), classes 1 and 3 absent
    torch.testing.assert_close(got[0, 0], torch.tensor([1.0, -1 / c, 0.0, -1 / c]))
    torch.testing.assert_close(got[0, 1], torch.tensor([0.0, -1 / c, 1.0, -1 / c]))
    # image 1, target 3: class 1 present, classes 0 and 2 absent
    torch.testing.assert_close(got[1, 0], torch.tensor([-1 / c, 0.0, -1 / c, 1.0]))


def test_clrp_absent_without_present_is_clrp_and_ignores_the_other_targets():
    both = start_relevance(LOGITS, TARGETS, "clrp_absent")
    alone = start_relevance(LOGITS, TARGETS[:, :1], "clrp_absent")
    torch.testing.assert_close(both[:, :1], alone)
    torch.testing.assert_close(both, start_relevance(LOGITS, TARGETS, "clrp"))


def test_sglrp_start_vector_is_the_softmax_gradient():
    got = start_relevance(LOGITS, TARGETS, "sglrp")
    for b, k in itertools.product(range(2), range(2)):
        t = int(TARGETS[b, k])
        logits = LOGITS[b].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(torch.softmax(logits, 0)[t], logits)
        torch.testing.assert_close(got[b, k], grad)


# ---- composites ---------------------------------------------------------------------------------


def test_composite_rule_order_name_then_input_then_lower_then_kind():
    from torch import nn

    from wsss.cam import LRPConfig
    from wsss.cam.lrp import LayerInfo

    config = LRPConfig(
        conv=Rule("zplus"),
        linear=Rule("epsilon"),
        input=Rule("zb"),
        lower=Rule("gamma"),
        lower_depth=0.5,
        layer_rules={"layer4.*": Rule("flat"), "Linear": Rule("alphabeta", alpha=2.0, beta=1.0)},
    )
    conv, linear = nn.Conv2d(1, 1, 1), nn.Linear(1, 1)

    def kind(path, module, is_input=False, depth=0.9):
        return config.rule_for(
            LayerInfo(path, module, "conv" if module is conv else "linear", is_input, depth)
        ).kind

    assert kind("layer4.0.conv1", conv, is_input=True) == "flat"  # a name pattern wins
    assert kind("fc", linear) == "alphabeta"  # a type name
    assert kind("conv1", conv, is_input=True, depth=0.0) == "zb"
    assert kind("layer1.0.conv1", conv, depth=0.1) == "gamma"
    assert kind("layer3.0.conv1", conv, depth=0.7) == "zplus"
    assert (
        LRPConfig(linear=Rule("epsilon"))
        .rule_for(LayerInfo("head", linear, "linear", False, 0.9))
        .kind
        == "epsilon"
    )
