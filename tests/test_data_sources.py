"""The three data sources on real and generated data: VOC facts, lossless 16-bit folders,
deterministic synthetic data, and errors that name the file."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.config import load_config
from wsss.data.datamodule import build_source, pad_collate
from wsss.data.folder import FolderDataset
from wsss.data.imageio import DataError
from wsss.data.synthetic import SyntheticSegmentation
from wsss.data.transforms import train_transform
from wsss.data.voc import VOC_CLASSES, VOCSegmentation


def test_voc_labels_come_from_palette_masks(voc_root):
    data = VOCSegmentation(voc_root, "train")
    item = data[data.ids.index("2011_000003")]
    present = {VOC_CLASSES[i] for i in np.flatnonzero(item["labels"].numpy())}
    assert present == {"bottle", "person"}
    assert item["image"].shape == (3, 338, 500) and item["mask"].dtype == torch.long
    assert data.num_classes == 21 and len(data.palette) == 768


def test_voc_val_masks_keep_void_and_train_aug_reads_the_aug_masks(voc_root, tmp_path):
    val = VOCSegmentation(voc_root, "val")
    assert len(val) == 14
    assert (val.load_raw(0).mask == 255).any()
    root = tmp_path / "VOC2012"
    shutil.copytree(voc_root, root)
    aug_mask = np.array(Image.open(root / "SegmentationClassAug" / "2011_000003.png"))
    aug_mask[aug_mask == 15] = 3  # person -> bird, in the Aug copy only
    out = Image.fromarray(aug_mask, mode="P")
    out.putpalette(Image.open(root / "SegmentationClass" / "2011_000003.png").getpalette())
    out.save(root / "SegmentationClassAug" / "2011_000003.png")
    index = VOCSegmentation(root, "train").ids.index("2011_000003")
    names = lambda data: {VOC_CLASSES[i] for i in np.flatnonzero(data.load_raw(index).labels)}  # noqa: E731
    assert names(VOCSegmentation(root, "train_aug")) == {"bottle", "bird"}
    assert names(VOCSegmentation(root, "train")) == {"bottle", "person"}


def test_voc_missing_split_names_the_file_and_the_fix(voc_root):
    with pytest.raises(DataError) as err:
        VOCSegmentation(voc_root, "trainval")
    assert "trainval.txt" in str(err.value) and "prepare_voc.py" in str(err.value)
    assert "train_aug" in str(err.value)  # lists the splits that exist


def test_voc_split_without_masks_yields_no_mask(voc_root, tmp_path):
    root = tmp_path / "VOC2012"
    shutil.copytree(voc_root, root)
    (root / "ImageSets" / "Segmentation" / "test.txt").write_text("2011_000003\n")
    shutil.rmtree(root / "SegmentationClass")
    item = VOCSegmentation(root, "test")[0]
    assert "mask" not in item and item["labels"].sum() == 0


def make_folder(root, rows, size=(40, 30), dtype=np.uint16, high=60000):
    (root / "images").mkdir(parents=True)
    gen = np.random.default_rng(0)
    arrays = {}
    for name, _ in rows:
        array = gen.integers(0, high, size=size[::-1], dtype=dtype)
        Image.fromarray(array).save(root / "images" / name)
        arrays[name] = array
    lines = ["image,labels"] + [f"{name},{labels}" for name, labels in rows]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return arrays


def test_folder_reads_16bit_grayscale_without_loss_and_normalises_per_data_set(tmp_path):
    arrays = make_folder(tmp_path, [("a.png", "nodule"), ("b.png", "nodule;effusion"), ("c.png", "")])
    data = FolderDataset(tmp_path, "train", channels=1)
    assert data.class_names == ["effusion", "nodule"]
    raw = data.load_raw(0)
    assert raw.image.max() > 255 and np.array_equal(raw.image[:, :, 0], arrays["a.png"].astype(np.float32))
    every = np.stack([a.astype(np.float64) for a in arrays.values()])
    mean, std = data.stats
    assert mean[0] == pytest.approx(every.mean(), rel=1e-6) and std[0] == pytest.approx(every.std(), rel=1e-6)
    assert data[1]["labels"].tolist() == [1.0, 1.0] and data[2]["labels"].sum() == 0
    assert (tmp_path / ".wsss_stats_train.json").is_file()


def test_folder_unknown_label_names_the_row(tmp_path):
    make_folder(tmp_path, [("a.png", "nodule"), ("b.png", "nodlue")])
    with pytest.raises(DataError, match=r"train.csv, row 3: label\(s\) \['nodlue'\]"):
        FolderDataset(tmp_path, "train", class_names=["nodule"])


def test_synthetic_is_deterministic_and_labels_match_masks():
    a = SyntheticSegmentation("train", num_images=4, image_size=64, seed=1)
    b = SyntheticSegmentation("train", num_images=4, image_size=64, seed=1)
    for i in range(4):
        x, y = a.load_raw(i), b.load_raw(i)
        assert np.array_equal(x.image, y.image) and np.array_equal(x.mask, y.mask)
        assert set(np.flatnonzero(x.labels) + 1) == set(np.unique(x.mask)) - {0, 255}
    other = SyntheticSegmentation("train", num_images=4, image_size=64, seed=2).load_raw(0)
    assert not np.array_equal(a.load_raw(0).image, other.image)


def test_train_transform_pads_masks_with_ignore_and_collate_pads_batches():
    data = SyntheticSegmentation("train", num_images=2, image_size=48, seed=0,
                                 transform=train_transform(64, (127.0, 127.0, 127.0), (1.0, 1.0)))
    item = data[0]
    assert item["image"].shape == (3, 64, 64) and (item["mask"] == 255).any()
    plain = SyntheticSegmentation("val", num_images=1, image_size=40, seed=0)[0]
    batch = pad_collate([item, plain])
    assert batch["image"].shape == (2, 3, 64, 64) and batch["size"].tolist() == [[64, 64], [40, 40]]
    assert (batch["mask"][1, 40:, :] == 255).all() and (batch["image"][1, :, 40:, :] == 0).all()


def test_build_source_follows_the_config(voc_root):
    cfg = load_config("configs/voc.yaml", [f"data.root={voc_root}"])
    assert isinstance(build_source(cfg, "val"), VOCSegmentation)
    cfg = load_config("configs/default.yaml", ["data.num_train=7"])
    assert len(build_source(cfg, "train")) == 7
