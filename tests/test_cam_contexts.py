"""Hook hygiene, unsupported modules, grad contexts, autocast, and the build_cam factory."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from wsss.cam import GradCAM, LiftCAM, RelevanceCAM, build_cam, register_handler, unregister_rule
from wsss.cam.conformance import hook_count

C = 20


def small_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=C).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
T = torch.tensor([[1, 4], [2, 7]])


@pytest.mark.parametrize("method", ["relevance", "gradcam", "gradcampp", "liftcam", "cam"])
def test_hooks_removed_and_model_unchanged_even_after_error(method):
    model = small_resnet()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before_out = model(X)
    n_hooks = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with build_cam(method, model, ["layer4"]) as cam:
            maps = cam(X, T)
            assert maps["layer4"].shape == (2, 2, 2, 2)
            raise RuntimeError("boom")
    # an error inside the model's forward during a call
    bad = torch.randn(2, 5, 64, 64)
    with build_cam(method, model, ["layer4"]) as cam:
        with pytest.raises(RuntimeError):
            cam(bad, T)
    assert hook_count(model) == n_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(X), before_out, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before_state[k], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())


def test_unsupported_module_error_names_path_and_type():
    class Softsign(nn.Module):  # divides by a signal: no LRP rule for that
        def forward(self, x):
            return x / (1 + x.abs())

    net = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        Softsign(),
        nn.Conv2d(8, 8, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    with pytest.raises(NotImplementedError, match=r"'1' of type .*Softsign.*register_handler"):
        RelevanceCAM(net, ["0"])
    RelevanceCAM(net, ["2"])  # above the unsupported module: fine
    try:
        register_handler(Softsign, "identity")
        with RelevanceCAM(net, ["0"]) as cam:
            assert cam(torch.randn(1, 3, 16, 16), torch.tensor([1]))["0"].shape == (1, 1, 14, 14)
    finally:
        unregister_rule(Softsign)


def test_custom_forward_wrapper_is_traced_through():
    """A module with its own forward around a torchvision model (the graph engine traces it)."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_resnet()

        def forward(self, x):
            return self.net(x)

    wrapper = Wrapper()
    with RelevanceCAM(wrapper, ["net.layer3", "net.layer4"]) as cam:
        wrapped = cam(X, T)
    with RelevanceCAM(wrapper.net, ["layer3", "layer4"]) as cam:
        plain = cam(X, T)
    for layer in ["layer3", "layer4"]:
        torch.testing.assert_close(wrapped["net." + layer], plain[layer], rtol=0, atol=0)


def test_unknown_layer_name():
    with pytest.raises(ValueError, match="no module named 'layer9'"):
        RelevanceCAM(small_resnet(), ["layer9"])
    with pytest.raises(ValueError, match="cannot capture"):
        RelevanceCAM(small_resnet(), ["layer4.0.relu"])  # shared ReLU, called twice


@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("method", ["relevance", "gradcam", "liftcam"])
def test_works_under_caller_grad_contexts(context, method):
    model = small_resnet()
    layers = ["layer4"] if method == "liftcam" else ["layer3", "layer4"]
    with build_cam(method, model, layers) as cam:
        expected = cam(X, T)
        ctx = torch.inference_mode() if context == "inference_mode" else torch.no_grad()
        with ctx:
            x = X.clone()
            got = cam(x, T)
    for layer in expected:
        torch.testing.assert_close(got[layer], expected[layer])


def test_lightning_style_predict_step():
    """Trainer(inference_mode=False).predict runs predict_step under no_grad."""
    lightning = pytest.importorskip("lightning")
    model = small_resnet()

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def predict_step(self, batch, batch_idx):
            x, t = batch
            with RelevanceCAM(self.net, ["layer4"]) as cam:
                return cam(x, t)["layer4"]

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, T), batch_size=2)
    trainer = lightning.Trainer(
        accelerator="cpu",
        inference_mode=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (out,) = trainer.predict(Module(), data)
    with RelevanceCAM(model, ["layer4"]) as cam:
        torch.testing.assert_close(out, cam(X, T)["layer4"])


def test_autocast_bf16_matches_fp32():
    model = small_resnet()
    layers = ["layer2", "layer3", "layer4"]
    with RelevanceCAM(model, layers, preset="reference") as cam:
        ref = cam(X, T)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = cam(X, T)
    for layer in layers:
        assert low[layer].dtype == torch.float32
        for b in range(2):
            for k in range(2):
                assert corr(low[layer][b, k], ref[layer][b, k]) > 0.98, layer


def test_grayscale_input_model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    with RelevanceCAM(model, ["layer1", "layer4"]) as cam:
        maps = cam(torch.randn(2, 1, 64, 64), torch.tensor([0, 2]))
    assert maps["layer1"].shape == (2, 1, 16, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = small_resnet()
    with RelevanceCAM(model, ["layer2", "layer4"], preset="reference") as cam:
        cpu = cam(X, T)
    model.cuda()
    with RelevanceCAM(model, ["layer2", "layer4"], preset="reference") as cam:
        gpu = cam(X.cuda(), T.cuda())
        with torch.autocast("cuda", dtype=torch.float16):
            half = cam(X.cuda(), T.cuda())
    for layer in cpu:
        torch.testing.assert_close(gpu[layer].cpu(), cpu[layer], rtol=1e-3, atol=1e-6)
        assert corr(half[layer].cpu(), cpu[layer]) > 0.98


def test_build_cam_rejects_unknown():
    with pytest.raises(ValueError, match="unknown CAM method"):
        build_cam("scorecam", small_resnet(), ["layer4"])
    assert isinstance(build_cam("gradcam", small_resnet(), "layer4"), GradCAM)
    assert isinstance(build_cam("liftcam", small_resnet(), "layer4"), LiftCAM)


def test_relevance_plan_is_cached_per_model_and_rebuilt_when_the_model_changes():
    import gc
    import weakref

    from wsss.cam.lrp.graph import _PLANS

    model = small_resnet()
    first = RelevanceCAM(model, ["layer3", "layer4"]).graph
    assert RelevanceCAM(model, ["layer3", "layer4"]).graph is first
    assert RelevanceCAM(model, ["layer3", "layer4"], preset="reference").graph is not first
    with torch.no_grad():  # new weights: the same plan, which reads them at every call
        model.fc.weight.mul_(2.0)
    with RelevanceCAM(model, ["layer4"]) as cam:
        torch.testing.assert_close(
            cam(X, T)["layer4"], RelevanceCAM(model, ["layer4"])(X, T)["layer4"]
        )
    model.fc = nn.Linear(512, C)  # a replaced module: a new plan
    second = RelevanceCAM(model, ["layer3", "layer4"]).graph
    assert second is not first
    model.double()  # new buffers (as .to(device) makes them): a new plan
    assert RelevanceCAM(model, ["layer3", "layer4"]).graph is not second
    assert model in _PLANS
    alive = weakref.ref(model)
    del model, first, second, cam
    gc.collect()
    assert alive() is None  # the cache does not keep a model alive
