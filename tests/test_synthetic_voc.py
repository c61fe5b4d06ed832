"""scripts/make_synthetic_voc.py: a tiny set written to disk and read back through the VOC data
source; labels from the masks, void borders along every boundary, boats always on water."""

import numpy as np

from wsss.data import synthetic_voc as scene
from wsss.data.voc import VOC_CLASSES, VOCSegmentation

from conftest import load_script

make_voc = load_script("make_synthetic_voc")
prepare_voc = load_script("prepare_voc")
SIZE = 80
BOAT = VOC_CLASSES.index("boat") + 1


def is_water(pixels):
    """The water's colours: blue well above red (its base is R 10-60, B 140-230)."""
    pixels = pixels.astype(np.float32)
    return pixels[:, 2] > pixels[:, 0] + 50


def block_means(image, block=4):
    h, w, c = image.shape
    return image.astype(np.float32).reshape(h // block, block, w // block, block, c).mean((1, 3))


def test_written_set_reads_back_through_the_voc_source(tmp_path):
    root = make_voc.make_synthetic_voc(
        tmp_path, num_train=30, num_val=2, seed=0, size=SIZE, echo=lambda _: None
    )
    assert root == tmp_path / "VOCdevkit" / "VOC2012"
    assert (
        prepare_voc.prepare(root, echo=lambda _: None) == 0
    )  # the full layout, train_aug included
    allowed = {0, 255} | {VOC_CLASSES.index(name) + 1 for name in scene.CLASSES}
    train = VOCSegmentation(root, "train")
    assert len(train) == 30 and len(VOCSegmentation(root, "val")) == 2
    assert VOCSegmentation(root, "train_aug").ids == train.ids
    boats = plain = 0
    for index in range(len(train)):
        raw = train.load_raw(index)
        image, mask = scene.labelled_sample(0, "train", index, SIZE, 2)
        assert np.array_equal(
            raw.mask, mask
        )  # the palette PNG holds the generator's labels exactly
        assert raw.image.shape == (SIZE, SIZE, 3)
        assert (
            np.abs(block_means(raw.image) - block_means(image)).mean() < 3
        )  # JPEG keeps the low frequencies
        present = set(np.unique(raw.mask).tolist())
        assert present <= allowed
        assert set((np.flatnonzero(raw.labels) + 1).tolist()) == present - {0, 255} != set()

        # void borders: no pixel touches a pixel of another (non-void) label, and the band exists
        for a, b in ((raw.mask[1:], raw.mask[:-1]), (raw.mask[:, 1:], raw.mask[:, :-1])):
            touching = (a != b) & (a != 255) & (b != 255)
            assert not touching.any(), raw.id
        assert (raw.mask == 255).any()

        # the context confound: a boat always has water under it, and the water is background
        bottom = slice(int(0.9 * SIZE), SIZE)
        background = raw.mask[bottom] == 0
        water = (
            bool(is_water(raw.image[bottom][background]).mean() > 0.8) if background.any() else None
        )
        if raw.labels[BOAT - 1]:
            boats += 1
            assert water, raw.id
        elif water is False:
            plain += 1
    assert boats > 0 and plain > 0  # both kinds of image occur, so the check above can fail


def test_void_border_band_has_the_requested_width():
    mask = np.zeros((9, 12), np.uint8)
    mask[:, 6:] = 4
    for width in (1, 2, 4):
        out = scene.void_borders(mask, width)
        columns = np.flatnonzero((out == 255).all(0))
        assert (
            len(columns) == width and columns.max() - columns.min() == width - 1
        )  # one band, that wide
        assert 5 in columns or 6 in columns  # on the boundary between columns 5 and 6
        assert set(np.unique(out[:, : columns.min()])) == {0} and set(
            np.unique(out[:, columns.max() + 1 :])
        ) == {4}
    assert np.array_equal(scene.void_borders(mask, 0), mask)


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert make_voc.main(["--out", str(tmp_path), "--num-train", "0"]) == 1
    assert "--num-train" in capsys.readouterr().err
    assert not (tmp_path / "VOCdevkit").exists()
