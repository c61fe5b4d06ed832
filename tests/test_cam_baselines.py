"""Baselines against textbook formulas computed with plain autograd."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from wsss.cam import CAM, GradCAM, GradCAMPlusPlus, LiftCAM

C = 6


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, C),
    ).eval()


def textbook(model: nn.Module, layer: int, x: torch.Tensor, t: torch.Tensor):
    """Activation and d logit_t / dA at model[layer]'s output, by plain autograd."""
    head = model[layer + 1:]
    with torch.no_grad():
        a = model[:layer + 1](x)
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
    denom = 2 * g ** 2 + s * g ** 3
    alpha = torch.where(denom != 0, g ** 2 / torch.where(denom != 0, denom, 1.0), 0.0)
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
        a = model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))
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
        _, acts = cam._forward(x, keep_graph=False)
    with torch.enable_grad():
        phi = cam._contributions(cam.heads[layer], acts[layer].float(), t[:, None])

    def head(v):
        return model.classifier(torch.flatten(model.avgpool(model.features[20:](v)), 1))

    with torch.no_grad():
        delta = (head(a) - head(torch.zeros_like(a))).gather(1, t[:, None])[:, 0]
    torch.testing.assert_close(phi.sum((1, 2, 3, 4)), delta, rtol=1e-4, atol=1e-5)
