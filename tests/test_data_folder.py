"""Image folder + CSV source: lossless 16-bit grayscale, per-data-set statistics in raw units
(cached outside the data folder), class names from the CSVs, optional masks, and errors that name
the CSV row or file. The medical conventions (negatives, mask values, bit depths, DICOM, resize,
read-only folders) are in test_data_medical.py."""

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from wsss.data import folder as folder_module
from wsss.data.folder import FolderDataset
from wsss.data.imageio import DataError
from wsss.data.masks import write_label_png

from conftest import write_csv


def make_folder(root, rows, split="train", size=(40, 30), high=60000, seed=0):
    """16-bit grayscale PNGs (values up to ``high``) plus ``<split>.csv``; returns the arrays by name."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(seed)
    arrays = {}
    for name, _ in rows:
        array = gen.integers(0, high, size=size[::-1], dtype=np.uint16)
        array[0, 0] = high  # make sure values far above 255 are present
        Image.fromarray(array).save(root / "images" / name)
        arrays[name] = array
    write_csv(root / f"{split}.csv", rows)
    return arrays


ROWS = [("a.png", "nodule"), ("b.png", "nodule;effusion"), ("c.png", "effusion"), ("d.png", "")]


def test_16bit_grayscale_round_trips_exactly(tmp_path):
    arrays = make_folder(tmp_path, ROWS)
    with Image.open(tmp_path / "images" / "a.png") as png:
        assert png.mode.startswith("I")  # really stored as 16-bit
    data = FolderDataset(tmp_path, "train", channels=1)
    for i, (name, _) in enumerate(ROWS):
        raw = data.load_raw(i)
        assert raw.image.dtype == np.float32 and raw.image.shape == (30, 40, 1)
        assert np.array_equal(raw.image[:, :, 0], arrays[name].astype(np.float32))
    assert data.load_raw(0).image.max() == 60000
    rgb = FolderDataset(tmp_path, "train", channels=3)
    image = rgb.load(0).image
    assert image.shape == (30, 40, 3) and all(
        np.array_equal(image[..., c], image[..., 0]) for c in range(3)
    )


def test_16bit_tiff_round_trips_exactly(tmp_path):
    (tmp_path / "images").mkdir()
    array = np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50
    tifffile.imwrite(tmp_path / "images" / "scan.tif", array)
    write_csv(tmp_path / "train.csv", [("scan.tif", "nodule")])
    raw = FolderDataset(tmp_path, "train", channels=1).load_raw(0)
    assert raw.id == "scan" and np.array_equal(raw.image[:, :, 0], array.astype(np.float32))


def test_stats_are_per_channel_in_raw_units_and_normalise_16bit(tmp_path):
    arrays = make_folder(tmp_path, ROWS)
    data = FolderDataset(tmp_path, "train", channels=1)
    every = np.stack([a.astype(np.float64) for a in arrays.values()])
    mean, std = data.stats
    assert mean[0] == pytest.approx(every.mean(), rel=1e-9) and std[0] == pytest.approx(
        every.std(), rel=1e-9
    )
    assert mean[0] > 20000  # raw 16-bit units, not rescaled to 0..255
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    assert images.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert images.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    rgb_mean, rgb_std = FolderDataset(tmp_path, "train", channels=3).stats
    assert rgb_mean == pytest.approx(mean * 3) and rgb_std == pytest.approx(std * 3)


def test_stats_are_cached_outside_the_data_folder_and_follow_the_images(tmp_path, monkeypatch):
    root, cache_dir = tmp_path / "data", tmp_path / "cache"
    make_folder(root, ROWS)
    before = sorted(p.name for p in root.iterdir())
    data = FolderDataset(root, "train", channels=1, cache_dir=cache_dir)
    first = data.stats
    cache = data.stats_cache_path()
    assert cache.parent == cache_dir / "stats" and cache.name.endswith("_train.json")
    saved = json.loads(cache.read_text())
    assert saved["mean"] == first[0] and saved["std"] == first[1]
    assert sorted(p.name for p in root.iterdir()) == before  # nothing written into the data folder
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # no temp files left

    # a second data set over the same images reads the cache instead of the images
    def no_reading(path):
        raise AssertionError(f"read {path}")

    with monkeypatch.context() as patch:
        patch.setattr(folder_module, "read_image_file", no_reading)
        assert FolderDataset(root, "train", channels=1, cache_dir=cache_dir).stats == first

    # replacing an image (other size) makes the cache stale
    Image.fromarray(np.full((30, 41), 7, np.uint16)).save(root / "images" / "a.png")
    assert FolderDataset(root, "train", channels=1, cache_dir=cache_dir).stats != first
    # another channel count or intensity handling is not served from the one-channel cache
    assert len(FolderDataset(root, "train", channels=3, cache_dir=cache_dir).stats[0]) == 3
    scaled = FolderDataset(root, "train", channels=1, cache_dir=cache_dir, intensity="minmax").stats
    assert 0.0 < scaled[0][0] < 1.0


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("WSSS_CACHE_DIR", str(tmp_path / "w"))
    assert folder_module.default_cache_dir() == tmp_path / "w"
    monkeypatch.delenv("WSSS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert folder_module.default_cache_dir() == tmp_path / "x" / "wsss"


def test_stats_without_a_writable_cache_are_computed_but_not_cached(tmp_path):
    make_folder(tmp_path / "data", ROWS)
    (tmp_path / "blocker").write_text("a file where the cache folder would go")
    data = FolderDataset(
        tmp_path / "data", "train", channels=1, cache_dir=tmp_path / "blocker" / "cache"
    )
    mean, _ = data.stats
    assert mean[0] > 255 and not data.stats_cache_path().exists()


def test_stats_use_at_most_200_evenly_spaced_images(tmp_path):
    (tmp_path / "images").mkdir()
    write_csv(tmp_path / "train.csv", [(f"img_{i:04d}.png", "x") for i in range(450)])
    picks = FolderDataset(tmp_path, "train")._stats_picks()
    assert len(picks) == 200 and picks[0] == 0 and picks[-1] == 449
    gaps = np.diff(picks)
    assert gaps.min() >= 2 and gaps.max() <= 3


def test_config_stats_override_the_computed_ones(tmp_path):
    make_folder(tmp_path, ROWS)
    data = FolderDataset(tmp_path, "train", channels=1, mean=[100.0], std=[2.0])
    raw = data.load_raw(0).image[:, :, 0]
    assert torch.allclose(data[0]["image"][0], torch.from_numpy((raw - 100.0) / 2.0))
    assert (
        not data.stats_cache_path().exists()
    )  # given statistics: nothing computed, nothing cached
    with pytest.raises(DataError, match="one per channel"):
        FolderDataset(tmp_path, "train", channels=3, mean=[1.0], std=[1.0]).stats


def test_labels_and_class_names_come_from_the_csv(tmp_path):
    make_folder(tmp_path, ROWS)
    data = FolderDataset(tmp_path, "train", channels=1)
    assert data.class_names == ["effusion", "nodule"] and data.num_classes == 3
    assert data.ids == ["a", "b", "c", "d"]
    assert [data[i]["labels"].tolist() for i in range(4)] == [[0, 1], [1, 1], [1, 0], [0, 0]]
    assert data.has_masks is False and "mask" not in data[0]


def test_class_names_are_the_sorted_union_of_every_split(tmp_path):
    make_folder(tmp_path, ROWS)
    make_folder(tmp_path, [("v1.png", "nodule"), ("v2.png", "mass")], split="val", seed=1)
    expected = ["effusion", "mass", "nodule"]  # 'mass' appears only in val.csv
    for split in ("train", "val"):
        assert FolderDataset(tmp_path, split, channels=1).class_names == expected
    val = FolderDataset(tmp_path, "val", channels=1)
    assert val[0]["labels"].tolist() == [0.0, 0.0, 1.0] and val[1]["labels"].tolist() == [
        0.0,
        1.0,
        0.0,
    ]
    # only the named splits count: a CSV of another split does not add its labels
    make_folder(tmp_path, [("o.png", "other")], split="holdout", seed=2)
    assert FolderDataset(tmp_path, "train", class_splits=["train", "val"]).class_names == expected
    assert (
        "other" in FolderDataset(tmp_path, "train", class_splits=["train", "holdout"]).class_names
    )


def test_class_names_argument_sets_the_order(tmp_path):
    make_folder(tmp_path, ROWS)
    data = FolderDataset(tmp_path, "train", class_names=["nodule", "effusion", "mass"], channels=1)
    assert data.class_names == ["nodule", "effusion", "mass"]
    assert data.load_raw(1).labels.tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(DataError, match="more than once"):
        FolderDataset(tmp_path, "train", class_names=["nodule", "nodule", "effusion"])


def test_unknown_label_names_the_csv_row_and_label(tmp_path):
    make_folder(tmp_path, [("a.png", "nodule"), ("b.png", "nodlue")])
    with pytest.raises(DataError) as err:
        FolderDataset(tmp_path, "train", class_names=["nodule"])
    text = str(err.value)
    assert (
        str(tmp_path / "train.csv") in text
        and "row 3" in text
        and "'nodlue'" in text
        and "b.png" in text
    )
    assert "did you mean 'nodule'" in text


def test_duplicate_ids_are_an_error(tmp_path):
    make_folder(tmp_path, [("a.png", "x")])
    (tmp_path / "images" / "sub").mkdir()
    Image.fromarray(np.zeros((30, 40), np.uint16)).save(tmp_path / "images" / "sub" / "a.png")
    write_csv(tmp_path / "train.csv", [("a.png", "x"), ("sub/a.png", "x")])
    with pytest.raises(DataError, match=r"rows 2 and 3: two images share the id 'a'"):
        FolderDataset(tmp_path, "train")


def test_image_paths_are_relative_to_the_image_dir(tmp_path):
    (tmp_path / "scans" / "p1").mkdir(parents=True)
    Image.fromarray(np.full((8, 9), 300, np.uint16)).save(tmp_path / "scans" / "p1" / "s.png")
    write_csv(tmp_path / "train.csv", [("p1/s.png", "x")])
    data = FolderDataset(tmp_path, "train", image_dir="scans", channels=1)
    assert data.ids == ["s"] and data.image_path(0) == tmp_path / "scans" / "p1" / "s.png"
    assert data.load_raw(0).image.shape == (8, 9, 1)


def test_csv_with_bom_blank_lines_and_extra_columns(tmp_path):
    make_folder(tmp_path, [("a.png", "x")])
    (tmp_path / "train.csv").write_text(
        '\ufeffpatient,image,labels\n7,a.png," x ; y "\n\n', encoding="utf-8"
    )
    data = FolderDataset(tmp_path, "train")
    assert data.class_names == ["x", "y"] and data.load_raw(0).labels.tolist() == [1.0, 1.0]


def test_missing_csv_lists_the_csvs_present(tmp_path):
    make_folder(tmp_path, ROWS)
    with pytest.raises(DataError) as err:
        FolderDataset(tmp_path, "val")
    assert str(tmp_path / "val.csv") in str(err.value) and "train.csv" in str(err.value)


def test_bad_header_and_empty_csv(tmp_path):
    make_folder(tmp_path, ROWS)
    (tmp_path / "train.csv").write_text("file,classes\na.png,x\n")
    with pytest.raises(DataError, match="image,labels"):
        FolderDataset(tmp_path, "train")
    (tmp_path / "train.csv").write_text("image,labels\n")
    with pytest.raises(DataError, match="no rows"):
        FolderDataset(tmp_path, "train")


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(DataError, match="data folder does not exist"):
        FolderDataset(tmp_path / "nowhere", "train")
    write_csv(tmp_path / "train.csv", [("a.png", "x")])
    with pytest.raises(DataError, match="image folder does not exist"):
        FolderDataset(tmp_path, "train")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match="mask folder does not exist"):
        FolderDataset(tmp_path, "train", mask_dir="masks")


def test_optional_masks_are_read_by_image_stem(tmp_path):
    make_folder(tmp_path, ROWS[:2])
    (tmp_path / "masks").mkdir()
    mask = np.zeros((30, 40), np.uint8)
    mask[5:10, 5:10] = 2
    mask[0, :] = 255
    write_label_png(tmp_path / "masks" / "a.png", mask)
    data = FolderDataset(tmp_path, "train", mask_dir="masks", channels=1)
    assert data.has_masks
    item = data[0]
    assert item["mask"].dtype == torch.long and torch.equal(
        item["mask"], torch.from_numpy(mask).long()
    )
    with pytest.raises(DataError, match=r"b\.png: mask file is missing"):
        data.load_raw(1)
    write_label_png(
        tmp_path / "masks" / "b.png", np.full((30, 40), 3, np.uint8)
    )  # 3 classes: 0..2 valid
    with pytest.raises(DataError, match=r"b\.png: mask holds value\(s\) \[3\]"):
        data.load_raw(1)


def test_missing_image_names_the_file(tmp_path):
    make_folder(tmp_path, ROWS)
    (tmp_path / "images" / "c.png").unlink()
    data = FolderDataset(tmp_path, "train", channels=1, mean=[0.0], std=[1.0])
    with pytest.raises(DataError, match=r"c\.png: image file is missing"):
        data.load_raw(2)
