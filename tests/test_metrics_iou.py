"""mIoU: a closed-form case and agreement with torchmetrics' MulticlassJaccardIndex."""

import math

import pytest
import torch

from wsss.metrics import IoUMeter, miou_reference


def test_closed_form_iou_with_void_pixels():
    target = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 255]]])
    preds = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 1]]])  # last pixel is void: ignored
    meter = IoUMeter(3)
    meter.update(preds, target)
    scores = meter.compute()
    # class 0: hits 2, union 4 ; class 1: hits 2, union 3 ; class 2: hits 1, union 2
    assert scores["per_class_iou"] == pytest.approx([2 / 4, 2 / 3, 1 / 2])
    assert scores["miou"] == pytest.approx((2 / 4 + 2 / 3 + 1 / 2) / 3)


def test_accumulates_over_batches_like_one_torchmetrics_call():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (6, 16, 16), generator=gen)
    target[target == 4] = 255
    preds = torch.randint(0, 4, (6, 16, 16), generator=gen)
    meter = IoUMeter(4)
    for i in range(6):
        meter.update(preds[i:i + 1], target[i:i + 1])
    assert meter.compute()["miou"] == pytest.approx(miou_reference(preds, target, 4), abs=1e-6)


def test_class_absent_everywhere_is_nan_and_left_out():
    meter = IoUMeter(3)
    meter.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    scores = meter.compute()
    assert scores["miou"] == 1.0 and math.isnan(scores["per_class_iou"][2])
