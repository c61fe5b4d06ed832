"""The graph engine on CNN families beyond ResNet / VGG, against an independent autograd
implementation on a small net with each new op, and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from wsss.cam import LiftCAM, RelevanceCAM, Rule, register_rule, start_relevance, unregister_rule

C = 6
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
T = torch.tensor([[1, 4], [2, 5]])
GAMMA = dict(conv=Rule("gamma", gamma=0.25))


def torchvision_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None, num_classes=C).eval()


def timm_model(name: str) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=C).eval()


# (builder, name, layers, options). Options: the `lrp` preset (z⁺, one-hot start) conserves
# relevance where every neuron that carries relevance has some positive evidence (ReLU nets).
# EfficientNet and MobileNet-V3 have linear bottlenecks whose outputs can be purely negative
# evidence, which z⁺ drops by design; there the sign-aware γ rule for convs conserves instead.
FAMILIES = [
    pytest.param(
        torchvision_model,
        "densenet121",
        ["features.denseblock2", "features.transition3", "features.norm5"],
        {},
        marks=pytest.mark.slow,
        id="densenet121",
    ),
    pytest.param(
        torchvision_model,
        "efficientnet_b0",
        ["features.3", "features.5", "features.8"],
        GAMMA,
        id="efficientnet_b0",
    ),
    pytest.param(
        torchvision_model,
        "mobilenet_v3_small",
        ["features.3", "features.8", "features.12"],
        GAMMA,
        id="mobilenet_v3_small",
    ),
    pytest.param(
        torchvision_model,
        "convnext_tiny",
        ["features.3", "features.5", "features.7"],
        {},
        marks=pytest.mark.slow,
        id="convnext_tiny",
    ),
    pytest.param(
        torchvision_model,
        "regnet_y_400mf",
        ["trunk_output.block2", "trunk_output.block3", "trunk_output.block4"],
        {},
        id="regnet_y_400mf",
    ),
    pytest.param(timm_model, "resnet18", ["layer2", "layer3", "layer4"], {}, id="timm_resnet18"),
]


def assert_maps_close(got, want, rtol=1e-4):
    scale = want.abs().max()
    assert (got - want).abs().max() <= rtol * scale + 1e-12, float((got - want).abs().max() / scale)


@pytest.mark.parametrize("build,name,layers,options", FAMILIES)
def test_family_conservation_batching_and_layers(build, name, layers, options):
    model = build(name)
    with RelevanceCAM(model, layers, preset="lrp", **options) as cam:
        relevance = cam.relevance(X, T)
        maps = cam(X, T)
        for layer in layers:  # one-hot start, conservative rules: total relevance 1 everywhere
            totals = relevance[layer][1].sum(tuple(range(2, relevance[layer][1].dim())))
            torch.testing.assert_close(totals, torch.ones_like(totals), rtol=1e-4, atol=0)
            assert torch.isfinite(maps[layer]).all() and maps[layer].shape[:2] == (2, 2)
        for b in range(2):  # B=2, K=2 in one sweep equals one image and one class at a time
            for k in range(2):
                alone = cam(X[b : b + 1], T[b, k : k + 1])
                for layer in layers:
                    assert_maps_close(maps[layer][b, k], alone[layer][0, 0])
    for layer in layers:  # several layers in one sweep equal one layer per call
        with RelevanceCAM(model, [layer], preset="lrp", **options) as cam:
            assert_maps_close(maps[layer], cam(X, T)[layer])


# ---- an independent implementation: LRP as the gradient of a modified forward ----------------
#
# Every layer's output y is replaced by a value-preserving surrogate y' whose gradient carries the
# rule: y' = z·[y/z] + [y - z·[y/z]] with [·] detached and z the rule's denominator as a function
# of the input. Then (activation ⊙ gradient) at any tensor is its LRP relevance, when the logits'
# gradient is e_t / y_t. Pass-through ops use z = their input; a gate is simply detached.
# (activation ⊙ gradient cannot carry relevance through a zero-valued input, which the identity
# rule of LayerNorm does: the net uses SiLU, not ReLU, so that no activation is exactly 0.)


def surrogate(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    ratio = torch.where(z != 0, y / torch.where(z != 0, z, 1.0), 0.0).detach()
    return z * ratio + (y - z * ratio).detach()


def zplus(fn, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """z⁺ (bias ignored): z = W⁺x⁺ + W⁻x⁻, with fn(input, weight) the layer without bias."""
    z = fn(x.clamp(min=0), weight.clamp(min=0)) + fn(x.clamp(max=0), weight.clamp(max=0))
    return surrogate(z, y)


def passthrough(u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return surrogate(u, y)


class SmallNet(nn.Module):
    """Concatenation, a squeeze-excitation gate, LayerNorm (channels last), GELU, a residual."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU()
        )
        self.branch_a = nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), nn.SiLU())
        self.branch_b = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.SiLU())
        self.se_fc1, self.se_fc2 = nn.Conv2d(10, 4, 1), nn.Conv2d(4, 10, 1)
        self.norm = nn.LayerNorm(10)
        self.conv = nn.Conv2d(10, 10, 3, padding=1, bias=False)
        self.fc = nn.Linear(10, C)

    def forward(self, x):
        h = self.stem(x)
        h = torch.cat([self.branch_a(h), self.branch_b(h)], 1)
        gate = torch.sigmoid(self.se_fc2(F.relu(self.se_fc1(h.mean((2, 3), keepdim=True)))))
        h = h * gate
        n = self.norm(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = F.gelu(self.conv(n)) + h
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def lrp_forward(self, x, low, high, keep):
        """The same forward with rule surrogates (lrp preset; z^B at the input)."""
        conv0, bn = self.stem[0], self.stem[1]
        y = conv0(x)
        z = (
            conv0(x)
            - F.conv2d(low, conv0.weight.clamp(min=0), None, 1, 1)
            - F.conv2d(high, conv0.weight.clamp(max=0), None, 1, 1)
        )
        h = surrogate(z, y)
        h = passthrough(h, bn(h))
        h = keep("stem", passthrough(h, F.silu(h)))

        def conv(module, inp):
            fn = lambda v, w: F.conv2d(v, w, None, module.stride, module.padding)  # noqa: E731
            return zplus(fn, inp, module(inp), module.weight)

        a = conv(self.branch_a[0], h)
        a = keep("branch_a", passthrough(a, F.silu(a)))
        b = conv(self.branch_b[0], h)
        b = passthrough(b, F.silu(b))
        h = torch.cat([a, b], 1)
        with torch.no_grad():
            gate = torch.sigmoid(self.se_fc2(F.relu(self.se_fc1(h.mean((2, 3), keepdim=True)))))
        h = h * gate
        u = h.permute(0, 2, 3, 1)
        n = keep("norm", passthrough(u, self.norm(u))).permute(0, 3, 1, 2)
        c = keep("conv", conv(self.conv, n))
        h = passthrough(c, F.gelu(c)) + h
        pooled = F.adaptive_avg_pool2d(h, 1)
        up = pooled >= 0  # sign-aware z⁺ pooling
        z = torch.where(
            up, F.adaptive_avg_pool2d(h.clamp(min=0), 1), F.adaptive_avg_pool2d(h.clamp(max=0), 1)
        )
        v = surrogate(z, pooled).flatten(1)
        return zplus(lambda v, w: v @ w.t(), v, self.fc(v), self.fc.weight)


def test_small_net_matches_autograd_oracle():
    torch.manual_seed(0)
    net = SmallNet().double().eval()
    with torch.no_grad():
        net.stem[1].running_mean.uniform_(-0.2, 0.2)
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.3, 0.3)
    x = X.double()
    t = torch.tensor([1, 4])
    layers = ["input", "stem", "branch_a", "norm", "conv"]
    with RelevanceCAM(net, layers, preset="lrp") as cam:
        got = cam.relevance(x, t)
        maps = cam(x, t)
    kept = {}

    def keep(name, tensor):
        tensor.retain_grad()
        kept[name] = tensor
        return tensor

    x_leaf = x.clone().requires_grad_(True)
    low = x.amin((1, 2, 3), keepdim=True).expand_as(x).clone().requires_grad_(True)
    high = x.amax((1, 2, 3), keepdim=True).expand_as(x).clone().requires_grad_(True)
    logits = net.lrp_forward(x_leaf, low, high, keep)
    torch.testing.assert_close(logits, net(x))  # the surrogates keep every value
    seed = torch.zeros_like(logits).scatter_(1, t[:, None], 1.0) / logits.gather(1, t[:, None])
    logits.backward(seed)
    want = {name: tensor.detach() * tensor.grad for name, tensor in kept.items()}
    want["input"] = x * x_leaf.grad + low * low.grad + high * high.grad  # z^B: x, l and h terms
    for layer in layers:
        torch.testing.assert_close(got[layer][1][:, 0], want[layer], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(maps["input"][:, 0], want["input"].sum(1))  # the pixel heatmap
    assert maps["input"].shape == (2, 1, 64, 64)


def test_liftcam_head_through_functions_densenet_completeness():
    """DeepLIFT completeness Σφ = y_t(A) - y_t(0) through DenseNet's functional head
    (in-place F.relu, F.adaptive_avg_pool2d, torch.flatten, Linear)."""
    model = torchvision_model("densenet121")
    t = torch.tensor([[1], [3]])
    cam = LiftCAM(model, ["features.norm5"])
    with torch.no_grad():
        _, acts = cam.record(X, keep_graph=False)
    a = acts["features.norm5"]
    with torch.enable_grad():
        phi = cam._contributions(cam.heads["features.norm5"], a, t)

    def head(v):
        return model.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(v), 1), 1))

    with torch.no_grad():
        delta = (head(a) - head(torch.zeros_like(a))).gather(1, t)[:, 0]
        torch.testing.assert_close(head(a), model(X))
    torch.testing.assert_close(phi.sum((1, 2, 3, 4)), delta, rtol=1e-4, atol=1e-5)


# ---- errors and registration -------------------------------------------------------------------


class Rolled(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, dims=3)


def rolled_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        Rolled(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def test_op_without_rule_fails_at_construction_naming_node_op_module_and_fix():
    with pytest.raises(NotImplementedError) as info:
        RelevanceCAM(rolled_net(), ["0"])
    message = str(info.value)
    for part in (
        "'roll'",
        "call_function",
        "torch.roll",
        "module '2'",
        "Rolled",
        "register_rule(torch.roll",
        "register_handler(Rolled",
    ):
        assert part in message, (part, message)
    RelevanceCAM(rolled_net(), ["3"])  # the unsupported op lies below the layer: fine


def test_register_rule_for_a_function_and_a_custom_function_rule():
    net = rolled_net()
    x = torch.rand(2, 3, 12, 12)
    try:
        register_rule(torch.roll, "identity")
        with RelevanceCAM(net, ["1"], preset="lrp") as cam:
            identity = cam.relevance(x, torch.tensor([0, 2]))["1"][1]
        # the exact rule: relevance rolls back with the values
        register_rule(torch.roll, lambda module, inp, out, r: torch.roll(r, -1, dims=4))
        with RelevanceCAM(net, ["1"], preset="lrp") as cam:
            rolled = cam.relevance(x, torch.tensor([0, 2]))["1"][1]
    finally:
        unregister_rule(torch.roll)
    torch.testing.assert_close(rolled, torch.roll(identity, -1, dims=4))
    torch.testing.assert_close(rolled.sum((2, 3, 4)), torch.ones(2, 1), rtol=1e-5, atol=0)


def test_layer_inside_a_gate_gets_no_relevance():
    model = torchvision_model("efficientnet_b0")
    with pytest.raises(ValueError, match="no relevance reaches 'features.1.0.block.1.fc1'"):
        RelevanceCAM(model, ["features.1.0.block.1.fc1"])


def test_untraceable_forward_is_reported():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            x = self.conv(x)
            return x.mean((2, 3)) if x.sum() > 0 else x.amax((2, 3))

    with pytest.raises(RuntimeError, match="could not trace Branchy with torch.fx"):
        RelevanceCAM(Branchy(), ["conv"])


def test_sign_aware_pooling_closed_form():
    """Average pooling of signed inputs: each output's relevance goes to the inputs of its sign."""

    class Pool(nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, 2).flatten(1)

    x = torch.tensor([[[[1.0, -3.0], [2.0, -1.0]]], [[[-1.0, -2.0], [4.0, -2.0]]]])
    with RelevanceCAM(Pool(), ["input"], preset="lrp") as cam:
        r = cam.relevance(x, torch.tensor([0, 0]))["input"][1][:, 0, 0]
    # image 0: mean -0.25 < 0 -> shares of -3 and -1; image 1: mean -0.25 < 0 -> -1, -2, -2
    torch.testing.assert_close(r[0], torch.tensor([[0.0, 0.75], [0.0, 0.25]]))
    torch.testing.assert_close(r[1], torch.tensor([[0.2, 0.4], [0.0, 0.4]]))


def test_functional_conv_and_linear_equal_their_modules():
    """F.conv2d / F.linear with a module's own weights (as timm's StdConv / Linear do) get the
    same rules as nn.Conv2d / nn.Linear, composite and gamma included."""
    torch.manual_seed(0)
    modules = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=2, dilation=2, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, C),
    ).eval()

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = modules[0], modules[2], modules[6]
            self.r1 = nn.ReLU()

        def forward(self, x):
            x = self.r1(F.conv2d(x, self.c1.weight, self.c1.bias, 2, 1))
            x = F.relu(F.conv2d(x, self.c2.weight, self.c2.bias, 1, 2, 2, 2))
            return F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), self.fc.weight, self.fc.bias)

    x = torch.randn(2, 3, 16, 16)
    options = dict(conv=Rule("gamma", gamma=0.5, bias=1.0), linear=Rule("epsilon", bias=1.0))
    with RelevanceCAM(modules, ["input", "1"], preset="lrp", **options) as cam:
        want = cam.relevance(x, T)
    with RelevanceCAM(Functional(), ["input", "r1"], preset="lrp", **options) as cam:
        got = cam.relevance(x, T)
    torch.testing.assert_close(got["input"][1], want["input"][1])
    torch.testing.assert_close(got["r1"][1], want["1"][1])


def test_pointwise_conv_classifier_gets_the_linear_rule():
    """A 1×1 conv on the pooled map whose output is the logits (timm's conv heads: DPN) is a
    Linear layer: the same relevance as the head written as nn.Linear, and with the reference
    preset (conv bias counted twice, Linear bias ignored) conserved when the features have no
    bias. A 1×1 conv inside the features keeps the conv rule."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU())
    fc = nn.Linear(8, C)
    with torch.no_grad():
        fc.bias.copy_(torch.linspace(-0.5, 0.5, C))  # as large as the logits
    conv_fc = nn.Conv2d(8, C, 1)
    with torch.no_grad():
        conv_fc.weight.copy_(fc.weight[:, :, None, None])
        conv_fc.bias.copy_(fc.bias)
    pool = nn.AdaptiveAvgPool2d(1)
    linear_head = nn.Sequential(features, pool, nn.Flatten(), fc).eval()
    conv_head = nn.Sequential(features, pool, conv_fc, nn.Flatten()).eval()
    x = torch.randn(2, 3, 16, 16)
    with RelevanceCAM(linear_head, ["0"], preset="reference") as cam:
        want = cam.relevance(x, T)["0"][1]
    with RelevanceCAM(conv_head, ["0"], preset="reference") as cam:
        got = cam.relevance(x, T)["0"][1]
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        total = start_relevance(conv_head(x), T, "clrp").sum(-1)  # (B, K)
    torch.testing.assert_close(got.sum((2, 3, 4)), total, atol=1e-6, rtol=1e-4)
    # a 1×1 conv with a bias inside the features (not the logits) keeps the conv rule
    inner = nn.Sequential(features, nn.Conv2d(8, 8, 1), nn.ReLU(), pool, nn.Flatten(), fc).eval()
    with torch.no_grad():
        inner[1].bias.fill_(0.5)
    with RelevanceCAM(inner, ["0"], preset="reference") as cam:
        inner_r = cam.relevance(x, T)["0"][1]
    with RelevanceCAM(inner, ["0"], preset="reference", conv=Rule("zplus")) as cam:
        inner_no_bias = cam.relevance(x, T)["0"][1]
    assert not torch.allclose(inner_r, inner_no_bias)
