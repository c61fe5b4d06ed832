"""mIoU: a closed-form case and agreement with torchmetrics' MulticlassJaccardIndex."""

import math

import pytest
import torch

from wsss.metrics import SegmentationScores, miou_reference


def test_closed_form_iou_with_void_pixels():
    target = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 255]]])
    preds = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 1]]])  # last pixel is void: ignored
    meter = SegmentationScores(3)
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
    meter = SegmentationScores(4)
    for i in range(6):
        meter.update(preds[i : i + 1], target[i : i + 1])
    assert meter.compute()["miou"] == pytest.approx(miou_reference(preds, target, 4), abs=1e-6)


def test_class_absent_everywhere_is_nan_and_left_out():
    meter = SegmentationScores(3)
    meter.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    scores = meter.compute()
    assert scores["miou"] == 1.0 and scores["per_class_iou"][2] is None
    assert scores["absent_classes"] == [1, 2] and math.isnan(scores["dice"])


def test_classes_absent_from_the_ground_truth_are_left_out_even_when_predicted():
    """A class predicted but never present in the split's ground truth does not count in the
    means (its false positives still lower the true class's IoU)."""
    target = torch.tensor([[[0, 0, 1, 1]]])
    preds = torch.tensor([[[0, 2, 1, 1]]])
    meter = SegmentationScores(3)
    meter.update(preds, target)
    scores = meter.compute()
    assert (
        scores["per_class_iou"][:2] == pytest.approx([1 / 2, 1.0])
        and scores["per_class_iou"][2] is None
    )
    assert scores["miou"] == pytest.approx(0.75) and scores["absent_classes"] == [2]


def test_dice_and_accuracies_in_closed_form():
    target = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 255]]])
    preds = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 1]]])
    meter = SegmentationScores(3)
    meter.update(preds, target)
    scores = meter.compute()
    # TP / truth / predicted per class: 0: 2/3/3, 1: 2/2/3, 2: 1/2/1
    assert scores["per_class_dice"] == pytest.approx([4 / 6, 4 / 5, 2 / 3])
    assert scores["dice"] == pytest.approx((4 / 5 + 2 / 3) / 2)  # foreground classes only
    assert scores["pixel_accuracy"] == pytest.approx(5 / 7)
    assert scores["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)


def test_out_of_range_classes_are_an_error_naming_the_values():
    meter = SegmentationScores(3)
    with pytest.raises(ValueError, match="0..2.*7"):
        meter.update(torch.tensor([[[7]]]), torch.tensor([[[0]]]))


def test_classifier_scores_leave_out_classes_without_positives_and_handle_one_label():
    from torchmetrics.functional.classification import binary_average_precision

    from wsss.metrics import MultiLabelScores

    probs = torch.tensor([[0.9, 0.2, 0.7], [0.1, 0.4, 0.6], [0.8, 0.3, 0.2], [0.3, 0.1, 0.9]])
    labels = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 0, 0], [0, 0, 1]])  # class 1 never occurs
    metric = MultiLabelScores(3)
    metric.update(probs[:2], labels[:2])
    metric.update(probs[2:], labels[2:])
    scores = metric.compute()
    ap2 = float(binary_average_precision(probs[:, 2], labels[:, 2]))
    assert scores["per_class_ap"][0] == pytest.approx(1.0) and scores["per_class_ap"][1] is None
    assert scores["mAP"] == pytest.approx((1.0 + ap2) / 2) and scores["absent_classes"] == [1]
    # F1 at 0.5: class 0 2/2 hits -> 1; class 2 predicted {0, 1, 3}, true {0, 3} -> 2*2/(3+2)
    assert scores["f1"] == pytest.approx((1.0 + 0.8) / 2)

    single = MultiLabelScores(1)
    single.update(torch.tensor([[0.9], [0.2], [0.6]]), torch.tensor([[1], [0], [0]]))
    assert single.compute()["mAP"] == pytest.approx(1.0)
