"""data-check: `check_source` names every bad file and counts them; `wsss data-check` exits 1 on
a damaged copy of voc_mini and passes the clean one."""

import shutil

import numpy as np
import pytest
from PIL import Image

from wsss.cli import main
from wsss.data.check import check_source, format_report
from wsss.data.folder import FolderDataset
from wsss.data.masks import write_label_png
from wsss.data.synthetic import SyntheticSegmentation
from wsss.data.voc import VOCSegmentation

from conftest import save_palette_png


def voc_args(root):
    return [
        "data-check",
        "configs/voc.yaml",
        f"data.root={root}",
        "data.train_split=train_aug",
        "data.val_split=val",
    ]


@pytest.fixture
def damaged(voc_copy):
    """A copy of voc_mini with four bad val files; returns (root, {kind: bad path})."""
    root = voc_copy
    bad = {
        "truncated": root / "JPEGImages" / "2007_000033.jpg",
        "missing": root / "SegmentationClass" / "2007_000332.png",
        "resized": root / "SegmentationClass" / "2007_000676.png",
        "value": root / "SegmentationClass" / "2010_001448.png",
    }
    bad["truncated"].write_bytes(bad["truncated"].read_bytes()[:2000])
    bad["missing"].unlink()
    mask = np.array(Image.open(bad["resized"]))
    save_palette_png(
        bad["resized"], np.array(Image.fromarray(mask).resize((100, 100), Image.NEAREST))
    )
    mask = np.array(Image.open(bad["value"]))
    mask[0, 0] = 50  # outside 0..20 and not 255
    save_palette_png(bad["value"], mask)
    return root, bad


def test_clean_voc_mini_has_no_problem_and_the_right_counts(voc_root):
    report = check_source(VOCSegmentation(voc_root, "val"))
    assert report.ok and report.total_problems == 0 and report.problems == []
    assert report.num_images == 14 and report.has_masks
    assert report.min_hw == report.max_hw == (513, 513)
    assert report.per_class["aeroplane"] == 4 and report.per_class["bird"] == 2
    assert report.per_class["person"] == 2 and report.per_class["tvmonitor"] == 0
    assert list(report.per_class) == VOCSegmentation(voc_root, "val").class_names
    train = check_source(VOCSegmentation(voc_root, "train_aug"))
    assert train.ok and train.num_images == 4 and train.per_class["person"] == 3
    assert train.min_hw == (338, 500) and train.max_hw == (375, 500)


def test_damaged_copy_names_every_bad_file(damaged):
    root, bad = damaged
    report = check_source(VOCSegmentation(root, "val"))
    assert report.total_problems == 4 and len(report.problems) == 4 and not report.ok
    text = "\n".join(report.problems)
    assert f"{bad['truncated']}: cannot read image" in text
    assert f"{bad['missing']}: mask file is missing" in text
    assert f"{bad['resized']}: mask size 100x100 differs from its image 513x513" in text
    assert f"{bad['value']}: mask holds value(s) [50]" in text
    assert report.num_images == 14 and report.min_hw == (
        513,
        513,
    )  # the good items are still counted
    assert check_source(VOCSegmentation(root, "train")).ok  # other splits are untouched


def test_image_without_labels_is_a_problem(voc_copy):
    root = voc_copy
    path = root / "SegmentationClass" / "2009_004867.png"
    mask = np.array(Image.open(path))
    mask[(mask != 0) & (mask != 255)] = 0
    save_palette_png(path, mask)
    report = check_source(VOCSegmentation(root, "val"))
    assert report.total_problems == 1
    assert str(path) in report.problems[0] and "has no labels" in report.problems[0]


def test_split_without_masks_is_not_blamed_for_missing_labels(voc_copy):
    root = voc_copy
    shutil.copy(root / "JPEGImages" / "2011_000003.jpg", root / "JPEGImages" / "2012_900001.jpg")
    (root / "ImageSets" / "Segmentation" / "test.txt").write_text("2012_900001\n")
    report = check_source(VOCSegmentation(root, "test"))
    assert report.ok and not report.has_masks and report.num_images == 1
    assert "(no masks)" in format_report(report, "test")


def test_problem_list_is_capped_but_the_total_counts_all(damaged):
    root, _ = damaged
    report = check_source(VOCSegmentation(root, "val"), max_listed=2)
    assert report.total_problems == 4 and len(report.problems) == 2
    text = format_report(report, "val")
    assert "4 problem(s)" in text and "... and 2 more" in text


def test_format_report_shows_counts_sizes_and_problems(voc_root, damaged):
    clean = format_report(check_source(VOCSegmentation(voc_root, "train_aug")), "train_aug")
    assert clean.splitlines()[0] == "split train_aug: 4 images"
    assert "image size: 500x338 to 500x375 (WxH)" in clean
    assert "person 3" in clean and "bottle 2" in clean and "no problems found" in clean
    root, bad = damaged
    text = format_report(check_source(VOCSegmentation(root, "val")), "val")
    assert "split val: 14 images" in text and "4 problem(s):" in text
    assert all(str(path) in text for path in bad.values())


def test_folder_source_reports_missing_images_and_counts_negatives(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((20, 30), 1000, np.uint16)).save(tmp_path / "images" / name)
    (tmp_path / "train.csv").write_text("image,labels\na.png,nodule\nb.png,\ngone.png,nodule\n")
    report = check_source(FolderDataset(tmp_path, "train", channels=1, mean=[0.0], std=[1.0]))
    # b.png has an empty labels cell: a negative image, counted, not a problem
    assert (
        report.total_problems == 1 and report.num_images == 3 and report.per_class == {"nodule": 1}
    )
    assert report.negatives == 1
    assert report.problems == [f"{tmp_path / 'images' / 'gone.png'}: image file is missing"]
    assert report.min_hw == report.max_hw == (20, 30)
    assert "negatives (no finding): 1" in format_report(report, "train")


def test_synthetic_source_is_clean():
    report = check_source(SyntheticSegmentation("train", num_images=3, image_size=32, seed=0))
    assert report.ok and report.num_images == 3 and sum(report.per_class.values()) >= 3


def test_override_masks_are_checked_too(voc_root, tmp_path):
    data = VOCSegmentation(voc_root, "train")
    for sample_id in data.ids:
        write_label_png(tmp_path / f"{sample_id}.png", np.zeros((2, 2), np.uint8))  # wrong size
    data.use_masks_from(tmp_path)
    report = check_source(data)
    assert report.total_problems == 4 and all(
        "differs from its image" in p for p in report.problems
    )


# -- the `wsss data-check` command


def test_cli_clean_voc_mini_passes_with_counts(voc_root, capsys):
    assert main(voc_args(voc_root)) == 0
    out = capsys.readouterr().out
    assert "split train_aug: 4 images" in out and "split val: 14 images" in out
    assert "person 3" in out and "513x513 to 513x513" in out and "no problems found" in out


def test_cli_damaged_copy_exits_1_naming_every_bad_file(damaged, capsys):
    root, bad = damaged
    assert main(voc_args(root)) == 1
    text = capsys.readouterr().out
    assert "4 problem(s)" in text
    assert "2007_000033.jpg: cannot read image" in text
    assert "2007_000332.png: mask file is missing" in text
    assert "2007_000676.png: mask size 100x100 differs from its image 513x513" in text
    assert "2010_001448.png: mask holds value(s) [50]" in text


def test_cli_problem_list_is_capped_with_the_total(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    rows = ["image,labels"] + [f"missing_{i}.png,a" for i in range(25)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    shutil.copy(tmp_path / "train.csv", tmp_path / "val.csv")
    code = main(
        [
            "data-check",
            "configs/medical.yaml",
            f"data.root={tmp_path}",
            "data.mean=[0.0]",
            "data.std=[1.0]",
        ]
    )
    text = capsys.readouterr().out
    assert code == 1 and "25 problem(s)" in text and "... and 5 more" in text
    assert "missing_0.png: image file is missing" in text
