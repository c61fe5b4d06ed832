"""Medical folder data: negatives, one finding, mask value conventions, class-name typos, bit
depths and intensity handling, DICOM, working size and original size, read-only data folders,
the built-in synthetic lesion source and its folder export in three file formats."""

import os
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from wsss.cli import main
from wsss.config import ConfigError, load_config
from wsss.data.check import check_source
from wsss.data.datamodule import build_source, pad_collate
from wsss.data.folder import FolderDataset
from wsss.data.imageio import DataError, read_image_file
from wsss.data.masks import write_label_png
from wsss.data.resize import restore_size
from wsss.data.synthetic_lesion import SyntheticLesion

from conftest import load_script, write_csv

make_synthetic_lesion = load_script("make_synthetic_lesion")


def binary_folder(root, rows, size=(24, 32), mask_value=255, seed=0):
    """16-bit grayscale images, ``train.csv`` and masks holding 0 and ``mask_value`` (lesion)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    gen = np.random.default_rng(seed)
    masks = {}
    for name, labels in rows:
        Image.fromarray(gen.integers(1000, 50000, size=size, dtype=np.uint16)).save(
            root / "images" / name
        )
        mask = np.zeros(size, np.uint8)
        if labels:
            mask[4:12, 6:20] = mask_value
        write_label_png(root / "masks" / f"{Path(name).stem}.png", mask)
        masks[name] = mask
    write_csv(root / "train.csv", rows)
    return masks


BINARY_ROWS = [("p1.png", "polyp"), ("n1.png", ""), ("p2.png", "polyp"), ("n2.png", "")]


# -- binary data sets with negatives, one finding


def test_binary_csv_with_negatives_passes_data_check_and_loads_all_zero_labels(tmp_path, capsys):
    root = tmp_path / "polyps"
    binary_folder(root, BINARY_ROWS, mask_value=1)
    write_csv(root / "val.csv", [("p2.png", "polyp"), ("n2.png", "")])
    assert (
        main(
            [
                "data-check",
                "configs/medical.yaml",
                f"data.root={root}",
                "data.mask_dir=masks",
                "data.image_size=null",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "negatives (no finding): 2" in out
        and "images per class: polyp 2" in out
        and "problem(s)" not in out
    )

    data = build_source(
        load_config(
            "configs/medical.yaml",
            [f"data.root={root}", "data.mask_dir=masks", "data.image_size=null"],
        ),
        "train",
    )
    assert data.class_names == ["polyp"] and data.num_classes == 2  # one foreground class
    labels = [data[i]["labels"].tolist() for i in range(4)]
    assert labels == [[1.0], [0.0], [1.0], [0.0]]
    batch = pad_collate([data[i] for i in range(4)])
    assert batch["labels"].shape == (4, 1) and batch["mask"].shape == (4, 24, 32)
    assert (
        int(batch["mask"][1].max()) == 0 and int(batch["mask"][0].max()) == 1
    )  # negative: all background


def test_several_findings_per_image(tmp_path):
    (tmp_path / "images").mkdir()
    rows = [("a.png", "nodule;effusion;mass"), ("b.png", "mass"), ("c.png", "")]
    for name, _ in rows:
        Image.fromarray(np.full((8, 8), 400, np.uint16)).save(tmp_path / "images" / name)
    write_csv(tmp_path / "train.csv", rows)
    data = FolderDataset(tmp_path, "train", channels=1)
    assert data.class_names == ["effusion", "mass", "nodule"]
    assert [data.load_raw(i).labels.tolist() for i in range(3)] == [[1, 1, 1], [0, 1, 0], [0, 0, 0]]
    report = check_source(data)
    assert (
        report.ok
        and report.per_class == {"effusion": 1, "mass": 2, "nodule": 1}
        and report.negatives == 1
    )


def test_synthetic_lesion_negatives_are_counted_not_problems():
    """Unlike VOC, where an image without any class is a problem (test_data_check.py)."""
    report = check_source(
        SyntheticLesion("train", num_images=12, image_size=32, negative_fraction=0.5)
    )
    assert (
        report.ok
        and 0 < report.negatives < 12
        and report.negatives + report.per_class["lesion"] == 12
    )


# -- mask conventions


def test_masks_of_only_0_and_255_warn_naming_the_file_and_the_fix(tmp_path, capsys):
    root = tmp_path / "kvasir"
    binary_folder(root, BINARY_ROWS)
    write_csv(root / "val.csv", BINARY_ROWS)
    report = check_source(FolderDataset(root, "train", mask_dir="masks", channels=1))
    assert report.ok and len(report.warnings) == 1  # a warning, not a failure
    warning = report.warnings[0]
    assert str(root / "masks" / "p1.png") in warning and "2 mask(s)" in warning
    assert "255 means ignore" in warning and "data.mask_values='{0: 0, 255: 1}'" in warning
    assert (
        main(["data-check", "configs/medical.yaml", f"data.root={root}", "data.mask_dir=masks"])
        == 0
    )
    assert "warning: 2 mask(s) hold only the values 0 and 255" in capsys.readouterr().out


def test_a_run_warns_once_per_data_set_about_0_255_masks(tmp_path):
    import warnings

    from wsss.data.imageio import MaskConventionWarning

    binary_folder(tmp_path, BINARY_ROWS)
    data = FolderDataset(tmp_path, "train", mask_dir="masks", channels=1)
    with pytest.warns(MaskConventionWarning, match="data.mask_values") as caught:
        for i in range(4):
            data.load_raw(i)
    assert len(caught) == 1 and str(tmp_path / "masks" / "p1.png") in str(caught[0].message)
    mapped = FolderDataset(
        tmp_path, "train", mask_dir="masks", channels=1, mask_values={0: 0, 255: 1}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaskConventionWarning)
        mapped.load_raw(0)
        check_source(
            FolderDataset(tmp_path, "train", mask_dir="masks", channels=1)
        )  # reports, no warning


def test_mask_values_map_file_values_to_classes(tmp_path, capsys):
    root = tmp_path / "kvasir"
    masks = binary_folder(root, BINARY_ROWS)
    write_csv(root / "val.csv", BINARY_ROWS)
    data = FolderDataset(root, "train", mask_dir="masks", mask_values={0: 0, 255: 1}, channels=1)
    for i, (name, _) in enumerate(BINARY_ROWS):
        assert np.array_equal(data.load_raw(i).mask, (masks[name] == 255).astype(np.uint8))
    report = check_source(data)
    assert report.ok and report.warnings == []
    # through the config, as a user writes it on the command line
    assert (
        main(
            [
                "data-check",
                "configs/medical.yaml",
                f"data.root={root}",
                "data.mask_dir=masks",
                "data.mask_values={0: 0, 255: 1}",
            ]
        )
        == 0
    )
    assert "warning" not in capsys.readouterr().out

    # a value the mapping leaves out (an anti-aliased edge) names the file and the value
    mask = masks["p2.png"].copy()
    mask[4, 6] = 128
    write_label_png(root / "masks" / "p2.png", mask)
    with pytest.raises(DataError) as err:
        data.load_raw(2)
    assert str(root / "masks" / "p2.png") in str(err.value) and "[128]" in str(err.value)
    # a mapped class outside the data set's classes is out of range, as an unmapped one would be
    with pytest.raises(DataError, match=r"mask holds value\(s\) \[2\]"):
        FolderDataset(
            root, "train", mask_dir="masks", mask_values={0: 0, 255: 2, 128: 1}, channels=1
        ).load_raw(0)


def test_mask_values_config_key_is_typed_and_checked(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "data:\n  name: folder\n  root: /x\n  mask_values: {0: 0, 255: 1, 128: 255}\n"
    )
    assert load_config(config).data.mask_values == {0: 0, 255: 1, 128: 255}
    assert load_config(
        None, ["data.name=folder", "data.root=/x", "data.mask_values={'0': 0, '255': 1}"]
    ).data.mask_values == {0: 0, 255: 1}
    assert load_config(None).data.mask_values is None  # identity by default
    for value, fragment in [
        ("{0:0,255:1}", "a space after each colon"),
        ("[0, 255]", "mapping of int to int"),
        ("{0: 0, 300: 1}", "0..255"),
        ("{0: zero}", "data.mask_values[0]: expected an integer"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(None, ["data.name=folder", "data.root=/x", f"data.mask_values={value}"])
        assert fragment in str(err.value) and "data.mask_values" in str(err.value)


# -- class names


def test_label_differing_only_in_case_names_the_row_and_suggests_the_class(tmp_path):
    root = tmp_path
    binary_folder(root, BINARY_ROWS)
    write_csv(root / "val.csv", [("p1.png", "polyp"), ("p2.png", "Polyp")])
    with pytest.raises(DataError) as err:
        FolderDataset(root, "train")  # the typo is in val.csv: every split's CSV is checked
    text = str(err.value)
    assert f"{root / 'val.csv'}, row 3: label 'Polyp'" in text and "class 'polyp'" in text
    assert "case or spacing" in text and "write 'polyp'" in text


def test_label_differing_only_in_spacing_from_given_class_names(tmp_path):
    binary_folder(tmp_path, [("a.png", "ground glass"), ("b.png", "ground  glass"), ("c.png", "")])
    with pytest.raises(DataError) as err:
        FolderDataset(tmp_path, "train", class_names=["ground glass"])
    text = str(err.value)
    assert (
        f"{tmp_path / 'train.csv'}, row 3: label 'ground  glass'" in text
        and "write 'ground glass'" in text
    )
    with pytest.raises(DataError, match="differ only in case or spacing"):
        FolderDataset(tmp_path, "train", class_names=["Nodule", "nodule"])


# -- bit depths and intensity handling


def mixed_depth_folder(root):
    (root / "images").mkdir(parents=True)
    deep = np.linspace(0, 40000, 12 * 16).reshape(12, 16).astype(np.uint16)
    shallow = np.linspace(10, 200, 12 * 16).reshape(12, 16).astype(np.uint8)
    Image.fromarray(deep).save(root / "images" / "deep.png")
    Image.fromarray(shallow).save(root / "images" / "shallow.png")
    write_csv(root / "train.csv", [("deep.png", "x"), ("shallow.png", "x")])
    return deep, shallow


def test_mixed_bit_depths_are_an_error_naming_a_file_of_each_depth(tmp_path):
    mixed_depth_folder(tmp_path)
    assert read_image_file(tmp_path / "images" / "deep.png")[1] == 16
    assert read_image_file(tmp_path / "images" / "shallow.png")[1] == 8
    data = FolderDataset(tmp_path, "train", channels=1)
    with pytest.raises(DataError) as err:
        data.stats
    text = str(err.value)
    assert (
        str(tmp_path / "images" / "shallow.png") in text
        and str(tmp_path / "images" / "deep.png") in text
    )
    assert "8-bit" in text and "16-bit" in text and "data.intensity=minmax" in text
    # caught in any process: the reference is the split's first image, even if loaded out of order
    fresh = FolderDataset(tmp_path, "train", channels=1, mean=[0.0], std=[1.0])
    with pytest.raises(DataError, match="deep.png"):
        fresh.load(1)
    report = check_source(FolderDataset(tmp_path, "train", channels=1))
    assert report.total_problems == 1 and "shallow.png: 8-bit image" in report.problems[0]
    window = FolderDataset(
        tmp_path, "train", channels=1, intensity="window", window=[0, 255], mean=[0.0], std=[1.0]
    )
    with pytest.raises(DataError, match="8-bit image"):
        window.load(1)


def test_per_image_minmax_accepts_mixed_depths_and_scales_each_image(tmp_path):
    deep, shallow = mixed_depth_folder(tmp_path)
    data = FolderDataset(tmp_path, "train", channels=1, intensity="minmax")
    for i, raw in enumerate((deep, shallow)):
        expected = (raw.astype(np.float64) - raw.min()) / (raw.max() - raw.min())
        assert np.allclose(data.load(i).image[:, :, 0], expected, atol=1e-6)
    mean, std = data.stats
    both = np.stack(
        [(a - a.min()) / (a.max() - a.min()) for a in (deep.astype(float), shallow.astype(float))]
    )
    assert mean[0] == pytest.approx(both.mean(), rel=1e-6) and std[0] == pytest.approx(
        both.std(), rel=1e-6
    )
    assert check_source(data).ok


def test_fixed_window_clips_and_scales_raw_units(tmp_path):
    deep, _ = mixed_depth_folder(tmp_path)
    write_csv(tmp_path / "train.csv", [("deep.png", "x")])
    data = FolderDataset(
        tmp_path, "train", channels=1, intensity="window", window=[10000.0, 30000.0]
    )
    expected = np.clip((deep.astype(np.float64) - 10000) / 20000, 0, 1)
    assert np.allclose(data.load(0).image[:, :, 0], expected, atol=1e-6)
    assert (expected == 0).any() and (expected == 1).any()  # both ends clipped


def test_intensity_config_checks():
    from wsss import config
    from wsss.data import intensity

    assert (
        config.INTENSITY_MODES == intensity.INTENSITY_MODES
    )  # the config's choices are the implemented modes
    cfg = load_config(
        "configs/medical.yaml", ["data.root=/x", "data.intensity=window", "data.window=[-160, 240]"]
    )
    assert cfg.data.window == [-160.0, 240.0]
    for overrides, fragment in [
        (["data.intensity=window"], "needs data.window=[low, high]"),
        (["data.intensity=window", "data.window=[5, 1]"], "low < high"),
        (["data.window=[0, 1]"], "only used with data.intensity=window"),
        (["data.intensity=gamma"], "choose one of: dataset, minmax, window"),
    ]:
        with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            load_config("configs/medical.yaml", ["data.root=/x", *overrides])
    with pytest.raises(ConfigError, match="8-bit RGB"):
        load_config("configs/default.yaml", ["data.intensity=minmax"])
    with pytest.raises(ConfigError, match="set data.name=folder"):
        load_config("configs/medical.yaml", ["data.root=/x", "data.name=synthetic_lesion"])


# -- DICOM


def write_dicom(path, pixels, slope=None, intercept=None, syntax=None, pixel_bytes=None):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if pixel_bytes is None:
        ds.PixelData = pixels.tobytes()
    else:
        ds.PixelData = pixel_bytes
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)


def test_dicom_is_read_with_its_rescale_applied_and_16_bit_kept(tmp_path):
    (tmp_path / "images").mkdir()
    stored = (np.arange(10 * 12, dtype=np.int16).reshape(10, 12) * 7 - 300).astype(np.int16)
    write_dicom(tmp_path / "images" / "ct.dcm", stored, slope=2, intercept=-1024)
    image, bits = read_image_file(tmp_path / "images" / "ct.dcm")
    assert bits == 16 and image.dtype == np.float32 and image.shape == (10, 12, 1)
    assert np.array_equal(image[:, :, 0], stored.astype(np.float32) * 2 - 1024)  # Hounsfield units
    wide = np.linspace(0, 65000, 10 * 12).reshape(10, 12).astype(np.uint16)
    write_dicom(tmp_path / "images" / "xray.dcm", wide)  # no rescale tags: the stored values
    assert np.array_equal(
        read_image_file(tmp_path / "images" / "xray.dcm")[0][:, :, 0], wide.astype(np.float32)
    )
    write_csv(tmp_path / "train.csv", [("ct.dcm", "bleed"), ("xray.dcm", "")])
    data = FolderDataset(tmp_path, "train", channels=1, intensity="window", window=[-1000, 0])
    expected = np.clip((stored.astype(np.float64) * 2 - 1024 + 1000) / 1000, 0, 1)
    assert np.allclose(data.load(0).image[:, :, 0], expected, atol=1e-6) and data.ids == [
        "ct",
        "xray",
    ]


def test_compressed_dicom_without_a_decoder_names_the_file_and_the_fix(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    path = tmp_path / "scan.dcm"
    write_dicom(
        path,
        np.zeros((4, 4), np.uint16),
        syntax=JPEGLSLossless,
        pixel_bytes=encapsulate([b"\xff\xd8 not decodable here \xff\xd9"]),
    )
    with pytest.raises(DataError) as err:
        read_image_file(path)
    text = str(err.value)
    assert text.startswith(f"{path}: DICOM pixel data is compressed (JPEG-LS Lossless")
    assert "install" in text and "gdcmconv --raw" in text
    (tmp_path / "broken.dcm").write_bytes(b"DICM? no")
    with pytest.raises(DataError, match=r"broken\.dcm: cannot read DICOM"):
        read_image_file(tmp_path / "broken.dcm")


# -- working size and original size


def test_image_size_sets_the_long_side_and_orig_size_is_recorded(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    image = np.random.default_rng(0).integers(0, 60000, size=(60, 90), dtype=np.uint16)
    mask = np.zeros((60, 90), np.uint8)
    mask[10:30, 20:50] = 1  # 2-pixel aligned: survives a 2x nearest round trip
    mask[40:44, 60:62] = 255
    Image.fromarray(image).save(tmp_path / "images" / "wide.png")
    Image.fromarray(image[:40, :30]).save(tmp_path / "images" / "small.png")
    write_label_png(tmp_path / "masks" / "wide.png", mask)
    write_label_png(tmp_path / "masks" / "small.png", mask[:40, :30])
    write_csv(tmp_path / "train.csv", [("wide.png", "x"), ("small.png", "x")])
    data = FolderDataset(
        tmp_path, "train", mask_dir="masks", channels=1, long_side=45, mean=[0.0], std=[1.0]
    )
    item = data[0]
    assert item["image"].shape == (1, 30, 45) and item["mask"].shape == (30, 45)
    assert item["orig_size"].tolist() == [60, 90]
    blocks = image.astype(np.float64).reshape(30, 2, 45, 2).mean(axis=(1, 3))  # area averaging
    assert np.allclose(item["image"][0].numpy(), blocks, rtol=1e-5)
    assert np.array_equal(item["mask"].numpy(), mask[::2, ::2])
    assert np.array_equal(
        restore_size(item["mask"].numpy().astype(np.uint8), item["orig_size"]), mask
    )
    small = data[1]  # 40x30 grows to a long side of 45
    assert small["image"].shape == (1, 45, 34) and small["orig_size"].tolist() == [40, 30]
    batch = pad_collate([item, small])
    assert batch["orig_size"].tolist() == [[60, 90], [40, 30]] and batch["size"].tolist() == [
        [30, 45],
        [45, 34],
    ]
    assert check_source(data).min_hw == (40, 30)  # data-check reports the files' sizes

    # pseudo-masks are written at the original size and follow the image to the working size
    pseudo = tmp_path / "pseudo"
    write_label_png(pseudo / "wide.png", mask)
    data.use_masks_from(pseudo)
    assert np.array_equal(data.load(0).mask, mask[::2, ::2])
    write_label_png(pseudo / "wide.png", mask[::2, ::2])  # at the working size: the wrong size
    with pytest.raises(DataError, match="differs from its image 90x60"):
        data.load(0)


def test_restore_size_nearest_for_labels_and_bilinear_for_scores():
    labels = torch.tensor([[0, 1], [2, 255]], dtype=torch.uint8)
    restored = restore_size(labels, (4, 4))
    assert restored.dtype == torch.uint8 and restored.tolist() == [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 255, 255],
        [2, 2, 255, 255],
    ]
    scores = np.random.default_rng(1).random((2, 5, 7)).astype(np.float32)
    up = restore_size(scores, (13, 17))
    assert up.shape == (2, 13, 17) and up.dtype == np.float32
    for c in range(2):  # OpenCV's bilinear resize is the same half-pixel-centre interpolation
        assert np.allclose(
            up[c], cv2.resize(scores[c], (17, 13), interpolation=cv2.INTER_LINEAR), atol=1e-5
        )
    same = torch.zeros(3, 6, 6)
    assert restore_size(same, torch.tensor([6, 6])) is same
    batch = restore_size(torch.ones(2, 3, 4, 4, dtype=torch.float64), (2, 2))
    assert batch.shape == (2, 3, 2, 2) and batch.dtype == torch.float64 and bool((batch == 1).all())


# -- nothing written into the data folder


def snapshot(root):
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def test_read_only_data_folder_is_never_written(tmp_path, capsys):
    """chmod -R a-w on a copy; as root the permissions do not stop writes, so the check is that
    the folder's listing, sizes and modification times are unchanged."""
    root = tmp_path / "readonly"
    binary_folder(root, BINARY_ROWS)
    write_csv(root / "val.csv", BINARY_ROWS[:2])
    before = snapshot(root)
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        overrides = [
            f"data.root={root}",
            "data.mask_dir=masks",
            "data.mask_values={0: 0, 255: 1}",
            "data.image_size=16",
            "data.crop_size=16",
            "data.batch_size=2",
            "data.num_workers=0",
        ]
        assert main(["data-check", "configs/medical.yaml", *overrides]) == 0
        from wsss.data.datamodule import StageDataModule

        module = StageDataModule(load_config("configs/medical.yaml", overrides), "segmenter")
        batch = next(iter(module.train_dataloader()))
        assert batch["image"].shape == (2, 1, 16, 16) and module.mean[0] > 1000
        next(iter(module.val_dataloader()))
        assert snapshot(root) == before
    finally:
        for path in [root, *root.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    cache = (
        module.train_set.stats_cache_path()
    )  # the statistics went to the cache directory instead
    assert cache.is_file() and Path(os.environ["WSSS_CACHE_DIR"]) in cache.parents


# -- the built-in synthetic lesion source and its folder export


def test_synthetic_lesion_is_16_bit_deterministic_with_negatives_and_labels_from_masks():
    data = SyntheticLesion("train", num_images=16, image_size=48, seed=3, negative_fraction=0.4)
    again = SyntheticLesion("train", num_images=16, image_size=48, seed=3, negative_fraction=0.4)
    negatives = 0
    for i in range(16):
        raw, other = data.load_raw(i), again.load_raw(i)
        assert np.array_equal(raw.image, other.image) and np.array_equal(raw.mask, other.mask)
        assert raw.image.shape == (48, 48, 1) and np.array_equal(raw.image, np.round(raw.image))
        assert raw.image.max() > 255 and raw.image.min() >= 0 and raw.image.max() <= 65535
        assert raw.labels.tolist() == [float((raw.mask == 1).any())]
        negatives += int(raw.labels.sum() == 0)
    assert 0 < negatives < 16
    assert data.class_names == ["lesion"]
    assert not any(
        SyntheticLesion("train", 8, 32, negative_fraction=0.0).load_raw(i).labels.sum() == 0
        for i in range(8)
    )
    two = SyntheticLesion("train", num_images=24, image_size=48, findings=2)
    labels = np.stack([two.load_raw(i).labels for i in range(24)])
    assert two.class_names == ["lesion", "calcification"]
    assert (
        labels[:, 0].any() and labels[:, 1].any() and (labels.sum(1) == 2).any()
    )  # multi-finding images
    cfg = load_config(
        "configs/medical.yaml",
        [
            "data.name=synthetic_lesion",
            "data.num_train=5",
            "data.image_size=null",
            "data.findings=2",
        ],
    )
    source = build_source(cfg, "train")
    assert isinstance(source, SyntheticLesion) and len(source) == 5 and source.image_size == 128
    assert source.class_names == ["lesion", "calcification"]


@pytest.mark.parametrize("jitter", [0.0, 0.25])
def test_png16_tiff_and_dicom_copies_load_to_the_same_arrays(tmp_path, jitter):
    loaded = {}
    for fmt in ("png16", "tiff", "dcm"):
        root = tmp_path / fmt
        make_synthetic_lesion.main(
            [
                "--out",
                str(root),
                "--format",
                fmt,
                "--num-train",
                "4",
                "--num-val",
                "1",
                "--size",
                "40",
                "--size-jitter",
                str(jitter),
                "--seed",
                "5",
                "--negative-fraction",
                "0.25",
            ]
        )
        assert (
            sorted(p.suffix for p in (root / "images").iterdir())
            == [make_synthetic_lesion.SUFFIXES[fmt]] * 5
        )
        data = FolderDataset(root, "train", mask_dir="masks", channels=1)
        loaded[fmt] = [data.load_raw(i) for i in range(4)]
    for a, b, c in zip(loaded["png16"], loaded["tiff"], loaded["dcm"]):
        assert a.image.max() > 255  # really 16-bit
        assert np.array_equal(a.image, b.image) and np.array_equal(a.image, c.image)
        assert np.array_equal(a.mask, b.mask) and np.array_equal(a.mask, c.mask)
        assert np.array_equal(a.labels, b.labels) and np.array_equal(a.labels, c.labels)
    builtin = SyntheticLesion("train", num_images=4, image_size=40, seed=5, negative_fraction=0.25)
    sizes = {raw.image.shape for raw in loaded["png16"]}
    if jitter == 0:  # the folder copy holds exactly the built-in images
        for i, raw in enumerate(loaded["png16"]):
            assert np.array_equal(raw.image, builtin.load_raw(i).image)
            assert np.array_equal(raw.mask, builtin.load_raw(i).mask)
    else:
        assert len(sizes) > 1


def test_export_with_0_255_masks_needs_mask_values(tmp_path):
    make_synthetic_lesion.main(
        [
            "--out",
            str(tmp_path),
            "--format",
            "png16",
            "--num-train",
            "6",
            "--num-val",
            "1",
            "--size",
            "32",
            "--masks",
            "binary255",
            "--negative-fraction",
            "0.5",
        ]
    )
    plain = check_source(FolderDataset(tmp_path, "train", mask_dir="masks", channels=1))
    assert plain.ok and len(plain.warnings) == 1
    mapped = FolderDataset(
        tmp_path, "train", mask_dir="masks", channels=1, mask_values={0: 0, 255: 1}
    )
    builtin = SyntheticLesion("train", num_images=6, image_size=32, negative_fraction=0.5)
    for i in range(6):
        assert np.array_equal(mapped.load_raw(i).mask, builtin.load_raw(i).mask)
        assert np.array_equal(
            mapped.load_raw(i).labels, builtin.load_raw(i).labels
        )  # the CSV agrees
    report = check_source(mapped)
    assert report.warnings == [] and report.negatives == check_source(builtin).negatives > 0


@pytest.mark.parametrize("config", ["configs/medical.yaml", "configs/medical_demo.yaml"])
def test_medical_configs_are_cpu_safe(config):
    """No mixed precision or 8 workers by default (they failed or warned on a CPU-only machine)."""
    cfg = load_config(config, [] if "demo" in config else ["data.root=/data/set"])
    assert (
        cfg.trainer.precision == "32-true" and cfg.data.num_workers <= 2 and cfg.data.channels == 1
    )
    assert cfg.data.image_size is not None
    if "demo" in config:  # the script's 0/255 masks, mapped
        assert cfg.data.mask_values == {0: 0, 255: 1} and cfg.data.mask_dir == "masks"
    else:  # without a data set
        assert load_config(config, ["data.name=synthetic_lesion"]).data.root is None
