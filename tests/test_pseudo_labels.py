"""The label rule (margins over per-slot thresholds, ignore band, padding)."""

import pytest
import torch

from wsss.pseudo.labels import scores_to_labels

torch.set_num_threads(2)


def reference_labels(scores, classes, valid, thresholds, band):
    """The rule written pixel by pixel, as the spec states it."""
    b, k, h, w = scores.shape
    out = torch.zeros(b, h, w, dtype=torch.uint8)
    for i in range(b):
        slots = [j for j in range(k) if valid[i, j]]
        for y in range(h):
            for x in range(w):
                if not slots:
                    continue
                margins = [float(scores[i, j, y, x]) - float(thresholds[i, j]) for j in slots]
                best = max(range(len(slots)), key=lambda n: (margins[n], -n))
                m = margins[best]
                label = int(classes[i, slots[best]]) if m > 0 else 0
                out[i, y, x] = 255 if abs(m) < band else label
    return out


def test_the_largest_margin_wins_not_the_largest_score():
    # slot 0 (class 3, threshold 0.6) scores higher everywhere but slot 1 (class 5, threshold 0.2)
    # has the larger margin in the middle pixels
    scores = torch.tensor([[[[0.9, 0.7, 0.65, 0.5]], [[0.1, 0.5, 0.6, 0.3]]]])
    labels = scores_to_labels(
        scores, torch.tensor([[3, 5]]), torch.tensor([[True, True]]), torch.tensor([[0.6, 0.2]])
    )
    # margins slot0: .3 .1 .05 -.1 ; slot1: -.1 .3 .4 .1
    assert labels.tolist() == [[[3, 5, 5, 5]]]
    assert labels.dtype == torch.uint8 and labels.shape == (1, 1, 4)


def test_zero_margin_is_background_and_ignore_band_covers_both_sides():
    scores = torch.tensor([[[[0.50, 0.52, 0.48, 0.60, 0.30]]]])
    classes, valid = torch.tensor([[2]]), torch.tensor([[True]])
    assert scores_to_labels(scores, classes, valid, 0.5).tolist() == [[[0, 2, 0, 2, 0]]]
    banded = scores_to_labels(scores, classes, valid, 0.5, ignore_band=0.05)
    # |margin| = 0, .02, .02 are uncertain; .1 and .2 are not
    assert banded.tolist() == [[[255, 255, 255, 2, 0]]]


def test_padding_slots_are_never_chosen_and_may_hold_any_class_value():
    scores = torch.tensor([[[[0.2, 0.8]], [[1.0, 1.0]]]])
    valid = torch.tensor([[True, False]])
    labels = scores_to_labels(scores, torch.tensor([[4, -1]]), valid, 0.5, ignore_band=0.01)
    assert labels.tolist() == [[[0, 4]]]


def test_image_without_present_classes_is_all_background_next_to_a_normal_image():
    scores = torch.full((2, 2, 3, 3), 0.9)
    valid = torch.tensor([[True, False], [False, False]])
    labels = scores_to_labels(scores, torch.tensor([[7, 0], [0, 0]]), valid, 0.5, ignore_band=0.3)
    assert (labels[0] == 7).all() and (labels[1] == 0).all()  # band must not turn it into 255
    empty = scores_to_labels(
        torch.zeros(2, 0, 3, 3),
        torch.zeros(2, 0, dtype=torch.long),
        torch.zeros(2, 0, dtype=torch.bool),
        0.5,
    )
    assert empty.shape == (2, 3, 3) and empty.dtype == torch.uint8 and empty.sum() == 0


def test_nan_score_never_wins():
    scores = torch.tensor([[[[float("nan"), 0.1]], [[0.9, float("nan")]]]])
    labels = scores_to_labels(scores, torch.tensor([[1, 2]]), torch.tensor([[True, True]]), 0.5)
    assert labels.tolist() == [[[2, 0]]]


def test_matches_the_pixel_by_pixel_rule_on_random_batches():
    gen = torch.Generator().manual_seed(0)
    b, k, h, w = 3, 4, 5, 6
    scores = torch.rand(b, k, h, w, generator=gen)
    classes = torch.randint(1, 21, (b, k), generator=gen)
    valid = torch.rand(b, k, generator=gen) > 0.3
    valid[2] = False  # one image with no class
    thresholds = torch.rand(b, k, generator=gen) * 0.6
    got = scores_to_labels(scores, classes, valid, thresholds, ignore_band=0.1)
    assert torch.equal(got, reference_labels(scores, classes, valid, thresholds, 0.1))
    assert (got == 255).any() and (got == 0).any()  # the case exercises every branch


def test_scalar_zero_dim_and_per_slot_thresholds_agree():
    scores = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    classes, valid = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.ones(2, 3, dtype=torch.bool)
    a = scores_to_labels(scores, classes, valid, 0.4)
    b = scores_to_labels(scores, classes, valid, torch.tensor(0.4))
    c = scores_to_labels(scores, classes, valid, torch.full((2, 3), 0.4))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_bad_inputs_are_refused_with_the_reason():
    scores, valid = torch.rand(1, 2, 3, 3), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="one value per slot"):
        scores_to_labels(scores, torch.tensor([[1, 2]]), valid, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="mask values 1..254"):
        scores_to_labels(scores, torch.tensor([[1, 300]]), valid, 0.5)
    with pytest.raises(ValueError, match="mask values 1..254"):
        scores_to_labels(scores, torch.tensor([[0, 2]]), valid, 0.5)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        scores_to_labels(scores, torch.tensor([[1]]), valid, 0.5)
