"""Any torchvision classifier as the backbone: head, input channels, output stride, default CAM
layers, and the config checks that use them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsss.cam import RelevanceCAM
from wsss.config import ConfigError, load_config
from wsss.models.backbones import (
    build_backbone,
    default_cam_layers,
    family_of,
    head_of,
    supports_output_stride_16,
)


@pytest.mark.parametrize(
    "name, layers",
    [
        ("resnet50", ("layer2", "layer3", "layer4")),
        ("vgg16_bn", ("features.23", "features.33", "features.43")),  # the official pool outputs
        ("densenet121", ("features.denseblock2", "features.denseblock3", "features.norm5")),
        ("efficientnet_b0", ("features.3", "features.5", "features.8")),
        ("convnext_tiny", ("features.3", "features.5", "features.7")),
        ("regnet_y_400mf", ("trunk_output.block2", "trunk_output.block3", "trunk_output.block4")),
        ("mobilenet_v3_small", ("features.3", "features.8", "features.12")),
        ("googlenet", ("inception3b", "inception4e", "inception5b")),
        ("shufflenet_v2_x1_0", ("stage2", "stage3", "conv5")),
    ],
)
def test_default_cam_layers_are_the_last_modules_at_1_8_1_16_1_32(name, layers):
    assert default_cam_layers(name) == layers


def test_no_default_layers_for_transformers():
    with pytest.raises(ValueError, match="vit_b_16: it is not a CNN"):
        default_cam_layers("vit_b_16")


@pytest.mark.parametrize(
    "name",
    [
        "densenet121",
        "efficientnet_b0",
        "mobilenet_v3_small",
        "convnext_tiny",
        "squeezenet1_1",
        "alexnet",
        "googlenet",
    ],
)
def test_built_backbone_has_a_linear_head_one_channel_input_and_works_with_relevance_cam(name):
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=3, in_channels=1).eval()
    x = torch.randn(2, 1, 64, 64)
    assert model(x).shape == (2, 3)
    assert isinstance(head_of(model), nn.Linear) and head_of(model).out_features == 3
    layers = list(default_cam_layers(name))
    with RelevanceCAM(model, layers) as cam:
        maps = cam(x, torch.tensor([0, 2]))
    assert all(
        maps[layer].shape[:2] == (2, 1) and torch.isfinite(maps[layer]).all() for layer in layers
    )


@pytest.mark.parametrize(
    "name, layer",
    [
        ("resnet18", "layer4"),
        ("resnet50", "layer4"),
        ("efficientnet_b0", "features.8"),
        ("mobilenet_v2", "features.18"),
        ("regnet_y_400mf", "trunk_output.block4"),
        ("shufflenet_v2_x0_5", "conv5"),
    ],
)
def test_output_stride_16_by_dilation(name, layer):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    sizes = {}
    for stride in (32, 16):
        model = build_backbone(name, num_classes=2, output_stride=stride).eval()
        handle = model.get_submodule(layer).register_forward_hook(
            lambda m, a, out, stride=stride: sizes.__setitem__(stride, out.shape[-1])
        )
        with torch.no_grad():
            assert model(x).shape == (1, 2)
        handle.remove()
    assert sizes == {32: 2, 16: 4}


@pytest.mark.parametrize("name", ["densenet121", "convnext_tiny", "vgg16_bn"])
def test_output_stride_16_refused_where_dilation_cannot_replace_the_downsampling(name):
    assert not supports_output_stride_16(name)
    with pytest.raises(ValueError, match=f"output stride 16 is not available for {name}"):
        build_backbone(name, num_classes=2, output_stride=16)


def test_families():
    assert [
        family_of(n)
        for n in (
            "resnext50_32x4d",
            "wide_resnet50_2",
            "vgg16_bn",
            "regnet_y_400mf",
            "efficientnet_v2_s",
            "mnasnet0_5",
            "inception_v3",
        )
    ] == ["resnet", "resnet", "vgg", "regnet", "efficientnet", "mnasnet", "inception"]


def test_config_takes_any_torchvision_backbone_and_defaults_its_layers():
    cfg = load_config(
        "configs/default.yaml", ["classifier.backbone=densenet121", "classifier.output_stride=32"]
    )
    assert cfg.cam.layers == ["features.denseblock2", "features.denseblock3", "features.norm5"]
    cfg = load_config("configs/default.yaml")
    assert cfg.cam.layers == ["layer2", "layer3", "layer4"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["classifier.backbone=densenet12"], "did you mean densenet121"),
        (
            ["classifier.backbone=densenet121", "classifier.output_stride=16"],
            "classifier.output_stride: 16 is not available for densenet121",
        ),
        (
            ["cam.layers=[layer2, layer9]"],
            "cam.layers: 'layer9' is not a module of resnet18; did you mean",
        ),
        (
            ["classifier.backbone=vgg16_bn", "classifier.output_stride=32", "cam.layers=[layer4]"],
            "'layer4' is not a module of vgg16_bn",
        ),
    ],
)
def test_config_rejects_bad_backbones_strides_and_layers(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("configs/default.yaml", overrides)
    assert fragment in str(err.value)
