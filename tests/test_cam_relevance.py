"""Relevance-CAM against plainly written references (autograd z⁺, closed form, conservation)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from wsss.cam import RelevanceCAM, Rule, list_presets, preset_config

C = 20


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, so BN is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
    return model.eval()


def resnet(arch: str = "resnet18", seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(
        getattr(torchvision.models, arch)(weights=None, num_classes=C, **kwargs), seed
    )


def images(b: int = 2, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- an independent, slow implementation of the official rules (autograd z⁺ per module) -----


def zplus(fn_pos, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """R_in = x ⊙ ∂/∂x <fn_pos(x), R ⊘ Z>, Z = fn_pos(x)  (x >= 0 here)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        z = fn_pos(x)
        s = torch.where(z == 0, torch.zeros_like(r), r / torch.where(z == 0, 1.0, z))
        (g,) = torch.autograd.grad(z, x, s)
    return x.detach() * g


def conv_pos(conv: nn.Conv2d, bias_count: float = 0.0):
    w = conv.weight.clamp(min=0)
    b = conv.bias if conv.bias is not None else None

    def fn(x):
        z = F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        return z + bias_count * b.view(1, -1, 1, 1) if b is not None and bias_count else z

    return fn


def start_vector(t: int, kind: str) -> torch.Tensor:
    r = torch.full((1, C), -1.0 / C) if kind == "clrp" else torch.zeros(1, C)
    r[0, t] = 1.0
    return r


def slow_resnet_reference(model, x, t: int, layers, start="clrp", split="signed"):
    """One image, one class: the official Relevance-CAM rules, written module by module."""
    blocks_of = {}
    with torch.no_grad():
        h = model.maxpool(F.relu(model.bn1(model.conv1(x))))
        stage_out = {}
        for name in ["layer1", "layer2", "layer3", "layer4"]:
            recs = []
            for blk in getattr(model, name):
                convs = [blk.conv1, blk.conv2] + ([blk.conv3] if hasattr(blk, "conv3") else [])
                bns = [blk.bn1, blk.bn2] + ([blk.bn3] if hasattr(blk, "bn3") else [])
                inputs, cur = [], h
                for i, (conv, bn) in enumerate(zip(convs, bns)):
                    inputs.append(cur)
                    cur = bn(conv(cur))
                    if i < len(convs) - 1:
                        cur = F.relu(cur)
                a = cur
                b = blk.downsample(h) if blk.downsample is not None else h
                recs.append((blk, convs, inputs, a, b, h))
                h = F.relu(a + b)
            blocks_of[name] = recs
            stage_out[name] = h
        pooled = h.mean((2, 3))
    r = zplus(lambda v: v @ model.fc.weight.clamp(min=0).t(), pooled, start_vector(t, start))
    r = zplus(lambda v: v.mean((2, 3)), h, r)  # GAP: spread in proportion to the activation
    maps = {}
    for name in ["layer4", "layer3", "layer2", "layer1"]:
        if name in layers:
            maps[name] = (r.sum((2, 3))[..., None, None] * stage_out[name]).sum(1)
        if len(maps) == len(layers):
            return maps
        for blk, convs, inputs, a, b, block_in in reversed(blocks_of[name]):
            if split == "positive":
                a, b = a.clamp(min=0), b.clamp(min=0)
            total = a + b

            def frac(v):
                return torch.where(total == 0, 0.0, v / torch.where(total == 0, 1.0, total))

            r_main, r_skip = r * frac(a), r * frac(b)
            for conv, inp in zip(reversed(convs), reversed(inputs)):
                r_main = zplus(conv_pos(conv), inp, r_main)
            if blk.downsample is not None:
                r_skip = zplus(conv_pos(blk.downsample[0]), block_in, r_skip)
            r = r_main + r_skip
    return maps


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def assert_maps_close(got, want, rtol=1e-4):
    scale = want.abs().max()
    assert (got - want).abs().max() <= rtol * scale + 1e-12, float((got - want).abs().max() / scale)


# ---- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch,kwargs",
    [
        ("resnet18", {}),
        ("resnet50", {"replace_stride_with_dilation": [False, False, True]}),
    ],
)
def test_reference_preset_matches_slow_reference(arch, kwargs):
    model = resnet(arch, **kwargs)
    x = images(2, 64)
    targets = torch.tensor([3, 11])
    layers = ["layer2", "layer3", "layer4"]
    with RelevanceCAM(model, layers, preset="reference") as cam:
        maps = cam(x, targets)
    for i in range(2):
        want = slow_resnet_reference(model, x[i : i + 1], int(targets[i]), layers)
        for layer in layers:
            assert_maps_close(maps[layer][i, 0], want[layer][0])
            assert corr(maps[layer][i, 0], want[layer][0]) > 0.9999


def test_positive_split_matches_slow_reference():
    model = resnet("resnet18")
    x = images(1, 64)
    with RelevanceCAM(model, ["layer2"], preset="reference", residual="positive") as cam:
        got = cam(x, torch.tensor([5]))["layer2"][0, 0]
    want = slow_resnet_reference(model, x, 5, ["layer2"], split="positive")["layer2"][0]
    assert_maps_close(got, want)


def clrp_rho(model: nn.Module, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ρ_k of docs/ALGORITHMS.md §1.5: the CLRP relevance of each pooled layer4 channel."""
    a_bar = a.mean((2, 3))  # (B, 512)
    w_pos = model.fc.weight.clamp(min=0)  # (C, 512)
    z = a_bar @ w_pos.t()  # (B, C)
    ratio = w_pos.unsqueeze(0) / z.unsqueeze(2)  # (B, C, 512)
    own = ratio[torch.arange(len(t)), t]  # (B, 512)
    others = (ratio.sum(1) - own) / C
    return a_bar * (own - others)


def test_closed_form_at_last_layer():
    """The closed form derived in docs/ALGORITHMS.md: layer4 map = Σ_k ρ_k A_k with the CLRP ρ."""
    model = resnet("resnet18")
    x = images(2, 64)
    t = torch.tensor([0, 7])
    with RelevanceCAM(model, ["layer4"], preset="reference") as cam:
        got = cam(x, t)["layer4"][:, 0]
        a = cam.relevance(x, t)["layer4"][0]
    want = torch.einsum("bk,bkhw->bhw", clrp_rho(model, a, t), a)
    assert_maps_close(got, want, rtol=1e-5)


def test_position_weights_closed_form_at_last_layer():
    """weights="position" (docs/ALGORITHMS.md §7.10): layer4 map = Σ_k ρ_k A_k / Σ_ij A_k, each
    channel's closed-form ρ_k spread over its positions in proportion to its activation."""
    model = resnet("resnet18")
    x = images(2, 64)
    t = torch.tensor([0, 7])
    with RelevanceCAM(model, ["layer4"], preset="reference", weights="position") as cam:
        got = cam(x, t)["layer4"][:, 0]
        a = cam.relevance(x, t)["layer4"][0]
    share = a / a.sum((2, 3), keepdim=True).clamp(min=1e-30)
    want = torch.einsum("bk,bkhw->bhw", clrp_rho(model, a, t), share)
    assert_maps_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_conservation_zplus_one_hot(arch):
    """Bias-free ResNet, z⁺, one-hot start, signed split: every layer carries total relevance 1."""
    model = resnet(arch)
    x = images(2, 64)
    layers = ["layer1", "layer2", "layer3", "layer4"]
    with RelevanceCAM(model, layers, preset="lrp") as cam:
        out = cam.relevance(x, torch.tensor([[1, 2], [3, 4]]))
    for layer in layers:
        totals = out[layer][1].sum((2, 3, 4))
        torch.testing.assert_close(totals, torch.ones_like(totals), rtol=1e-4, atol=0)


def test_conservation_reference_total_is_one_over_c():
    model = resnet("resnet18")
    with RelevanceCAM(model, ["layer1", "layer3"], preset="reference") as cam:
        out = cam.relevance(images(2, 64), torch.tensor([4, 9]))
    for layer in ["layer1", "layer3"]:
        totals = out[layer][1].sum((2, 3, 4))
        torch.testing.assert_close(totals, torch.full_like(totals, 1.0 / C), rtol=1e-4, atol=0)


def test_conservation_sequential_conv_stack_with_pools():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2, bias=False),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(32, 32, 1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(3),
        nn.Flatten(),
        nn.Linear(32 * 9, 8),
        nn.ReLU(),
        nn.Dropout(),
        nn.Linear(8, 5),
    )
    randomize_bn(net)
    layers = ["1", "5", "7", "10"]
    with RelevanceCAM(net, layers, preset="lrp") as cam:
        out = cam.relevance(images(3, 32), torch.tensor([0, 2, 4]))
    for layer in layers:
        totals = out[layer][1].sum((2, 3, 4))
        torch.testing.assert_close(totals, torch.ones_like(totals), rtol=1e-4, atol=0)


def test_class_batching_equals_separate_calls():
    model = resnet("resnet18")
    x = images(2, 64)
    targets = torch.tensor([[1, 5, 9], [0, 2, 19]])
    layers = ["layer2", "layer4"]
    # clrp_absent ("stable") contrasts against the classes absent from `present`
    present = torch.zeros(2, C, dtype=torch.bool).scatter_(1, targets, True)
    for preset in ["reference", "default", "stable", "sglrp"]:
        with RelevanceCAM(model, layers, preset=preset) as cam:
            together = cam(x, targets, present=present)
            for k in range(3):
                alone = cam(x, targets[:, k], present=present)
                for layer in layers:
                    torch.testing.assert_close(
                        together[layer][:, k], alone[layer][:, 0], rtol=1e-5, atol=1e-7
                    )


def test_multi_layer_sweep_equals_single_layer_calls():
    model = resnet("resnet50")
    x = images(1, 64)
    t = torch.tensor([[2, 6]])
    layers = ["layer1", "layer2", "layer3", "layer4"]
    with RelevanceCAM(model, layers, preset="reference") as cam:
        together = cam(x, t)
    for layer in layers:
        with RelevanceCAM(model, [layer], preset="reference") as cam:
            torch.testing.assert_close(together[layer], cam(x, t)[layer], rtol=1e-5, atol=0)
    assert together["layer1"].shape == (1, 2, 16, 16)


def test_inner_module_capture_and_output_shapes():
    model = resnet("resnet18")
    x = images(2, 64)
    with RelevanceCAM(model, ["layer4.1.bn2", "layer4.0.downsample", "layer3.1"]) as cam:
        maps = cam(x, torch.tensor([1, 2]))
    assert maps["layer4.1.bn2"].shape == (2, 1, 2, 2)
    assert maps["layer3.1"].shape == (2, 1, 4, 4)


def test_vgg16_bn_reference_layers_run():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.vgg16_bn(weights=None, num_classes=C))
    x = images(2, 64)
    with RelevanceCAM(
        model, ["features.23", "features.33", "features.43"], preset="reference"
    ) as cam:
        maps = cam(x, torch.tensor([[1, 2], [3, 4]]))
    assert maps["features.23"].shape == (2, 2, 8, 8)
    assert maps["features.43"].shape == (2, 2, 2, 2)
    assert all(torch.isfinite(m).all() for m in maps.values())


def slow_vgg_reference(model, x, t: int, layer_index: int):
    """The official VGG rules: classifier z⁺ (no bias), avgpool z⁺, convs z⁺ with 2b, WTA pools."""
    feats = list(model.features)
    with torch.no_grad():
        inputs, h = [], x
        for m in feats:
            inputs.append(h)
            h = m(h.clone())
        pooled = model.avgpool(h)
        lin_in, v = [], pooled.flatten(1)
        for m in model.classifier:
            lin_in.append(v)
            v = m(v.clone())
    r = start_vector(t, "clrp")
    for m, inp in zip(reversed(list(model.classifier)), reversed(lin_in)):
        if isinstance(m, nn.Linear):
            r = zplus(lambda u, m=m: u @ m.weight.clamp(min=0).t(), inp, r)
    r = r.view_as(pooled)
    r = zplus(model.avgpool, h, r)
    for i in range(len(feats) - 1, layer_index, -1):
        m, inp = feats[i], inputs[i]
        if isinstance(m, nn.Conv2d):
            r = zplus(conv_pos(m, 2.0), inp, r)
        elif isinstance(m, nn.MaxPool2d):
            r = zplus(m, inp, r)
    act = inputs[layer_index + 1] if layer_index + 1 < len(feats) else h
    return (r.sum((2, 3))[..., None, None] * act).sum(1)


def test_vgg_reference_matches_slow_reference():
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.vgg11_bn(weights=None, num_classes=C))
    with torch.no_grad():  # make the VGG conv biases visible
        for m in model.features:
            if isinstance(m, nn.Conv2d):
                m.bias.uniform_(-0.05, 0.1)
    x = images(1, 48)
    layers = ["features.14", "features.21", "features.28"]
    with RelevanceCAM(model, layers, preset="reference") as cam:
        maps = cam(x, torch.tensor([6]))
    for layer in layers:
        want = slow_vgg_reference(model, x, 6, int(layer.split(".")[1]))
        assert_maps_close(maps[layer][0, 0], want[0])


def test_presets_listed_and_options_override():
    presets = list_presets()
    assert {"reference", "default", "lrp"} <= set(presets)
    cfg = preset_config("reference", residual="positive", conv="epsilon")
    assert cfg.residual == "positive" and cfg.conv.kind == "epsilon"
    with pytest.raises(TypeError, match="unknown RelevanceCAM option"):
        preset_config("reference", colour="red")
    with pytest.raises(ValueError, match="unknown Relevance-CAM preset"):
        preset_config("nope")


@pytest.mark.parametrize(
    "options",
    [
        dict(conv="epsilon"),
        dict(conv="gamma"),
        dict(conv=dict(kind="alphabeta", alpha=2.0, beta=1.0)),
        dict(batchnorm="fold"),
        dict(residual="abs"),
        dict(start="sglrp"),
        dict(weights="mean"),
    ],
)
def test_other_rules_run_and_are_finite(options):
    model = resnet("resnet18")
    with RelevanceCAM(model, ["layer2", "layer4"], preset="reference", **options) as cam:
        maps = cam(images(2, 64), torch.tensor([[1, 3], [2, 4]]))
    assert all(torch.isfinite(m).all() and m.abs().sum() > 0 for m in maps.values())


def test_fold_with_identity_bn_equals_identity_mode():
    """With BN at its initial state (identity in eval), folding changes nothing."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=C).eval()
    x = images(1, 64)
    with RelevanceCAM(model, ["layer2"], preset="lrp") as cam:
        a = cam(x, torch.tensor([3]))["layer2"]
    with RelevanceCAM(model, ["layer2"], preset="lrp", batchnorm="fold") as cam:
        b = cam(x, torch.tensor([3]))["layer2"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_clrp_absent_uses_present_set():
    model = resnet("resnet18")
    x = images(1, 64)
    present = torch.zeros(1, C, dtype=torch.bool)
    present[0, [2, 5]] = True
    with RelevanceCAM(model, ["layer4"], preset="reference", start="clrp_absent") as cam:
        with_present = cam(x, torch.tensor([2]), present=present)["layer4"]
        fallback = cam(x, torch.tensor([2]))["layer4"]
    with RelevanceCAM(model, ["layer4"], preset="reference") as cam:
        reference = cam(x, torch.tensor([2]))["layer4"]
    torch.testing.assert_close(fallback, reference)  # single present class: same as clrp
    assert not torch.allclose(with_present, reference)


# ---- engine defects found by review: each test pins a fixed bug ----------------------------------


def negative_bn_scales(model: nn.Module, seed: int = 0) -> nn.Module:
    """Flip the sign of a third of the BN scales, so conv outputs of both signs carry relevance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(
                    torch.where(torch.rand(m.num_features, generator=g) < 1 / 3, -1.0, 1.0)
                )
    return model


def test_gamma_rule_is_sign_aware_and_conserves_with_negative_bn_scales():
    """The γ rule must favour the output's own sign; favouring W⁺ everywhere gave denominators
    near zero for negative outputs (relevance of 1e7, totals far from 1)."""
    model = negative_bn_scales(resnet("resnet18"))
    layers = ["layer1", "layer2", "layer3"]
    with RelevanceCAM(model, layers, preset="lrp", conv=Rule("gamma", gamma=0.25)) as cam:
        out = cam.relevance(images(2, 64), torch.tensor([3, 8]))
    for layer in layers:
        r = out[layer][1]
        torch.testing.assert_close(r.sum((2, 3, 4)), torch.ones(2, 1), rtol=1e-4, atol=0)
        assert r.abs().max() < 1.0, float(r.abs().max())


def folded_copy(model: nn.Module) -> nn.Module:
    """The model with every BatchNorm folded by hand into the conv before it (BN -> Identity)."""
    model = copy.deepcopy(model)
    for block in [model] + [
        b for layer in ["layer1", "layer2", "layer3", "layer4"] for b in getattr(model, layer)
    ]:
        pairs = [("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")]
        if block.__dict__.get("_modules", {}).get("downsample") is not None:
            pairs.append(("downsample.0", "downsample.1"))
        for conv_name, bn_name in pairs:
            if not hasattr(block, conv_name.split(".")[0]):
                continue
            conv, bn = block.get_submodule(conv_name), block.get_submodule(bn_name)
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            folded = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                conv.dilation,
                conv.groups,
                bias=True,
            )
            with torch.no_grad():
                folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
                folded.bias.copy_(bn.bias - bn.running_mean * scale)
            parent, _, name = conv_name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, name, folded)
            parent, _, name = bn_name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, name, nn.Identity())
    return model.eval()


def test_batchnorm_fold_equals_folding_by_hand():
    """batchnorm="fold" where it matters (negative BN scales, the bias counted): the maps equal
    those of the same network with BN folded into its convs by hand, and differ from identity."""
    model = negative_bn_scales(resnet("resnet18"))
    folded = folded_copy(model)
    x, t = images(2, 64), torch.tensor([[1, 6], [2, 9]])
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    layers = ["layer2", "layer4"]
    options = dict(conv=Rule("zplus", bias=1.0))
    with RelevanceCAM(model, layers, preset="lrp", batchnorm="fold", **options) as cam:
        got = cam(x, t)
    with RelevanceCAM(folded, layers, preset="lrp", **options) as cam:
        want = cam(x, t)
    with RelevanceCAM(model, layers, preset="lrp", batchnorm="identity", **options) as cam:
        unfolded = cam(x, t)
    for layer in layers:
        assert_maps_close(got[layer], want[layer], rtol=1e-4)
    # below layer4 the sweep crosses convs, where folding the BN changes the rule's result
    assert (unfolded["layer2"] - want["layer2"]).abs().max() > 0.05 * want["layer2"].abs().max()


def test_clrp_absent_map_does_not_depend_on_the_other_requested_classes():
    model = resnet("resnet18")
    x = images(2, 64)
    with RelevanceCAM(model, ["layer3"], preset="stable") as cam:
        both = cam(x, torch.tensor([[2, 5], [7, 1]]))["layer3"]
        alone = cam(x, torch.tensor([2, 7]))["layer3"]
    torch.testing.assert_close(both[:, 0], alone[:, 0], rtol=1e-5, atol=1e-8)


def test_float64_model():
    model = resnet("resnet18")
    x, t = images(2, 64), torch.tensor([[3, 4], [0, 8]])
    with RelevanceCAM(model, ["layer2", "layer4"], preset="reference") as cam:
        single = cam(x, t)
    model.double()
    with RelevanceCAM(model, ["layer2", "layer4"], preset="reference") as cam:
        double = cam(x.double(), t)
    for layer in single:
        assert double[layer].dtype == torch.float64
        assert_maps_close(single[layer].double(), double[layer], rtol=1e-4)


def test_duplicate_layer_names_are_rejected():
    with pytest.raises(ValueError, match="'layer4' is listed twice"):
        RelevanceCAM(resnet("resnet18"), ["layer4", "layer3", "layer4"])


def test_layer_rules_reach_the_graph():
    """A per-layer rule by type equals the same rule set for all convs; by name it changes only
    the layers it names."""
    model = negative_bn_scales(resnet("resnet18"))
    x, t = images(1, 64), torch.tensor([5])
    gamma = Rule("gamma", gamma=0.25)

    def run(**options):
        with RelevanceCAM(model, ["layer2"], preset="lrp", **options) as cam:
            return cam(x, t)["layer2"]

    torch.testing.assert_close(run(layer_rules={"Conv2d": gamma}), run(conv=gamma))
    by_name = run(layer_rules={"layer3.*": gamma})
    assert not torch.allclose(by_name, run()) and not torch.allclose(by_name, run(conv=gamma))
