"""Erasing-style expansion on a classifier that fires on a part: the head of an object is what it
weighs most, the plain body counts little. The maps of the plain image cover the head; erasing
the head lets the body's evidence in, until the class score falls under the floor."""

import pytest
import torch
from torch import nn

from wsss.cam import erasing
from wsss.cam.erasing import erase_expand
from wsss.cam.expansion import MapExpansion
from wsss.models.pseudo_labeler import PseudoMaskModule


class PartClassifier(nn.Module):
    """Two 1x1 detectors over the grey level x: relu(x - 0.75) (the bright head only) and
    relu(x - 0.25) (head and body); the class logit is 100 * mean(head) + 2 * mean(body) + 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, 0, 0] = 1 / 3
            self.conv.bias.copy_(torch.tensor([-0.75, -0.25]))
            self.fc.weight.copy_(torch.tensor([[100.0, 2.0], [0.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([2.0, 0.0]))

    def forward(self, x):
        return self.fc(self.pool(self.act(self.conv(x))).flatten(1))


def scene():
    """A 16x16 body (grey 0.5) with a 6x6 head (1.0) at its corner, on a 0 background."""
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 8:24, 8:24] = 0.5
    image[:, :, 8:14, 8:14] = 1.0
    whole = torch.zeros(32, 32, dtype=torch.bool)
    whole[8:24, 8:24] = True
    return image, whole


def object_iou(expansion: MapExpansion, model=None) -> float:
    image, whole = scene()
    module = PseudoMaskModule(model or PartClassifier().eval(), layers=["act"], expansion=expansion)
    fused = module.fused_maps(image, torch.tensor([[1.0, 0.0]]))["fused"][0, 0]
    found = fused >= 0.25
    return float((found & whole).sum() / (found | whole).sum())


def test_expanded_map_covers_the_whole_object_and_the_plain_map_only_the_head():
    assert object_iou(MapExpansion(erase_steps=2)) > 0.9
    assert object_iou(MapExpansion()) < 0.2  # the head: 36 of 256 pixels


def test_a_mutant_that_skips_the_expansion_fails_the_bound(monkeypatch):
    monkeypatch.setattr(
        "wsss.cam.expansion.erase_expand", lambda evidence, model, images, maps, *a: maps
    )
    assert object_iou(MapExpansion(erase_steps=2)) < 0.2


def test_a_score_floor_the_erased_image_cannot_keep_stops_the_expansion():
    # erasing the head leaves 0.89 / 0.95 = 0.935 of the score: under 0.95 nothing is added
    assert object_iou(MapExpansion(erase_steps=2, erase_score_floor=0.95)) < 0.2
    assert object_iou(MapExpansion(erase_steps=2, erase_score_floor=0.9)) > 0.9


def test_added_evidence_is_bounded_by_the_score_ratio_and_never_overwrites_the_erased_region():
    image, whole = scene()
    model = PartClassifier().eval()
    maps = torch.zeros(1, 1, 32, 32)
    maps[..., 8:14, 8:14] = 0.8  # the head, found
    calls = []

    def evidence(erased, classes, rows):
        calls.append((erased.clone(), classes.clone(), rows.clone()))
        return torch.ones(erased.shape[0], *erased.shape[-2:])

    out = erase_expand(
        evidence, model, image, maps, torch.tensor([[0]]), torch.ones(1, 1), 1, 0.5, 0.5
    )
    with torch.no_grad():
        base = torch.sigmoid(model(image))[0, 0]
        erased = image.clone()
        erased[..., 8:14, 8:14] = 0
        ratio = float(torch.sigmoid(model(erased))[0, 0] / base)
    assert torch.equal(calls[0][0], erased)  # the slot's own copy, its found region erased
    assert calls[0][1].tolist() == [0] and calls[0][2].tolist() == [0]
    assert torch.equal(out[..., 8:14, 8:14], maps[..., 8:14, 8:14])
    assert torch.allclose(out[0, 0, 20, 20], torch.tensor(ratio))
    assert 0.8 < ratio < 1.0


def test_invalid_and_unrecognised_slots_are_left_as_they_are_and_cost_no_evidence():
    image, _ = scene()
    maps = torch.rand(1, 2, 32, 32)
    seen = []

    def evidence(erased, classes, rows):
        seen.append(classes.tolist())
        return torch.ones(erased.shape[0], *erased.shape[-2:])

    # slot 0: class 0 but marked invalid; slot 1: class 1, scored just under the bound
    model = PartClassifier().eval()
    with torch.no_grad():
        model.fc.bias[1] = -0.01  # class 1 at sigmoid(-0.01) < RECOGNISED
    targets, valid = torch.tensor([[0, 1]]), torch.tensor([[False, True]])
    out = erase_expand(evidence, model, image, maps, targets, valid, 3, 0.0, 0.5)
    assert torch.equal(out, maps) and seen == []
    assert erasing.RECOGNISED == 0.5


def test_steps_zero_returns_the_maps_and_bad_settings_are_refused():
    image, _ = scene()
    maps = torch.rand(1, 1, 32, 32)
    args = (PartClassifier().eval(), image, maps, torch.tensor([[0]]), torch.ones(1, 1))
    assert torch.equal(erase_expand(None, *args, 0, 0.5, 0.5), maps)
    for steps, floor, threshold in ((-1, 0.5, 0.5), (1, 1.5, 0.5), (1, 0.5, 0.0)):
        with pytest.raises(ValueError, match="erasing needs"):
            erase_expand(None, *args, steps, floor, threshold)
