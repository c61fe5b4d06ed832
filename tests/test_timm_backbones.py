"""classifier.backbone=timm:NAME: timm CNNs with the package's GAP + linear head, random weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsss.cam import GradCAM, RelevanceCAM
from wsss.config import ConfigError, load_config
from wsss.models import backbones
from wsss.models.classifier import ClassifierModule
from wsss.models.timm_backbones import TimmClassifier

from conftest import ROOT

pytest.importorskip("timm")

# models that trace today with the package's engine (tf_ "same"-padded ones are not among them)
MODELS = {
    "timm:resnet18": ("layer2", "layer3", "layer4"),
    "timm:efficientnet_b0": ("blocks.2", "blocks.4", "bn2"),
    "timm:regnetx_002": ("s2", "s3", "s4"),
}


@pytest.mark.parametrize("name", ["timm:resnet18", "timm:efficientnet_b0"])
def test_timm_classifier_trains_a_step_and_gives_relevance_maps(name):
    torch.manual_seed(0)
    module = ClassifierModule(num_classes=3, backbone=name, in_channels=1, lr=0.05)
    model = module.model
    assert isinstance(model, TimmClassifier)
    assert isinstance(model.fc, nn.Linear) and backbones.head_of(model) is model.fc
    names = dict(model.named_children())
    assert "global_pool" in names and "classifier" not in names  # timm's own head is left out
    images, labels = torch.randn(4, 1, 64, 64), torch.tensor([[1.0, 0, 1], [0, 1, 0]] * 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
    module.train()
    before = model.fc.weight.detach().clone()
    first = module.loss_fn(module(images), labels)
    first.backward()
    optimizer.step()
    assert torch.isfinite(first) and not torch.equal(model.fc.weight, before)
    assert all(p.grad is not None for p in model.parameters())  # every registered module is used
    layers = list(backbones.default_cam_layers(name))
    assert tuple(layers) == MODELS[name]
    exported = module.export()
    with RelevanceCAM(exported, layers) as cam:
        maps = cam(images[:2], torch.tensor([0, 2]))
    sizes = [tuple(maps[layer].shape[-2:]) for layer in layers]
    assert sizes == [(8, 8), (4, 4), (2, 2)]
    assert all(bool(torch.isfinite(m).all()) and m.abs().sum() > 0 for m in maps.values())


def test_default_layers_name_the_map_the_pooling_reads():
    model = backbones.build_backbone("timm:regnetx_002", 2)
    layers = backbones.default_cam_layers("timm:regnetx_002")
    assert layers == MODELS["timm:regnetx_002"]
    with GradCAM(model.eval(), list(layers)) as cam:
        maps = cam(torch.randn(2, 3, 64, 64), torch.tensor([0, 1]))
    assert all(bool(torch.isfinite(m).all()) for m in maps.values())
    # the last layer is what the linear head reads: the logits are its pooled map times fc
    captured = {}
    handle = model.s4.register_forward_hook(lambda m, a, out: captured.setdefault("s4", out))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    torch.testing.assert_close(logits, model.fc(captured["s4"].mean((2, 3))))


def test_output_stride_16_by_dilation_and_the_refusal():
    dilated = backbones.build_backbone("timm:resnet18", 2, output_stride=16).eval()
    plain = backbones.build_backbone("timm:resnet18", 2).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert dilated._body.forward_features(x).shape[-1] == 4
        assert plain._body.forward_features(x).shape[-1] == 2
    assert backbones.supports_output_stride_16("timm:efficientnet_b0")
    assert not backbones.supports_output_stride_16("timm:mobilenetv3_small_050")
    with pytest.raises(ValueError, match="output stride 16 is not available for timm:mobilenetv3"):
        backbones.build_backbone("timm:mobilenetv3_small_050", 2, output_stride=16)


def test_unknown_name_and_offline_weights_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError) as err:
        backbones.build_backbone("timm:resnet1000", 2)
    assert "not a timm model; did you mean timm:" in str(err.value)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import timm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file.\nmore")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(RuntimeError) as err:
        backbones.build_backbone("timm:resnet18", 2, pretrained=True)
    message = str(err.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message
    assert "classifier.pretrained=false" in message


def test_config_accepts_timm_names_and_fills_their_layers():
    cfg = load_config(ROOT / "configs/default.yaml", ["classifier.backbone=timm:resnet18"])
    assert cfg.cam.layers == ["layer2", "layer3", "layer4"]
    with pytest.raises(ConfigError, match="classifier.backbone: 'resnet1000' is not a timm"):
        load_config(ROOT / "configs/default.yaml", ["classifier.backbone=timm:resnet1000"])
    with pytest.raises(ConfigError, match="classifier.output_stride: 16 is not available"):
        load_config(
            ROOT / "configs/default.yaml",
            ["classifier.backbone=timm:mobilenetv3_small_050", "classifier.output_stride=16"],
        )
    with pytest.raises(ConfigError, match=r"cam.layers: 'layer9' is not a module of timm:resnet18"):
        load_config(
            ROOT / "configs/default.yaml",
            ["classifier.backbone=timm:resnet18", "cam.layers=[layer9]"],
        )
