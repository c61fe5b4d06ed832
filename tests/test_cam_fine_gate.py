"""The fine-scale gate on a classifier whose deep layer sees thin legs at 1/8 of the image: the
deep map is one blob over legs and gaps, the shallow layer resolves the legs. Gated, the map
follows the legs; off (or at power 0) the maps are exactly the fused deep maps."""

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from wsss.cam import aggregate_scales, build_cam, fuse_layers
from wsss.cam.expansion import MapExpansion
from wsss.cam.fine import fine_gate, smooth_box
from wsss.models.pseudo_labeler import PseudoMaskModule, present_targets


class LegsClassifier(nn.Module):
    """A 1x1 layer at full resolution, then a deep 1x1 layer after 8x8 average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.shallow = nn.Sequential(nn.Conv2d(3, 1, 1), nn.ReLU())
        self.down = nn.AvgPool2d(8)
        self.deep = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.shallow[0].weight.fill_(1 / 3)
            self.shallow[0].bias.zero_()
            self.deep[0].weight.fill_(1.0)
            self.deep[0].bias.zero_()
            self.fc.weight.copy_(torch.tensor([[10.0], [0.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(self.pool(self.deep(self.down(self.shallow(x)))).flatten(1))


def legs_scene():
    """Four 2-pixel legs, 4-pixel gaps between them."""
    legs = torch.zeros(32, 32, dtype=torch.bool)
    for column in range(8, 25, 6):
        legs[8:32, column : column + 2] = True
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, legs] = 1.0
    return image, legs


def legs_iou(expansion: MapExpansion) -> float:
    image, legs = legs_scene()
    module = PseudoMaskModule(LegsClassifier().eval(), layers=["deep"], expansion=expansion)
    fused = module.fused_maps(image, torch.tensor([[1.0, 0.0]]))["fused"][0, 0]
    found = fused >= 0.25
    return float((found & legs).sum() / (found | legs).sum())


@pytest.mark.parametrize("fine_layer", ["shallow", "input"])
def test_gated_map_follows_the_legs_where_the_deep_map_is_one_blob(fine_layer):
    deep_only = legs_iou(MapExpansion())
    assert deep_only < 0.4  # the blob over legs and gaps
    assert legs_iou(MapExpansion(fine_layer=fine_layer)) > 0.9


def test_a_wide_smoothing_window_blurs_the_legs_back_into_the_gaps():
    sharp = legs_iou(MapExpansion(fine_layer="shallow"))
    assert legs_iou(MapExpansion(fine_layer="shallow", fine_smooth=5)) < sharp - 0.2


def test_gate_closed_form_and_power_zero():
    deep = torch.tensor([[[[1.0, 1.0, 0.5, 0.0]]]])
    fine = torch.tensor([[[[1.0, 0.0, 0.5, 1.0]]]])
    level = (1.0 + 0.0 + 0.25) / 2.5  # the deep-weighted mean of fine: 0.5
    gate = torch.tensor([min(1.0, 1.0 / level), 0.0, min(1.0, 0.5 / level), 1.0])
    expected = deep[0, 0, 0] * gate**2
    assert torch.allclose(fine_gate(deep, fine, 2.0)[0, 0, 0], expected / expected.max())
    assert torch.equal(fine_gate(deep, fine, 0.0), deep)
    # no fine evidence inside the object: the gate stays open
    assert torch.equal(fine_gate(deep, torch.zeros_like(fine), 1.0), deep)
    with pytest.raises(ValueError, match="power"):
        fine_gate(deep, fine, -1.0)


def test_box_smoothing_counts_only_pixels_inside_the_map():
    maps = torch.ones(1, 1, 5, 5)
    assert torch.equal(smooth_box(maps, 3), maps)
    assert torch.equal(smooth_box(maps, 1), maps)
    with pytest.raises(ValueError, match="odd"):
        smooth_box(maps, 4)


def test_off_the_maps_are_the_fused_deep_maps_and_power_zero_changes_nothing():
    """On a ResNet: off, the maps equal the public functions' fusion exactly; with layer1 added
    to the same sweep at power 0 they are bit for bit the same again (the sweep going further
    does not move the deep layers' maps)."""
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=4).eval()
    images = torch.randn(2, 3, 48, 48)
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    layers = ["layer3", "layer4"]

    def fused(expansion):
        module = PseudoMaskModule(model, layers=layers, flip=True, expansion=expansion)
        return module.fused_maps(images, labels)

    off = fused(None)
    targets, valid = present_targets(labels)
    with build_cam("relevance", model, layers, preset="default") as cam:
        maps = aggregate_scales(cam, images, [1.0], True, targets=targets, present=labels > 0.5)
    expected = fuse_layers(maps, images.shape[-2:]) * valid[:, :, None, None]
    assert torch.equal(off["fused"], expected)
    zero = fused(MapExpansion(fine_layer="layer1", fine_power=0.0))
    assert torch.equal(zero["fused"], off["fused"])
    assert list(zero["layers"]) == layers  # the gate's layer is not one of the fused ones
    gated = fused(MapExpansion(fine_layer="layer1"))["fused"]
    assert not torch.allclose(gated, off["fused"], atol=1e-3)
