"""Padding, interpolation and sums in the LRP engine: closed forms, conservation, the zero pad
folded into the conv after it, timm's TensorFlow-style "same" padding, the untraceable message."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss.cam import PRESETS, RelevanceCAM, Rule, register_rule, unregister_rule
from wsss.cam.lrp.ops.padding import copy_transpose, same_padding

X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
T = torch.tensor([0, 2])
GAMMA = dict(conv=Rule("gamma", gamma=0.25))


def transposed_pad(r: torch.Tensor, shape, pads, mode: str) -> torch.Tensor:
    """The oracle Pᵀr for a pad P: autograd's gradient of F.pad."""
    v = torch.zeros(r.shape[0], *shape[1:], dtype=r.dtype, requires_grad=True)
    (g,) = torch.autograd.grad(F.pad(v, pads, mode=mode), v, r)
    return g


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize(
    "shape,pads", [((2, 3, 7), (2, 1)), ((2, 3, 5, 6), (1, 2, 0, 3)), ((2, 2, 4, 4, 5), (1,) * 6)]
)
def test_copying_pads_add_relevance_onto_the_copied_positions(mode, shape, pads):
    out_shape = F.pad(torch.zeros(shape), pads, mode=mode).shape
    r = torch.randn(out_shape, generator=torch.Generator().manual_seed(1))
    got = copy_transpose(r, shape, pads, mode)
    torch.testing.assert_close(got, transposed_pad(r, shape, pads, mode))
    torch.testing.assert_close(got.sum(), r.sum())  # conserving


def test_reflect_pad_closed_form():
    # [a, b, c] reflect-padded by (2, 1) is [c, b, a, b, c, b]
    r = torch.tensor([[[1.0, 2.0, 4.0, 8.0, 16.0, 32.0]]])
    got = copy_transpose(r, (1, 1, 3), (2, 1), "reflect")
    assert got.flatten().tolist() == [4.0, 2.0 + 8.0 + 32.0, 1.0 + 16.0]


def test_same_padding_matches_tensorflow():
    assert same_padding(64, 3, 2, 1) == (0, 1)  # odd total: the extra pixel after
    assert same_padding(65, 3, 2, 1) == (1, 1)
    assert same_padding(64, 5, 1, 2) == (4, 4)
    assert same_padding(7, 1, 2, 1) == (0, 0)
    timm_padding = pytest.importorskip("timm.layers.padding")
    for size in (31, 32, 33, 64):
        for k, s, d in ((3, 2, 1), (5, 2, 1), (3, 1, 2), (7, 4, 1)):
            assert sum(same_padding(size, k, s, d)) == timm_padding.get_same_padding(size, k, s, d)


class PadMean(nn.Module):
    """logit_j = w_j · mean(pad(x)) over one channel: the pad's value shares the mean."""

    def __init__(self, pad: nn.Module):
        super().__init__()
        self.pad = pad
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0], [2.0]]))

    def forward(self, x):
        return self.fc(self.pad(x).mean((2, 3)))


def test_constant_pad_drops_the_relevance_of_padded_positions():
    x = torch.rand(1, 1, 3, 4) + 0.1
    model = PadMean(nn.ConstantPad2d((1, 2, 0, 1), 0.7)).eval()
    # the Linear reads the image here (no conv before it): z⁺ for it, not the z^B input rule
    with RelevanceCAM(model, ["input"], preset="lrp", input=Rule("zplus")) as cam:
        r = cam.relevance(x, torch.tensor([0]))["input"][1][0, 0]
    n_pad = (4 + 3) * (3 + 1) - 12
    # z⁺ through the mean: shares in proportion to the padded map; the 0.7s are a constant
    torch.testing.assert_close(r, x[0] / (x.sum() + 0.7 * n_pad))


MODES = {
    nn.ReflectionPad2d: "reflect",
    nn.ReplicationPad2d: "replicate",
    nn.CircularPad2d: "circular",
}


class CopyPads(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.pads = nn.ModuleList(
            [
                nn.ReflectionPad2d((1, 2, 0, 1)),
                nn.ReplicationPad2d(1),
                nn.CircularPad2d((0, 1, 1, 0)),
            ]
        )
        torch.manual_seed(0)
        # no conv biases: a bias-only output (all inputs 0) would absorb its relevance
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(3, 4, 3, bias=False),
                nn.Conv2d(4, 4, 3, bias=False),
                nn.Conv2d(4, 5, 2, stride=2, bias=False),
            ]
        )
        self.acts = nn.ModuleList([nn.ReLU() for _ in range(3)])
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        for pad, conv, act in zip(self.pads, self.convs, self.acts):
            if self.functional:
                x = F.pad(x, pad.padding, mode=MODES[type(pad)])
            else:
                x = pad(x)
            x = act(conv(x))
        return self.fc(x.mean((2, 3)))


def test_copying_pads_conserve_through_a_net_and_functional_pad_matches_modules():
    model = CopyPads(functional=False).eval()
    layers = ["acts.0", "acts.1", "acts.2"]
    with RelevanceCAM(model, layers, preset="lrp", **GAMMA) as cam:
        relevance = cam.relevance(X, T)
        maps = cam(X, T)
    for layer in layers:
        total = relevance[layer][1].sum((2, 3, 4))
        torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-4, atol=0)
    with RelevanceCAM(model, ["acts.0", "pads.1"], preset="lrp", **GAMMA) as cam:
        rel = cam.relevance(X, T)  # the pad's relevance back through it is the pad's transpose
    r_out = rel["pads.1"][1].flatten(0, 1)
    want = transposed_pad(r_out, (1, *rel["acts.0"][0].shape[1:]), (1, 1, 1, 1), "replicate")
    torch.testing.assert_close(rel["acts.0"][1].flatten(0, 1), want)
    functional = CopyPads(functional=True).eval()
    functional.load_state_dict(model.state_dict())
    with RelevanceCAM(functional, layers, preset="lrp", **GAMMA) as cam:
        other = cam(X, T)
    for layer in layers:
        torch.testing.assert_close(other[layer], maps[layer])


def pad_net(explicit: bool) -> nn.Module:
    """A pretrained-style net: an explicit ZeroPad2d then conv(padding=0), or the padding in the conv."""
    torch.manual_seed(0)
    c1 = nn.Conv2d(3, 8, 3, padding=0 if explicit else 1)
    c2 = nn.Conv2d(8, 8, 3, stride=2, padding=0 if explicit else 1)
    body = [c1, nn.BatchNorm2d(8), nn.ReLU(), c2, nn.BatchNorm2d(8), nn.ReLU()]
    if explicit:
        body = [nn.ZeroPad2d(1), *body[:3], nn.ZeroPad2d(1), *body[3:]]
    net = nn.Sequential(*body, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(-1.0, 1.0)
    return net.eval()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_zero_pad_then_conv_equals_the_padding_folded_into_the_conv(preset):
    explicit, folded = pad_net(True), pad_net(False)
    torch.testing.assert_close(explicit(X), folded(X))
    with (
        RelevanceCAM(explicit, ["input", "3", "7"], preset=preset) as a,
        RelevanceCAM(folded, ["input", "2", "5"], preset=preset) as b,
    ):
        ma, mb = a(X, T), b(X, T)
    for la, lb in (("input", "input"), ("3", "2"), ("7", "5")):
        torch.testing.assert_close(ma[la], mb[lb], rtol=1e-5, atol=1e-7)


def test_timm_same_padding_modules_are_single_nodes_with_their_rule():
    pytest.importorskip("timm")
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.norm_act import BatchNormAct2d
    from timm.layers.pool2d_same import MaxPool2dSame

    torch.manual_seed(0)
    same = nn.Sequential(
        Conv2dSame(3, 6, 3, stride=2),
        BatchNormAct2d(6, act_layer=nn.ReLU),
        MaxPool2dSame(3, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).eval()
    # the same net written out: the 12 px input pads by (0, 1) for the conv, then the 6 px map
    # by (0, 1) for the pool (with -inf), BatchNorm and ReLU as two modules
    conv = nn.Conv2d(3, 6, 3, stride=2)
    bn = nn.BatchNorm2d(6)
    plain = nn.Sequential(
        nn.ZeroPad2d((0, 1, 0, 1)),
        conv,
        bn,
        nn.ReLU(),
        nn.ConstantPad2d((0, 1, 0, 1), float("-inf")),
        nn.MaxPool2d(3, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    ).eval()
    with torch.no_grad():
        same[1].running_mean.uniform_(-0.3, 0.3)
        same[1].weight.uniform_(-1.0, 1.0)
        conv.load_state_dict(same[0].state_dict())
        bn.load_state_dict(same[1].state_dict())
        plain[8].load_state_dict(same[5].state_dict())
    torch.testing.assert_close(same(X), plain(X))
    for preset in ("default", "stable_gamma", "epsilon_gamma_box"):
        with (
            RelevanceCAM(same, ["input", "1", "2"], preset=preset) as a,
            RelevanceCAM(plain, ["input", "3", "5"], preset=preset) as b,
        ):
            ma, mb = a(X, T), b(X, T)
        for la, lb in (("input", "input"), ("1", "3"), ("2", "5")):
            torch.testing.assert_close(ma[la], mb[lb], rtol=1e-5, atol=1e-7)


class Upsampling(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.up = nn.Upsample(scale_factor=2, mode=mode)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.up(self.act(self.conv(x)))
        return self.fc(F.interpolate(y, size=(5, 7), mode="bilinear").sum((2, 3)))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_interpolation_closed_form_and_sum(mode):
    model = Upsampling(mode).eval()
    with RelevanceCAM(model, ["act", "up"], preset="lrp") as cam:
        rel = cam.relevance(X, T)
    a, r_up = rel["act"][0], rel["up"][1].flatten(0, 1)
    for layer in ("act", "up"):  # one-hot start, non-negative inputs: everything conserved
        total = rel[layer][1].sum((2, 3, 4))
        torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-5, atol=0)
    # the oracle, by autograd: nearest copies (R_in = Pᵀ R); bilinear shares z⁺ (x ⊙ Pᵀ(R ⊘ Px))
    v = torch.zeros(r_up.shape[0], *a.shape[1:], requires_grad=True)
    up = model.up(v)
    a_k = a  # one class per image: (B*K, ...) is (B, ...)
    if mode == "nearest":
        (want,) = torch.autograd.grad(up, v, r_up)
    else:
        z = model.up(a_k)
        (g,) = torch.autograd.grad(
            up, v, torch.where(z != 0, r_up / torch.where(z != 0, z, 1.0), 0.0)
        )
        want = a_k * g
    torch.testing.assert_close(rel["act"][1].flatten(0, 1), want, rtol=1e-4, atol=1e-7)


def test_untraceable_module_is_named_with_the_fix():
    class Gate(nn.Module):
        def forward(self, x):
            return x if x.shape[-1] > 4 and x.sum() > 0 else -x

    net = nn.Sequential(nn.Conv2d(3, 4, 3), Gate(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(RuntimeError) as info:
        RelevanceCAM(net.eval(), ["0"])
    message = str(info.value)
    assert "\n" not in message
    assert "in module '1'" in message and "register_rule(Gate, rule)" in message


def crop_to_even(x):
    """Size-dependent control flow, which torch.fx cannot trace through."""
    if x.shape[-1] % 2:
        return x[..., :-1, :-1]
    return x


def test_a_registered_python_function_becomes_one_node():
    class Cropping(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(crop_to_even(torch.relu(self.conv(x))).mean((2, 3)))

    model = Cropping().eval()
    with pytest.raises(RuntimeError, match="could not trace"):
        RelevanceCAM(model, ["conv"])

    def rule(module, x, y, r):  # the crop drops the last row and column
        return F.pad(r, (0, 1, 0, 1))

    register_rule(crop_to_even, rule)
    try:
        x = torch.randn(2, 3, 13, 13)
        with RelevanceCAM(model, ["conv"], preset="lrp", **GAMMA) as cam:
            r = cam.relevance(x, torch.tensor([0, 1]))["conv"][1]
        assert r.shape == (2, 1, 4, 11, 11) and float(r[..., -1, :].abs().sum()) == 0.0
    finally:
        unregister_rule(crop_to_even)


def test_stack_then_attention_sum_conserves_per_branch():
    """Selective-kernel style: two branches stacked, weighted by a softmax over the branches
    (a gate, held constant) and summed over the stack: each branch gets its own slice back."""

    class SK(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.b = nn.Conv2d(3, 4, 5, padding=2, bias=False)
            self.act_a, self.act_b = nn.ReLU(), nn.ReLU()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            branches = torch.stack([self.act_a(self.a(x)), self.act_b(self.b(x))], dim=1)
            attn = torch.softmax(branches.sum(1).mean((2, 3), keepdim=True).unsqueeze(1), dim=1)
            return self.fc((branches * attn).sum(1).mean((2, 3)))

    model = SK().eval()
    with RelevanceCAM(model, ["act_a", "act_b"], preset="lrp", **GAMMA) as cam:
        rel = cam.relevance(X, T)
    total = rel["act_a"][1].sum((2, 3, 4)) + rel["act_b"][1].sum((2, 3, 4))
    torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-5, atol=0)
    assert float(rel["act_a"][1].sum()) > 0 and float(rel["act_b"][1].sum()) > 0
