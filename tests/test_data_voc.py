"""Pascal VOC 2012 source on the real voc_mini files: labels from palette masks, void borders,
train_aug masks from SegmentationClassAug, splits without masks, and errors naming the file."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.data import voc as voc_module
from wsss.data.imageio import DataError
from wsss.data.masks import voc_palette
from wsss.data.voc import IMAGENET_MEAN, IMAGENET_STD, VOC_CLASSES, VOCSegmentation

from conftest import save_palette_png

# read off the official masks (np.unique of each PNG's palette indices)
KNOWN_LABELS = {
    "2011_000003": {"bottle", "person"},
    "2011_000006": {"chair", "person", "sofa"},
    "2011_000025": {"bus", "car"},
    "2011_003066": {"bottle", "chair", "diningtable", "person"},
    "2007_000033": {"aeroplane"},
    "2007_000332": {"horse"},
    "2007_000676": {"sheep"},
    "2008_006874": {"motorbike", "person"},
    "2008_007273": {"cow"},
    "2008_007814": {"sheep"},
    "2009_000573": {"bicycle", "bottle"},
    "2009_001314": {"bird"},
    "2009_002888": {"aeroplane"},
    "2009_004867": {"bus"},
    "2009_005189": {"aeroplane"},
    "2010_000530": {"car", "person"},
    "2010_001069": {"bird"},
    "2010_001448": {"aeroplane"},
}


def names(labels):
    return {VOC_CLASSES[i] for i in np.flatnonzero(np.asarray(labels))}


def test_class_list_is_the_voc_order():
    assert len(VOC_CLASSES) == 20
    assert (
        VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[4] == "bottle" and VOC_CLASSES[14] == "person"
    )
    assert VOC_CLASSES[-1] == "tvmonitor"


def test_2011_000003_holds_bottle_and_person(voc_root):
    data = VOCSegmentation(voc_root, "train")
    item = data[data.ids.index("2011_000003")]
    assert names(item["labels"].numpy()) == {"bottle", "person"}
    assert item["labels"].dtype == torch.float32 and item["labels"].shape == (20,)
    assert item["image"].shape == (3, 338, 500) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (338, 500) and item["mask"].dtype == torch.long
    assert item["id"] == "2011_000003"
    assert data.num_classes == 21 and data.all_class_names[0] == "background"
    assert len(data.palette) == 768


def test_every_image_gets_the_labels_of_its_mask(voc_root):
    for split, count in (("train", 4), ("val", 14)):
        data = VOCSegmentation(voc_root, split)
        assert len(data) == count
        for i, sample_id in enumerate(data.ids):
            raw = data.load_raw(i)
            assert raw.id == sample_id and names(raw.labels) == KNOWN_LABELS[sample_id], sample_id


def test_masks_are_palette_indices_not_colours(voc_root):
    data = VOCSegmentation(voc_root, "train")
    index = data.ids.index("2011_000003")
    mask = data.load_raw(index).mask
    assert mask.dtype == np.uint8 and mask.ndim == 2
    assert set(np.unique(mask).tolist()) == {0, 5, 15, 255}  # background, bottle, person, void
    with Image.open(data.mask_path(index)) as png:
        assert png.mode == "P"
        palette = png.getpalette()
        # index 15 is drawn in VOC person pink: the file really stores indices into the VOC palette
        assert palette[15 * 3 : 15 * 3 + 3] == voc_palette()[15 * 3 : 15 * 3 + 3] == [192, 128, 128]


def test_val_masks_hold_void_borders(voc_root):
    val = VOCSegmentation(voc_root, "val")
    for i in range(len(val)):
        raw = val.load_raw(i)
        assert raw.image.shape == (513, 513, 3) and raw.mask.shape == (513, 513)
        assert (raw.mask == 255).any(), val.ids[i]


def test_train_aug_reads_segmentation_class_aug(voc_root, voc_copy):
    aug = VOCSegmentation(voc_root, "train_aug")
    train = VOCSegmentation(voc_root, "train")
    assert aug.ids == train.ids
    assert aug.mask_path(0).parent.name == "SegmentationClassAug"
    assert train.mask_path(0).parent.name == "SegmentationClass"
    # make the two folders disagree on one image: each split must follow its own folder
    path = voc_copy / "SegmentationClassAug" / "2011_000003.png"
    mask = np.array(Image.open(path))
    mask[mask == 15] = 3  # person -> bird, in the Aug copy only
    save_palette_png(path, mask)
    index = train.ids.index("2011_000003")
    assert names(VOCSegmentation(voc_copy, "train_aug").load_raw(index).labels) == {
        "bottle",
        "bird",
    }
    assert names(VOCSegmentation(voc_copy, "train").load_raw(index).labels) == {"bottle", "person"}


def test_masks_are_read_lazily(voc_root, monkeypatch):
    calls = []
    real = voc_module.read_mask
    monkeypatch.setattr(voc_module, "read_mask", lambda path: calls.append(path) or real(path))
    data = VOCSegmentation(voc_root, "val")
    assert calls == []
    data.load_raw(3)
    assert calls == [data.mask_path(3)]


def test_split_without_masks_has_no_mask_and_no_labels(voc_copy):
    # a test split: its images exist, none of its masks does (SegmentationClass itself is there)
    for new_id in ("2012_900001", "2012_900002"):
        shutil.copy(
            voc_copy / "JPEGImages" / "2011_000003.jpg", voc_copy / "JPEGImages" / f"{new_id}.jpg"
        )
    (voc_copy / "ImageSets" / "Segmentation" / "test.txt").write_text("2012_900001\n2012_900002\n")
    data = VOCSegmentation(voc_copy, "test")
    assert data.has_masks is False
    item = data[1]
    assert "mask" not in item and item["labels"].sum() == 0 and item["image"].shape == (3, 338, 500)


def test_one_missing_mask_is_an_error_naming_the_file(voc_copy):
    data_ids = VOCSegmentation(voc_copy, "val").ids
    missing = (
        voc_copy / "SegmentationClass" / f"{data_ids[0]}.png"
    )  # the first id: must not look mask-less
    missing.unlink()
    data = VOCSegmentation(voc_copy, "val")
    assert data.has_masks
    with pytest.raises(DataError, match="mask file is missing") as err:
        data.load_raw(0)
    assert str(missing) in str(err.value)
    data.load_raw(1)  # the others still load


def test_missing_image_names_the_file(voc_copy):
    (voc_copy / "JPEGImages" / "2011_000025.jpg").unlink()
    data = VOCSegmentation(voc_copy, "train")
    with pytest.raises(DataError, match=r"2011_000025\.jpg: image file is missing"):
        data.load_raw(data.ids.index("2011_000025"))


def test_train_aug_without_aug_masks_says_where_to_get_them(voc_copy):
    shutil.rmtree(voc_copy / "SegmentationClassAug")
    with pytest.raises(DataError) as err:
        VOCSegmentation(voc_copy, "train_aug")
    text = str(err.value)
    assert "SegmentationClassAug" in text and "prepare_voc.py" in text


def test_missing_root_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        VOCSegmentation(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere") in str(err.value) and "prepare_voc.py" in str(err.value)


def test_vocdevkit_instead_of_voc2012_points_at_the_right_folder(voc_copy):
    with pytest.raises(DataError) as err:
        VOCSegmentation(voc_copy.parent, "train")
    assert str(voc_copy) in str(err.value) and "JPEGImages" in str(err.value)


def test_missing_split_lists_the_splits_that_exist(voc_root):
    with pytest.raises(DataError) as err:
        VOCSegmentation(voc_root, "trainval")
    text = str(err.value)
    assert "trainval.txt" in text and "prepare_voc.py" in text
    assert "train, train_aug, val" in text


def test_empty_split_is_an_error(voc_copy):
    (voc_copy / "ImageSets" / "Segmentation" / "val.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"val\.txt: the split file lists no image ids"):
        VOCSegmentation(voc_copy, "val")


def test_default_stats_are_imagenet_in_pixel_units(voc_root):
    data = VOCSegmentation(voc_root, "val")
    mean, std = data.stats
    assert mean == pytest.approx([123.675, 116.28, 103.53]) and std == pytest.approx(
        [58.395, 57.12, 57.375]
    )
    assert (mean, std) == (IMAGENET_MEAN, IMAGENET_STD)
    item = data[0]
    raw = data.load_raw(0).image
    expected = (raw[..., 0] - mean[0]) / std[0]
    assert torch.allclose(item["image"][0], torch.from_numpy(expected), atol=1e-5)
    gray = VOCSegmentation(voc_root, "val", channels=1)
    assert len(gray.stats[0]) == 1 and gray[0]["image"].shape == (1, 513, 513)
    custom = VOCSegmentation(voc_root, "val", mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    assert torch.equal(custom[0]["image"][1], torch.from_numpy(raw[..., 1]))
