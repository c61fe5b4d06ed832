"""Libra-style threshold calibration: masked queries, objectives, batching and aggregation,
checked against toy classifiers whose answers are known in closed form."""

import math

import pytest
import torch
from torch import nn

from wsss.pseudo.calibrate import (
    OBJECTIVES,
    ThresholdCalibrator,
    aggregate_thresholds,
    choose_thresholds,
    masked_confidences,
)
from wsss.pseudo.labels import scores_to_labels

torch.set_num_threads(2)
NAN = float("nan")
GRID = [0.1, 0.3, 0.5, 0.7, 0.9]


class RegionClassifier(nn.Module):
    """Class c's logit = a * (share of object c's pixels visible) - b * (share of the other pixels
    visible) + c0. A pixel is visible unless all its channels are exactly zero (mean-fill)."""

    def __init__(self, objects: torch.Tensor, a: float, b: float, c0: float):
        super().__init__()
        self.register_buffer("objects", objects.float())  # (C, H, W)
        self.a, self.b, self.c0 = a, b, c0

    def forward(self, x):
        visible = (x != 0).any(1).float()  # (N, H, W)
        inside = torch.einsum("nhw,chw->nc", visible, self.objects) / self.objects.sum((1, 2))
        outside = torch.einsum("nhw,chw->nc", visible, 1 - self.objects) / (1 - self.objects).sum(
            (1, 2)
        )
        return self.a * inside - self.b * outside + self.c0


def object_and_map(top: int, left: int):
    """16x16: an 8x8 object scoring 0.6 with a 4x4 core at 1.0; clutter at 0.2 except a 4x4
    patch of hard clutter at 0.4. Cuts: 0.1 keeps all, 0.3 object + hard clutter, 0.5 exactly the
    object, 0.7 and 0.9 only the core."""
    obj = torch.zeros(16, 16)
    obj[top : top + 8, left : left + 8] = 1
    score = torch.full((16, 16), 0.2)
    score[top : top + 8, left : left + 8] = 0.6
    score[top + 2 : top + 6, left + 2 : left + 6] = 1.0
    hard = (12, 0) if top < 8 else (0, 12)
    score[hard[0] : hard[0] + 4, hard[1] : hard[1] + 4] = 0.4
    assert obj[hard[0] : hard[0] + 4, hard[1] : hard[1] + 4].sum() == 0
    return obj, score


def toy_batch(a=4.0, b=8.0, c0=0.0):
    """Two images, two classes; image 0 has both, image 1 only class 1 (slot 1 is padding)."""
    obj0, map0 = object_and_map(2, 2)
    obj1, map1 = object_and_map(8, 6)
    model = RegionClassifier(torch.stack([obj0, obj1]), a, b, c0)
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 3, 16, 16, generator=gen) + 0.5) * torch.where(
        torch.rand(2, 3, 16, 16, generator=gen) > 0.5, 1.0, -1.0
    )  # never zero
    maps = torch.stack(
        [torch.stack([map0, map1]), torch.stack([map1, torch.rand(16, 16, generator=gen)])]
    )
    class_index = torch.tensor([[0, 1], [1, -1]])
    valid = torch.tensor([[True, True], [True, False]])
    return model, images, maps, class_index, valid


class LinearProbe(nn.Module):
    """logit_c = sum(x * W_c): the confidence pins down the exact masked input."""

    def __init__(self, classes: int, shape: tuple[int, int, int], seed: int = 0):
        super().__init__()
        self.weight = nn.Parameter(
            torch.randn(classes, *shape, generator=torch.Generator().manual_seed(seed))
        )
        self.batch_sizes: list[int] = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        return torch.einsum("nchw,kchw->nk", x, self.weight)


# --- masked_confidences -------------------------------------------------------------------------


def test_queries_are_the_image_times_the_binary_cut_with_ties_kept():
    """Map values sit exactly on the grid: a pixel equal to t is kept (>=), and deleted pixels
    are exactly zero in normalised space."""
    torch.manual_seed(0)
    model = LinearProbe(3, (2, 4, 4))
    images = torch.randn(1, 2, 4, 4)
    maps = torch.tensor([0.0, 0.25, 0.5, 0.75]).repeat(4, 1)[None, None]  # columns 0 .. 0.75
    grid = [0.25, 0.5, 0.75]
    keep, delete, base = masked_confidences(
        model, images, maps, torch.tensor([[2]]), torch.tensor([[True]]), grid
    )
    w = model.weight[2]
    assert base.item() == pytest.approx(torch.sigmoid((images[0] * w).sum()).item(), abs=1e-5)
    for t, tau in enumerate(grid):
        cut = (maps[0, 0] >= tau).float()
        expect_keep = torch.sigmoid((images[0] * cut * w).sum()).item()
        expect_delete = torch.sigmoid((images[0] * (1 - cut) * w).sum()).item()
        assert keep[0, 0, t].item() == pytest.approx(expect_keep, abs=1e-5)
        assert delete[0, 0, t].item() == pytest.approx(expect_delete, abs=1e-5)
    assert keep.dtype == delete.dtype == base.dtype == torch.float32


def test_batched_equals_per_image_and_chunking_changes_nothing():
    torch.manual_seed(1)
    model = LinearProbe(4, (3, 8, 8))
    images = torch.randn(3, 3, 8, 8)
    maps = torch.rand(3, 2, 8, 8)
    class_index = torch.tensor([[0, 3], [2, 99], [1, 2]])  # 99 sits on a padding slot
    valid = torch.tensor([[True, True], [True, False], [True, True]])
    whole = masked_confidences(model, images, maps, class_index, valid, GRID, max_batch=1000)
    for max_batch in (1, 7):
        chunked = masked_confidences(
            model, images, maps, class_index, valid, GRID, max_batch=max_batch
        )
        for a, b in zip(whole, chunked):
            assert torch.allclose(a, b, atol=1e-6, equal_nan=True)
    for i in range(3):
        single = masked_confidences(
            model,
            images[i : i + 1],
            maps[i : i + 1],
            class_index[i : i + 1],
            valid[i : i + 1],
            GRID,
        )
        for a, b in zip(whole, single):
            assert torch.allclose(a[i : i + 1], b, atol=1e-6, equal_nan=True)
    keep, delete, base = whole
    assert keep[1, 1].isnan().all() and delete[1, 1].isnan().all() and base[1, 1].isnan()
    assert not keep[valid].isnan().any() and not delete[valid].isnan().any()


def test_queries_go_in_few_bounded_batches_and_padding_costs_nothing():
    model = LinearProbe(2, (1, 6, 6))
    images, maps = torch.randn(2, 1, 6, 6), torch.rand(2, 3, 6, 6)
    valid = torch.tensor([[True, False, False], [True, True, False]])  # 3 valid slots
    class_index = torch.zeros(2, 3, dtype=torch.long)
    masked_confidences(model, images, maps, class_index, valid, GRID, max_batch=1000)
    queries = 3 * len(GRID) * 2
    assert model.batch_sizes == [2, queries]  # one base pass, one pass for all thresholds
    model.batch_sizes.clear()
    masked_confidences(model, images, maps, class_index, valid, GRID, max_batch=4)
    assert max(model.batch_sizes) <= 4
    assert sum(model.batch_sizes) == 2 + queries
    assert len(model.batch_sizes) == 1 + math.ceil(queries / 4)


def test_training_mode_batchnorm_is_left_untouched():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4, 2),
    )
    model.train()
    model[5].eval()  # a submodule with its own mode must get it back
    stats = model[1].running_mean.clone()
    images, maps = torch.randn(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
    args = (images, maps, torch.tensor([[0], [1]]), torch.ones(2, 1, dtype=torch.bool), GRID)
    one = masked_confidences(model, *args, max_batch=1000)
    chunked = masked_confidences(model, *args, max_batch=3)
    assert torch.equal(model[1].running_mean, stats)
    assert model.training and model[1].training and not model[5].training
    for a, b in zip(one, chunked):
        assert torch.allclose(a, b, atol=1e-6)


def test_bad_queries_are_refused():
    model = LinearProbe(2, (1, 4, 4))
    images, maps, valid = torch.randn(1, 1, 4, 4), torch.rand(1, 1, 4, 4), torch.tensor([[True]])
    with pytest.raises(ValueError, match="outside the 2 logits"):
        masked_confidences(model, images, maps, torch.tensor([[2]]), valid, GRID)
    with pytest.raises(ValueError, match="upsample"):
        masked_confidences(model, images, torch.rand(1, 1, 2, 2), torch.tensor([[0]]), valid, GRID)
    with pytest.raises(ValueError, match="grid"):
        masked_confidences(model, images, maps, torch.tensor([[0]]), valid, [])


# --- the objectives on a classifier with a known answer -----------------------------------------


def test_keep_delete_and_increase_find_the_object_cut_and_it_labels_the_object():
    model, images, maps, class_index, valid = toy_batch(a=4.0, b=8.0)
    keep, delete, base = masked_confidences(model, images, maps, class_index, valid, GRID)
    for objective in ("keep_delete", "increase"):
        chosen = choose_thresholds(keep, delete, base, GRID, objective)
        # only 0.5 keeps exactly the object; Libra's off-by-one would give 0.7 (the core)
        assert chosen[valid].tolist() == pytest.approx([0.5, 0.5, 0.5])
        assert chosen[1, 1].isnan()
    # image 1 has one class: its pseudo-label at the chosen cut is exactly the object
    chosen = choose_thresholds(keep, delete, base, GRID, "keep_delete")
    obj = model.objects[1].long() * 2  # mask value of class index 1
    labels = scores_to_labels(maps[1:], class_index[1:] + 1, valid[1:], chosen[1:].nan_to_num())
    assert torch.equal(labels[0].long(), obj)
    libra = scores_to_labels(maps[1:], class_index[1:] + 1, valid[1:], 0.7)  # the next cut
    assert (libra[0] == 2).sum() == 16 and obj.bool().sum() == 64
    # the scored cut is what is applied: its kept-region confidence is the best one
    t = GRID.index(0.5)
    assert keep[0, 0, t] == keep[0, 0].max()


def test_area_takes_the_smallest_region_that_keeps_rho_of_the_confidence():
    model, images, maps, class_index, valid = toy_batch(a=8.0, b=2.0, c0=-2.0)
    keep, delete, base = masked_confidences(model, images, maps, class_index, valid, GRID)
    # base = sigmoid(4); the core alone gives sigmoid(0) < 0.9 * base; the object gives sigmoid(6)
    assert choose_thresholds(keep, delete, base, GRID, "area", rho=0.9)[
        valid
    ].tolist() == pytest.approx([0.5, 0.5, 0.5])
    # a lax rho accepts the core: the largest threshold wins
    assert choose_thresholds(keep, delete, base, GRID, "area", rho=0.5)[
        valid
    ].tolist() == pytest.approx([0.9, 0.9, 0.9])


def test_delete_takes_the_smallest_region_whose_removal_takes_the_evidence_away():
    """A classifier that recognises the class from its core alone: `area` settles for the core
    (0.7), `delete` needs the whole object gone (0.5), because deleting the core leaves the rest of
    the object visible and recognised."""
    model, images, maps, class_index, valid = toy_batch(a=8.0, b=0.0, c0=-1.0)
    keep, delete, base = masked_confidences(model, images, maps, class_index, valid, GRID)
    # base = sigmoid(7); core alone sigmoid(1) ... with rho 0.7 the core is "sufficient"
    assert choose_thresholds(keep, delete, base, GRID, "area", rho=0.7)[
        valid
    ].tolist() == pytest.approx([0.9, 0.9, 0.9])
    # deleting the core leaves 3/4 of the object: sigmoid(5) > 0.3 * base; deleting the object
    # (cut 0.5) leaves sigmoid(-1) = 0.27 <= 0.3 * base = 0.3
    chosen = choose_thresholds(keep, delete, base, GRID, "delete", delta=0.3)
    assert chosen[valid].tolist() == pytest.approx([0.5, 0.5, 0.5]) and chosen[1, 1].isnan()
    # a strict delta no cut can meet: no answer (NaN), which the medians leave out
    strict = choose_thresholds(keep, delete, base, GRID, "delete", delta=0.01)
    assert strict.isnan().all()
    calibrator = ThresholdCalibrator(GRID, "delete", num_classes=3, default=0.25, delta=0.01)
    calibrator.update(model, images, maps, class_index, valid)
    assert calibrator.num_samples == 0 and calibrator.pairs_per_class() == [0, 0, 0]
    assert calibrator.compute().tolist() == pytest.approx([0.25] * 3)


# --- the objectives in closed form --------------------------------------------------------------


def test_increase_returns_the_scored_cut_ties_to_the_lowest():
    grid = [0.2, 0.4, 0.6, 0.8]
    keep = torch.tensor([[[0.5, 0.9, 0.9, 0.6], [0.1, 0.2, 0.3, 0.4]]])
    base = torch.tensor([[0.5, 0.5]])
    chosen = choose_thresholds(keep, torch.zeros_like(keep), base, grid, "increase")
    assert chosen[0].tolist() == pytest.approx([0.4, 0.2])  # tie 0.4/0.6 -> 0.4; no gain -> lowest


def test_keep_delete_is_the_argmax_of_the_gap():
    keep = torch.tensor([[[0.9, 0.8, 0.7]]])
    delete = torch.tensor([[[0.8, 0.2, 0.3]]])
    chosen = choose_thresholds(keep, delete, torch.tensor([[0.9]]), [0.1, 0.5, 0.9], "keep_delete")
    assert chosen.item() == pytest.approx(0.5)


def test_area_rule_equality_non_monotone_fallback_and_unsorted_grid():
    base = torch.tensor([[0.8, 0.8, 0.8]])
    keep = torch.tensor(
        [
            [
                [0.9, 0.5, 0.4, 0.3],  # 0.4 == 0.5 * 0.8 counts
                [0.9, 0.1, 0.1, 0.5],  # fails at 0.2 and 0.3, passes again at 0.4
                [0.3, 0.2, 0.1, 0.0],
            ]
        ]
    )  # never: the lowest threshold
    grid = [0.1, 0.2, 0.3, 0.4]
    chosen = choose_thresholds(keep, keep, base, grid, "area", rho=0.5)
    assert chosen[0].tolist() == pytest.approx([0.3, 0.4, 0.1])
    # "largest" and "lowest" mean threshold values, not grid positions
    order = [2, 0, 3, 1]
    shuffled = choose_thresholds(
        keep[..., order], keep[..., order], base, [grid[i] for i in order], "area", rho=0.5
    )
    assert shuffled[0].tolist() == pytest.approx([0.3, 0.4, 0.1])


def test_invalid_slots_are_nan_and_unknown_objectives_list_the_choices():
    keep = torch.tensor([[[0.9, 0.1], [NAN, NAN]]])
    base = torch.tensor([[0.5, NAN]])
    for objective in OBJECTIVES:
        # keeping falls and deleting rises with the threshold, as on a real map
        chosen = choose_thresholds(keep, keep.flip(-1), base, [0.2, 0.4], objective)
        assert not chosen[0, 0].isnan() and chosen[0, 1].isnan()
    with pytest.raises(ValueError, match="increase.*keep_delete.*area.*delete"):
        choose_thresholds(keep, keep, base, [0.2, 0.4], "auc")
    with pytest.raises(ValueError, match="T=3"):
        choose_thresholds(keep, keep, base, [0.2, 0.4, 0.6], "area")


# --- aggregation ----------------------------------------------------------------------------------


def test_aggregate_is_a_per_class_median_with_default_for_unseen():
    per_slot = torch.tensor([0.2, 0.9, 0.4, NAN, 0.3, 0.7, NAN])
    classes = torch.tensor([0, 0, 0, 1, 2, 2, 4])
    out = aggregate_thresholds(per_slot, classes, num_classes=5, default=0.25)
    # class 1 and 4 have only NaN, class 3 nothing; class 2 has two values: the lower median
    assert out.tolist() == pytest.approx([0.4, 0.25, 0.3, 0.25, 0.25])
    with pytest.raises(ValueError, match="0..4"):
        aggregate_thresholds(torch.tensor([0.5]), torch.tensor([5]), num_classes=5, default=0.25)


def test_calibrator_accumulates_valid_slots_over_batches():
    model, images, maps, class_index, valid = toy_batch()
    calibrator = ThresholdCalibrator(GRID, "keep_delete", num_classes=3, default=0.25, max_batch=8)
    assert calibrator.num_samples == 0 and calibrator.global_threshold() == 0.25
    assert calibrator.compute().tolist() == pytest.approx([0.25, 0.25, 0.25])
    chosen = calibrator.update(model, images, maps, class_index, valid)
    assert chosen.shape == (2, 2)
    # a second batch, one slot: a map that is zero outside the core, so every cut keeps the same
    # core and the tie goes to the lowest threshold, 0.1
    core_only = maps[:1, :1].clone()
    core_only[core_only < 0.9] = 0.0
    calibrator.update(model, images[:1], core_only, class_index[:1, :1], valid[:1, :1])
    assert calibrator.num_samples == 4
    per_class = calibrator.compute()
    # class 0: {0.5, 0.1} -> lower median 0.1; class 1: {0.5, 0.5}; class 2 unseen: the global median
    assert per_class.tolist() == pytest.approx([0.1, 0.5, 0.5])
    assert calibrator.pairs_per_class() == [2, 2, 0]
    assert calibrator.global_threshold() == pytest.approx(0.5)  # {0.1, 0.5, 0.5, 0.5}
    with pytest.raises(ValueError, match="choose one of"):
        ThresholdCalibrator(GRID, "best")


def test_calibration_skips_pairs_the_classifier_does_not_recognise():
    """Class 0 is recognised on the whole image (sigmoid 0.88), class 1 is not (logit -10): with
    min_confidence 0.5 only the class-0 pair is scored, and every class without a pair takes its
    threshold. Without the gate, class 1's uninformative queries would set its threshold."""
    model, images, maps, class_index, valid = toy_batch(c0=torch.tensor([6.0, -6.0]))
    rows = []
    model.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    ungated = ThresholdCalibrator(GRID, "area", num_classes=3, default=0.25)
    chosen = ungated.update(model, images, maps, class_index, valid)
    assert sum(rows) == 2 + 3 * len(GRID) * 2  # the plain images, then keep + delete per slot
    rows.clear()
    gated = ThresholdCalibrator(GRID, "area", num_classes=3, default=0.25, min_confidence=0.5)
    gated_chosen = gated.update(model, images, maps, class_index, valid)
    assert sum(rows) == 2 + 1 * len(GRID) * 2  # unrecognised pairs are never queried
    assert gated.skipped == 2 and gated.pairs_per_class() == [1, 0, 0]
    assert (
        gated_chosen[0, 0] == chosen[0, 0]
        and gated_chosen[0, 1].isnan()
        and gated_chosen[1, 0].isnan()
    )
    assert gated.compute().tolist() == pytest.approx([float(chosen[0, 0])] * 3)
    assert ungated.pairs_per_class() == [1, 2, 0]
    with pytest.raises(ValueError, match="min_confidence"):
        ThresholdCalibrator(GRID, min_confidence=1.5)


def test_shrink_fallback_pulls_few_pairs_toward_the_fixed_threshold():
    calibrator = ThresholdCalibrator(
        GRID, "keep_delete", num_classes=3, default=0.25, fallback="shrink", shrinkage=2.0
    )
    keep = torch.zeros(3, 1, len(GRID))
    delete = torch.zeros(3, 1, len(GRID))
    best = [
        GRID.index(0.5),
        GRID.index(0.5),
        GRID.index(0.9),
    ]  # class 0 twice at 0.5, class 1 at 0.9
    for row, index in enumerate(best):
        keep[row, 0, index] = 1.0
    base = torch.ones(3, 1)
    classes = torch.tensor([[0], [0], [1]])
    calibrator.update_from_confidences(
        keep, delete, base, classes, torch.ones(3, 1, dtype=torch.bool)
    )
    per_class = calibrator.compute()
    # class 0: (2 * 0.5 + 2 * 0.25) / 4; class 1: (1 * 0.9 + 2 * 0.25) / 3; class 2 (no pair): 0.25
    assert per_class.tolist() == pytest.approx([0.375, 1.4 / 3, 0.25])
    assert calibrator.sources() == ["shrunk", "shrunk", "fixed"]
    plain = ThresholdCalibrator(GRID, "keep_delete", num_classes=3, default=0.25, fallback="global")
    plain.update_from_confidences(keep, delete, base, classes, torch.ones(3, 1, dtype=torch.bool))
    assert (
        plain.compute().tolist() == pytest.approx([0.5, 0.9, 0.5])
        and plain.sources()[2] == "global"
    )
    with pytest.raises(ValueError, match="fallback"):
        ThresholdCalibrator(GRID, fallback="median")
