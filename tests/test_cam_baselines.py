"""Baselines against textbook formulas computed with plain autograd."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from wsss.cam import CAM, GradCAM, GradCAMPlusPlus, LiftCAM

C = 6


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, C),
    ).eval()


def textbook(model: nn.Module, layer: int, x: torch.Tensor, t: torch.Tensor):
    """Activation and d logit_t / dA at model[layer]'s output, by plain autograd."""
    head = model[layer + 1 :]
    with torch.no_grad():
        a = model[: layer + 1](x)
    a = a.clone().requires_grad_(True)
    logits = head(a.clone())
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a)
    return a.detach(), g


X = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
T = torch.tensor([0, 3, 5])


def test_gradcam_is_the_textbook_formula():
    model = small_net()
    a, g = textbook(model, 5, X, T)
    want = (g.mean((2, 3))[..., None, None] * a).sum(1)
    with GradCAM(model, ["5"]) as cam:
        got = cam(X, T)["5"]
    assert got.shape == (3, 1, 8, 8)
    torch.testing.assert_close(got[:, 0], want, rtol=1e-5, atol=1e-7)
    # K classes at once equal separate calls
    with GradCAM(model, ["2", "5"]) as cam:
        both = cam(X, torch.stack([T, (T + 1) % C], 1))
        torch.testing.assert_close(both["5"][:, 0], got[:, 0])
        torch.testing.assert_close(both["2"][:, 1], cam(X, (T + 1) % C)["2"][:, 0])


def test_gradcampp_formula():
    model = small_net()
    a, g = textbook(model, 5, X, T)
    s = a.sum((2, 3), keepdim=True)
    denom = 2 * g**2 + s * g**3
    alpha = torch.where(denom != 0, g**2 / torch.where(denom != 0, denom, 1.0), 0.0)
    w = (alpha * g.clamp(min=0)).sum((2, 3))
    want = (w[..., None, None] * a).sum(1)
    with GradCAMPlusPlus(model, "5") as cam:
        torch.testing.assert_close(cam(X, T)["5"][:, 0], want, rtol=1e-5, atol=1e-7)


def test_cam_and_liftcam_on_gap_linear_head():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=C).eval()
    x = torch.randn(2, 3, 64, 64)
    t = torch.tensor([1, 4])
    with torch.no_grad():
        a = model.layer4(
            model.layer3(
                model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
            )
        )
    w = model.fc.weight[t]
    with CAM(model, ["layer4"]) as cam:
        torch.testing.assert_close(cam(x, t)["layer4"][:, 0], torch.einsum("bc,bchw->bhw", w, a))
    phi = w * a.mean((2, 3))  # LIFT-CAM closed form for a linear GAP head
    with LiftCAM(model, ["layer4"]) as cam:
        got = cam(x, t)["layer4"][:, 0]
    torch.testing.assert_close(got, torch.einsum("bc,bchw->bhw", phi, a), rtol=1e-5, atol=1e-6)


def test_liftcam_vgg_head_completeness():
    """DeepLIFT completeness: Σ_k φ_k = y_t(A) - y_t(0) through the VGG MLP head."""
    torch.manual_seed(0)
    model = torchvision.models.vgg11(weights=None, num_classes=C).eval()
    x = torch.randn(2, 3, 64, 64)
    t = torch.tensor([2, 5])
    layer = "features.19"  # the last ReLU, before pool5 (LIFT-CAM's choice)
    cam = LiftCAM(model, [layer])
    with torch.no_grad():
        a = model.features[:20](x)
        _, acts = cam.record(x, keep_graph=False)
    with torch.enable_grad():
        phi = cam._contributions(cam.heads[layer], acts[layer].float(), t[:, None])

    def head(v):
        return model.classifier(torch.flatten(model.avgpool(model.features[20:](v)), 1))

    with torch.no_grad():
        delta = (head(a) - head(torch.zeros_like(a))).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(phi.sum((1, 2, 3, 4)), delta, rtol=1e-4, atol=1e-5)


# ---- defects found by review: each test pins a fixed bug -----------------------------------------


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=C).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.bias.uniform_(-0.2, 0.2)
    return model


def last_block_bn2(model: nn.Module, x: torch.Tensor, t: torch.Tensor):
    """Textbook activation and gradient at layer4.1.bn2, whose output the block then adds its
    shortcut to in place (out += identity)."""
    with torch.no_grad():
        h = model.layer4[0](
            model.layer3(
                model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x))))))
            )
        )
    block = model.layer4[1]
    with torch.no_grad():
        a = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h)))))
    a = a.clone().requires_grad_(True)
    logits = model.fc(torch.flatten(model.avgpool(torch.relu(a + h)), 1))
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), a)
    return a.detach(), g


def test_gradcam_and_cam_at_a_module_whose_output_is_changed_in_place():
    model = resnet18()
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([1, 4])
    a, g = last_block_bn2(model, x, t)
    with GradCAM(model, ["layer4.1.bn2", "layer4.1"]) as cam:
        maps = cam(x, t)
    torch.testing.assert_close(
        maps["layer4.1.bn2"][:, 0],
        (g.mean((2, 3))[..., None, None] * a).sum(1),
        rtol=1e-5,
        atol=1e-6,
    )
    assert not torch.allclose(maps["layer4.1.bn2"], maps["layer4.1"])
    with CAM(model, ["layer4.1.bn2"]) as cam:
        torch.testing.assert_close(
            cam(x, t)["layer4.1.bn2"][:, 0], torch.einsum("bc,bchw->bhw", model.fc.weight[t], a)
        )
    with torch.no_grad():  # the model's own output is unchanged by the hooks
        before = model(x)
    with GradCAM(model, ["layer4.1.bn2"]) as cam:
        cam(x, t)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_gradcam_under_inference_mode_with_targets_made_there():
    model = small_net()
    with GradCAM(model, ["5"]) as cam:
        expected = cam(X, T)
        with torch.inference_mode():
            targets = torch.tensor([0, 3, 5])
            images = X.clone()
            got = cam(images, targets)
    torch.testing.assert_close(got["5"], expected["5"])


def test_baselines_on_a_float64_model():
    model = resnet18()
    x, t = torch.randn(2, 3, 64, 64), torch.tensor([[1, 2], [4, 0]])
    single = {
        name: cls(model, ["layer4"])(x, t)["layer4"]
        for name, cls in [("gradcam", GradCAM), ("cam", CAM), ("liftcam", LiftCAM)]
    }
    model.double()
    for name, cls in [("gradcam", GradCAM), ("cam", CAM), ("liftcam", LiftCAM)]:
        double = cls(model, ["layer4"])(x.double(), t)["layer4"]
        assert double.dtype == torch.float64, name
        torch.testing.assert_close(double.float(), single[name], rtol=1e-4, atol=1e-5)


def test_duplicate_layer_names_are_rejected():
    with pytest.raises(ValueError, match="'5' is listed twice"):
        GradCAM(small_net(), ["5", "2", "5"])
