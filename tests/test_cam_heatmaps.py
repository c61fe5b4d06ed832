"""wsss.cam.heatmaps: the pipeline's fused maps from (model, images, targets) in one call."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from wsss.cam import heatmaps
from wsss.cam.heatmaps import last_feature_layer
from wsss.cam.postprocess import fuse_layers
from wsss.models.pseudo_labeler import PseudoMaskModule


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=5).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "method, layers, normalize",
    [
        ("relevance", ["layer3", "layer4"], "centred"),
        ("gradcam", ["layer3", "layer4"], "centred"),
        ("cam", ["layer4"], "relu_max"),
    ],
)
def test_heatmaps_equal_the_pipelines_fused_maps(resnet, images, method, layers, normalize):
    labels = torch.zeros(2, 5)
    labels[0, [1, 3]] = 1.0
    labels[1, [0, 4]] = 1.0
    module = PseudoMaskModule(resnet, method=method, layers=layers, normalize=normalize)
    pipeline = module.fused_maps(images, labels)
    got = heatmaps(resnet, images, pipeline["targets"], method, layers, normalize=normalize)
    assert got.shape == (2, 2, 64, 64) and bool(pipeline["valid"].all())
    torch.testing.assert_close(got, pipeline["fused"], rtol=0, atol=1e-6)
    assert float(got.min()) >= 0.0 and float(got.amax((-2, -1)).min()) == pytest.approx(1.0)


def test_heatmaps_defaults_last_feature_map_size_and_target_forms(resnet, images):
    assert last_feature_layer(resnet, images) == "layer4"
    one = heatmaps(resnet, images, torch.tensor([2, 2]))
    same = heatmaps(resnet, images, 2, layers="layer4")
    assert one.shape == (2, 1, 64, 64)
    torch.testing.assert_close(one, same)
    torch.testing.assert_close(heatmaps(resnet, images, [2]), one)
    small = heatmaps(resnet, images, 2, size=(16, 24))
    assert small.shape == (2, 1, 16, 24)
    torch.testing.assert_close(small, fuse_layers({"layer4": one}, (16, 24)))


def test_heatmaps_refuse_bad_targets_and_a_model_without_maps(resnet, images):
    with pytest.raises(ValueError, match=r"targets must be \(B,\) or \(B, K\) with B=2"):
        heatmaps(resnet, images, torch.tensor([1, 2, 3]))
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 5))
    with pytest.raises(ValueError, match="pass layers="):
        heatmaps(flat, images, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_heatmaps_stay_on_the_gpu(resnet, images):
    model = resnet.cuda()
    try:
        maps = heatmaps(model, images.cuda(), 1)
        assert maps.device.type == "cuda"
    finally:
        resnet.cpu()
