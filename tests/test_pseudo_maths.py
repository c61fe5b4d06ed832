"""Label rule and Libra-style calibration against closed-form answers."""

import pytest
import torch
from torch import nn

from wsss.pseudo.calibrate import (ThresholdCalibrator, aggregate_thresholds, choose_thresholds,
                                   masked_confidences)
from wsss.pseudo.labels import dense_crf, scores_to_labels


def test_label_rule_uses_per_slot_thresholds_ignore_band_and_skips_padding():
    scores = torch.tensor([[[[0.9, 0.5, 0.30, 0.1]], [[0.2, 0.6, 0.31, 0.1]], [[1.0, 1.0, 1.0, 1.0]]]])
    classes = torch.tensor([[3, 7, 9]])
    valid = torch.tensor([[True, True, False]])  # slot 2 is padding: never chosen
    labels = scores_to_labels(scores, classes, valid, torch.tensor([[0.4, 0.3, 0.0]]), ignore_band=0.02)
    # margins slot0: .5 .1 -.1 -.3 ; slot1: -.1 .3 .01 -.2 -> 3, 7, 255 (|.01|<.02), 0
    assert labels.tolist() == [[[3, 7, 255, 0]]] and labels.dtype == torch.uint8


def test_image_without_classes_is_background():
    labels = scores_to_labels(torch.ones(1, 1, 2, 2), torch.tensor([[1]]), torch.tensor([[False]]), 0.5)
    assert labels.sum() == 0


class RegionClassifier(nn.Module):
    """Class-0 logit = 10 * (object pixels kept / object size) - 20 * (clutter pixels kept / size):
    a classifier that wants the whole object and nothing else."""

    def __init__(self, obj: torch.Tensor):
        super().__init__()
        self.register_buffer("obj", obj.float())

    def forward(self, x):
        visible = (x.abs().sum(1) > 0).float()
        keep_obj = (visible * self.obj).sum((1, 2)) / self.obj.sum()
        keep_bg = (visible * (1 - self.obj)).sum((1, 2)) / (1 - self.obj).sum()
        logit = 10 * keep_obj - 20 * keep_bg
        return torch.stack([logit, -logit], 1)


def known_case():
    obj = torch.zeros(16, 16)
    obj[4:12, 4:12] = 1
    maps = torch.full((16, 16), 0.2)  # clutter scores 0.2
    maps[4:12, 4:12] = 0.6  # the object scores 0.6
    maps[6:10, 6:10] = 1.0  # its most discriminative part
    images = torch.ones(1, 3, 16, 16)
    return RegionClassifier(obj), images, maps[None, None]


def test_keep_delete_finds_the_object_cut_and_beats_a_bad_fixed_threshold():
    model, images, maps = known_case()
    grid = [0.1, 0.3, 0.5, 0.7, 0.9]
    keep, delete, base = masked_confidences(model, images, maps, torch.tensor([[0]]), torch.tensor([[True]]), grid)
    chosen = choose_thresholds(keep, delete, base, grid, "keep_delete")
    assert chosen.item() == pytest.approx(0.3)  # 0.3 and 0.5 keep exactly the object; first maximum
    truth = model.obj.long()
    for tau, expect in ((chosen.item(), 1.0), (0.9, 0.25)):  # 0.9 keeps only the core: IoU 16/64
        labels = scores_to_labels(maps, torch.tensor([[1]]), torch.tensor([[True]]), tau)[0].long()
        inter = ((labels == 1) & (truth == 1)).sum().item()
        union = ((labels == 1) | (truth == 1)).sum().item()
        assert inter / union == pytest.approx(expect)


def test_increase_returns_the_scored_cut_not_the_next_one():
    keep = torch.tensor([[[0.5, 0.9, 0.6]]])
    base = torch.tensor([[0.5]])
    chosen = choose_thresholds(keep, torch.zeros_like(keep), base, [0.2, 0.4, 0.6], "increase")
    assert chosen.item() == pytest.approx(0.4)  # Libra's code would return 0.6
    no_gain = choose_thresholds(torch.full_like(keep, 0.1), keep, base, [0.2, 0.4, 0.6], "increase")
    assert no_gain.item() == pytest.approx(0.2)


def test_area_takes_the_largest_threshold_keeping_rho_of_the_confidence():
    keep = torch.tensor([[[0.95, 0.92, 0.85, 0.5]]])
    base = torch.tensor([[1.0]])
    chosen = choose_thresholds(keep, keep, base, [0.1, 0.2, 0.3, 0.4], "area", rho=0.9)
    assert chosen.item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="choose one of"):
        choose_thresholds(keep, keep, base, [0.1, 0.2, 0.3, 0.4], "best")


def test_chunked_queries_equal_one_batch_and_invalid_slots_are_nan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    images = torch.randn(2, 3, 12, 12)
    maps = torch.rand(2, 2, 12, 12)
    classes = torch.tensor([[0, 2], [1, 0]])
    valid = torch.tensor([[True, True], [True, False]])
    grid = [0.2, 0.5, 0.8]
    one = masked_confidences(model, images, maps, classes, valid, grid, max_batch=1000)
    chunked = masked_confidences(model, images, maps, classes, valid, grid, max_batch=5)
    for a, b in zip(one, chunked):
        assert torch.allclose(a, b, equal_nan=True, atol=1e-6)
    assert one[0][1, 1].isnan().all() and not one[0][0].isnan().any()
    single = masked_confidences(model, images[:1], maps[:1], classes[:1], valid[:1], grid)
    assert torch.allclose(single[0], one[0][:1], atol=1e-6)


def test_aggregation_is_a_per_class_median_with_default_for_unseen():
    out = aggregate_thresholds(torch.tensor([0.2, 0.4, 0.9, float("nan"), 0.3]),
                               torch.tensor([0, 0, 0, 1, 2]), num_classes=4, default=0.25)
    assert out.tolist() == pytest.approx([0.4, 0.25, 0.3, 0.25])


def test_calibrator_accumulates_over_batches():
    model, images, maps = known_case()
    calibrator = ThresholdCalibrator([0.1, 0.5, 0.9], "keep_delete", num_classes=2, default=0.25)
    for _ in range(3):
        calibrator.update(model, images, maps, torch.tensor([[0]]), torch.tensor([[True]]))
    assert calibrator.num_samples == 3
    assert calibrator.compute().tolist() == pytest.approx([0.5, 0.25])
    assert calibrator.global_threshold() == pytest.approx(0.5)


def test_crf_without_the_extra_says_which_extra_to_install():
    pytest.importorskip("numpy")
    try:
        import pydensecrf  # noqa: F401
        pytest.skip("pydensecrf2 is installed")
    except ImportError:
        pass
    import numpy as np

    with pytest.raises(ImportError, match=r"pip install -e '\.\[crf\]'"):
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.ones((2, 4, 4), np.float32))
