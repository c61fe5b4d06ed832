"""Relevance agreement with zennit (an independent LRP library) on ResNet-18/50 and VGG16-BN,
under matching rules and canonizers (BatchNorm merged into the conv before it).

zennit implements LRP as a modified gradient: the gradient it passes back through a module's
output is that output's relevance. So relevance at a layer is the retained gradient of the
layer's output tensor, and relevance at the image is zennit's attribution.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from wsss.cam import RelevanceCAM, Rule

zennit = pytest.importorskip("zennit")
from zennit.composites import EpsilonGammaBox, LayerMapComposite  # noqa: E402
from zennit.layer import Sum  # noqa: E402
from zennit.rules import Norm, Pass, ZPlus  # noqa: E402
from zennit.torchvision import ResNetCanonizer, VGGCanonizer  # noqa: E402
from zennit.types import Activation, AvgPool, BatchNorm, Convolution  # noqa: E402

C = 7
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LOW = tuple((0.0 - m) / s for m, s in zip(MEAN, STD))
HIGH = tuple((1.0 - m) / s for m, s in zip(MEAN, STD))
TINY = 1e-15  # zennit's stabiliser, so small that it only guards exact zeros, as our rules do


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, a quarter of the scales negative, so BN is
    far from the identity, folding matters and outputs of both signs reach every rule."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            sign = torch.where(torch.rand(n, generator=g) < 0.25, -1.0, 1.0)
            m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(sign * (torch.rand(n, generator=g) * 1.5 + 0.25))
            m.bias.data.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
            # zennit's merge leaves each BN as x / sqrt(1 + eps), not quite the identity;
            # eps = 0 (the variances are >= 0.5) keeps its forward equal to the model's
            m.eps = 0.0
    return model.eval()


def resnet(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(getattr(torchvision.models, arch)(weights=None, num_classes=C)).double()


def vgg16_bn() -> nn.Module:
    """VGG16-BN with a narrow MLP head (the 4096-wide one is 100M parameters)."""
    torch.manual_seed(0)
    model = torchvision.models.vgg16_bn(weights=None, num_classes=C)
    model.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, 64),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(64, C),
    )
    return randomize_bn(model).double()


MODELS = {
    "resnet18": (lambda: resnet("resnet18"), ResNetCanonizer, ["layer2", "layer3", "layer4"]),
    "resnet50": (lambda: resnet("resnet50"), ResNetCanonizer, ["layer2", "layer3", "layer4"]),
    "vgg16_bn": (vgg16_bn, VGGCanonizer, ["features.23", "features.33", "features.43"]),
}
X = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
T = torch.tensor([2, 5])


def zennit_relevance(model: nn.Module, composite, layers: list[str]) -> dict[str, torch.Tensor]:
    """Relevance at each layer's output and at the image ("input"), one-hot at the targets."""
    model = copy.deepcopy(model)
    outputs = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            outputs[name] = output

        return hook

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(keep(name)) for name in layers]
    x = X.clone().requires_grad_(True)
    with composite.context(model) as modified:
        logits = modified(x)
        logits.backward(torch.zeros_like(logits).scatter_(1, T[:, None], 1.0))
    for handle in handles:
        handle.remove()
    found = {name: tensor.grad for name, tensor in outputs.items()}
    found["input"] = x.grad
    return found


def assert_relevance_close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    scale = want.abs().max()
    assert scale > 0
    assert (got - want).abs().max() <= rtol * scale, float((got - want).abs().max() / scale)


def ours(model, layers, **options) -> dict[str, torch.Tensor]:
    with RelevanceCAM(model, layers, preset="lrp", batchnorm="fold", **options) as cam:
        relevance = cam.relevance(X, T)
    return {layer: relevance[layer][1][:, 0] for layer in layers}


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        pytest.param("resnet50", marks=pytest.mark.slow),
        pytest.param("vgg16_bn", marks=pytest.mark.slow),
    ],
)
def test_zplus_matches_zennit(name):
    """z⁺ without bias on every conv and linear layer, BN merged, residual sums split by the
    signed branch values (zennit's Norm on Sum), average pools by value, max pools by gradient."""
    build, canonizer, layers = MODELS[name]
    model = build()
    zplus = ZPlus(stabilizer=TINY, zero_params=["bias"])
    composite = LayerMapComposite(
        layer_map=[
            (Activation, Pass()),
            (Sum, Norm(TINY)),
            (AvgPool, Norm(TINY)),
            (BatchNorm, Pass()),
            (Convolution, zplus),
            (nn.Linear, zplus),
        ],
        canonizers=[canonizer()],
    )
    want = zennit_relevance(model, composite, layers)
    got = ours(model, layers)
    for layer in layers:
        assert_relevance_close(got[layer], want[layer], rtol=1e-8)


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        pytest.param("resnet50", marks=pytest.mark.slow),
        pytest.param("vgg16_bn", marks=pytest.mark.slow),
    ],
)
def test_epsilon_gamma_box_matches_zennit(name):
    """zennit's EpsilonGammaBox: z^B with the data set's bounds at the first conv, the
    sign-aware γ = 0.25 on every other conv, ε on the linear layers, biases counted once."""
    build, canonizer, layers = MODELS[name]
    model = build()
    low = torch.tensor(LOW, dtype=torch.float64).view(1, 3, 1, 1).expand(2, 3, 48, 48)
    high = torch.tensor(HIGH, dtype=torch.float64).view(1, 3, 1, 1).expand(2, 3, 48, 48)
    composite = EpsilonGammaBox(
        low=low, high=high, epsilon=1e-6, gamma=0.25, stabilizer=TINY, canonizers=[canonizer()]
    )
    want = zennit_relevance(model, composite, layers)
    got = ours(
        model,
        layers + ["input"],
        conv=Rule("gamma", gamma=0.25, bias=1.0),
        linear=Rule("epsilon", epsilon=1e-6, bias=1.0),
        input=Rule("zb", low=LOW, high=HIGH),
    )
    for layer in layers + ["input"]:
        assert_relevance_close(got[layer], want[layer], rtol=1e-8)
