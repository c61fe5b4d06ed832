"""The copy-paste training set of context decoupling: what is pasted (the donor class only), the
labels (a union that keeps the receiver's own), and every choice a function of (seed, epoch,
index)."""

import numpy as np
import pytest
import torch

from wsss.data.base import RawSample, SegmentationSource
from wsss.data.copy_paste import CopyPasteSource, present_classes
from wsss.data.samplers import GlobalBatchSampler

SIDE = 24
VOID_COLOUR, BACKGROUND_COLOUR = 0.9, 0.1


class Squares(SegmentationSource):
    """Image k: background of one value, a 6x6 square of class 1 + k % 3 painted 0.2 + k / 10 at
    a place of its own, ringed by a void band of another value (as VOC's borders)."""

    class_names = ["a", "b", "c"]

    def __init__(self, count: int = 5) -> None:
        super().__init__(mean=[0.0], std=[1.0], channels=1)
        self.count = count

    @property
    def ids(self):
        return [f"img_{k}" for k in range(self.count)]

    def square(self, k: int) -> tuple[slice, slice]:
        top = 3 + 2 * k
        return slice(top, top + 6), slice(top + 1, top + 7)

    def load_raw(self, index: int) -> RawSample:
        image = np.full((SIDE, SIDE, 1), BACKGROUND_COLOUR, np.float32)
        mask = np.zeros((SIDE, SIDE), np.uint8)
        rows, cols = self.square(index)
        ring = (slice(rows.start - 1, rows.stop + 1), slice(cols.start - 1, cols.stop + 1))
        image[ring], mask[ring] = VOID_COLOUR, 255
        image[rows, cols], mask[rows, cols] = 0.2 + index / 10, 1 + index % 3
        labels = np.zeros(3, np.float32)
        labels[index % 3] = 1.0
        return RawSample(self.ids[index], image, labels, mask)

    def default_stats(self):
        return [0.0], [1.0]


def _copy_paste(probability=1.0, min_scale=1.0, seed=7):
    return CopyPasteSource(Squares(), Squares(), seed, probability, min_scale)


def test_a_pasted_object_brings_its_pixels_and_label_and_the_receiver_keeps_its_own():
    data = _copy_paste()
    pasted = 0
    for epoch in range(6):
        for index in range(len(data)):
            sample, paste = data.decoupled(index, epoch)
            own = Squares().load_raw(index)
            assert (
                paste is not None
                and paste.donor != index
                and paste.classes == (1 + paste.donor % 3,)
            )
            donor_colour = np.float32(0.2 + paste.donor / 10)
            # at scale 1 exactly the donor's 36 object pixels arrive, and neither its void
            # ring nor its background
            top, left, height, width = paste.box
            assert (height, width) == (6, 6)
            box = sample.image[top : top + height, left : left + width, 0]
            assert np.all(box == donor_colour)
            assert np.count_nonzero(sample.image[..., 0] == donor_colour) == 36
            assert np.all(sample.mask[top : top + height, left : left + width] == paste.classes[0])
            outside = np.ones((SIDE, SIDE), bool)
            outside[top : top + height, left : left + width] = False
            assert np.array_equal(sample.image[outside], own.image[outside])
            # the union of labels; the receiver's label stays even where it is covered
            assert sample.labels[index % 3] == 1.0 and sample.labels[paste.donor % 3] == 1.0
            assert sample.labels.sum() == len({index % 3, paste.donor % 3})
            pasted += 1
    assert pasted == 30


def test_only_the_donor_classes_chosen_are_cut_out_never_void_or_background():
    donors = Squares()
    mask = donors.load_raw(2).mask
    assert present_classes(mask, 3).tolist() == [3]  # 255 and 0 are not classes
    assert present_classes(np.full((4, 4), 255, np.uint8), 3).size == 0


def test_the_output_is_a_function_of_seed_epoch_and_index():
    def items(data, epoch):
        return [data[(index, 123, epoch)] for index in range(len(data))]

    first = items(_copy_paste(min_scale=0.5), 3)
    again = items(_copy_paste(min_scale=0.5), 3)  # another instance, same triples
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["labels"], b["labels"])
    # reading items in another order changes nothing
    data = _copy_paste(min_scale=0.5)
    backwards = [data[(index, 123, 3)] for index in reversed(range(len(data)))][::-1]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, backwards))
    later = items(_copy_paste(min_scale=0.5), 4)
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, later))
    other_seed = items(_copy_paste(min_scale=0.5, seed=8), 3)
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(first, other_seed))


def test_paste_probability_sets_the_share_of_images_that_receive_a_paste():
    source = Squares()
    untouched = _copy_paste(probability=0.0)
    for index in range(len(source)):
        assert torch.equal(untouched[(index, 5, 0)]["image"], source[(index, 5)]["image"])
    half = _copy_paste(probability=0.5)
    pastes = [half.decoupled(i, e)[1] for e in range(40) for i in range(len(source))]
    share = sum(p is not None for p in pastes) / len(pastes)
    assert 0.35 < share < 0.65


def test_paste_min_scale_bounds_how_far_a_pasted_object_shrinks():
    sides = {
        scale: [
            _copy_paste(min_scale=scale).decoupled(i, e)[1].box[2]
            for e in range(10)
            for i in range(5)
        ]
        for scale in (1.0, 0.5)
    }
    assert set(sides[1.0]) == {6}
    assert min(sides[0.5]) >= 3 and min(sides[0.5]) < 6


def test_an_image_whose_donors_hold_no_object_is_left_as_it_is():
    class Empty(Squares):
        def load_raw(self, index):
            sample = super().load_raw(index)
            sample.mask[:] = 0
            return sample

    data = CopyPasteSource(Squares(), Empty(), 0, 1.0)
    sample, paste = data.decoupled(1, 0)
    assert paste is None and np.array_equal(sample.image, Squares().load_raw(1).image)


def test_copy_paste_needs_two_images_of_the_same_split():
    with pytest.raises(ValueError, match="at least two images"):
        CopyPasteSource(Squares(1), Squares(1), 0, 1.0)


def test_the_sampler_passes_the_epoch_with_each_index_where_asked():
    plain = GlobalBatchSampler(10, 4, seed=3)
    with_epoch = GlobalBatchSampler(10, 4, seed=3, with_epoch=True)
    for sampler in (plain, with_epoch):
        sampler.set_epoch(2)
    assert [(i, s, 2) for i, s in plain] == list(with_epoch)
