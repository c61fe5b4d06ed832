"""The classifier stage: it learns, exports a CAM-walkable torchvision net, and fails clearly."""

import pytest
import torch

from wsss.cam import RelevanceCAM
from wsss.data.synthetic import SyntheticSegmentation
from wsss.models.classifier import ClassifierModule, build_backbone


def fixed_batch(n=8, size=64):
    data = SyntheticSegmentation("train", num_images=n, image_size=size, seed=3)
    items = [data[i] for i in range(n)]
    return torch.stack([i["image"] for i in items]), torch.stack([i["labels"] for i in items])


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    module = ClassifierModule(num_classes=4, backbone="resnet18", lr=0.05)
    images, labels = fixed_batch()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    losses = []
    module.train()
    for _ in range(12):
        loss = module.loss_fn(module(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    "backbone, layers, stride",
    [
        ("resnet18", ["layer2", "layer3", "layer4"], 16),
        ("resnet18", ["layer1", "layer4"], 32),
        ("vgg16_bn", ["features.23", "features.33", "features.43"], 32),
    ],
)
def test_exported_model_works_with_relevance_cam(backbone, layers, stride):
    module = ClassifierModule(num_classes=4, backbone=backbone, output_stride=stride)
    model = module.export()
    images = torch.randn(2, 3, 64, 64)
    assert model(images).shape == (2, 4)
    with RelevanceCAM(model, layers=layers, preset="default") as cam:
        maps = cam(images, torch.tensor([[0, 2], [1, 3]]))
    assert set(maps) == set(layers)
    assert all(m.shape[:2] == (2, 2) and torch.isfinite(m).all() for m in maps.values())
    if backbone == "resnet18":  # output stride 16 keeps layer4 at 1/16 of the input
        assert maps["layer4"].shape[-1] == 64 // stride


def test_grayscale_input_and_head_shape():
    model = build_backbone("resnet18", num_classes=3, in_channels=1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 3
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)


def test_missing_pretrained_weights_explain_the_way_out(monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(RuntimeError) as err:
        build_backbone("resnet50", num_classes=20, pretrained=True)
    assert "TORCH_HOME" in str(err.value) and "classifier.pretrained=false" in str(err.value)


def test_backbone_learns_slower_than_head():
    module = ClassifierModule(num_classes=4, lr=0.1, backbone_lr_mult=0.1)
    optimizer = module.configure_optimizers()["optimizer"]
    lrs = sorted(group["lr"] for group in optimizer.param_groups)
    assert lrs == pytest.approx([0.01, 0.1])
    head = {id(p) for p in module.model.fc.parameters()}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == head


def test_adamw_and_schedules_follow_their_closed_forms():
    import math

    from wsss.models.common import lr_lambda

    module = ClassifierModule(
        num_classes=2, lr=0.1, backbone_lr_mult=0.5, optimizer="adamw", weight_decay=0.01
    )
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([0.05, 0.1])
    assert all(g["weight_decay"] == 0.01 for g in optimizer.param_groups)
    total = 10
    cosine, constant, poly = (lr_lambda(name, total) for name in ("cosine", "constant", "poly"))
    assert [cosine(s) for s in (0, 5, 10, 12)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert cosine(3) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))
    assert [constant(s) for s in (0, 7, 100)] == [1.0, 1.0, 1.0]
    assert poly(4) == pytest.approx(0.6**0.9) and poly(10) == 0.0
    asked = []
    lazy = lr_lambda("poly", lambda: asked.append(1) or 8)
    assert lazy(0) == 1.0 and not asked  # step 0 never asks for the total
    assert (
        lazy(4) == pytest.approx(0.5**0.9) and lazy(6) == pytest.approx(0.25**0.9) and asked == [1]
    )
