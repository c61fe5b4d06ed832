"""scripts/prepare_voc.py: train_aug = (train + SBD/aug ids) - val, sorted; what is missing is
explained with where users usually get it; exit status 1 when the set-up is incomplete."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_script

prepare_voc = load_script("prepare_voc")
SCRIPT = Path(prepare_voc.__file__)

SPLITS = Path("ImageSets") / "Segmentation"


def ids_of(path):
    return path.read_text().split()


@pytest.fixture
def root(voc_copy):
    """A copy of voc_mini without train_aug.txt."""
    (voc_copy / SPLITS / "train_aug.txt").unlink()
    return voc_copy


def run(root, sbd=None):
    lines = []
    code = prepare_voc.prepare(root, sbd, echo=lines.append)
    return code, "\n".join(lines)


def test_writes_train_aug_as_union_minus_val(root):
    # SegmentationClassAug holds the 4 train ids and the 14 val ids; an extra SBD-only id is added
    extra = "2008_000123"
    shutil.copy(
        root / "SegmentationClassAug" / "2011_000003.png",
        root / "SegmentationClassAug" / f"{extra}.png",
    )
    shutil.copy(root / "JPEGImages" / "2011_000003.jpg", root / "JPEGImages" / f"{extra}.jpg")
    code, text = run(root)
    assert code == 0
    target = root / SPLITS / "train_aug.txt"
    ids = ids_of(target)
    train = set(ids_of(root / SPLITS / "train.txt"))
    val = set(ids_of(root / SPLITS / "val.txt"))
    aug = {p.stem for p in (root / "SegmentationClassAug").glob("*.png")}
    assert ids == sorted((train | aug) - val) == sorted(train | {extra})
    assert target.read_text().endswith("\n") and len(target.read_text().splitlines()) == 5
    assert "5 ids" in text and "10,582" in text and "ready" in text
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []  # atomic write


def test_existing_train_aug_is_left_alone(root):
    (root / SPLITS / "train_aug.txt").write_text("2011_000003\n")
    code, text = run(root)
    assert code == 0 and ids_of(root / SPLITS / "train_aug.txt") == ["2011_000003"]
    assert "exists: 1 ids" in text and "10,582" in text


def test_sbd_lists_are_used_when_given(root, tmp_path):
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    sbd.mkdir(parents=True)
    (sbd / "train.txt").write_text("2011_000003\n2007_000033\n")  # 2007_000033 is a val id: dropped
    (sbd / "val.txt").write_text("2011_003066\n")
    train = sorted(ids_of(root / SPLITS / "train.txt"))
    assert prepare_voc.build_train_aug(root, sbd) == train
    assert (
        prepare_voc.build_train_aug(root, sbd.parent) == train
    )  # benchmark_RELEASE/ is understood too
    code, text = run(root, sbd)
    assert code == 0 and ids_of(root / SPLITS / "train_aug.txt") == train and "SBD lists" in text


def test_sbd_folder_without_lists_is_explained(root, tmp_path):
    code, text = run(root, tmp_path / "empty")
    assert code == 1 and "train.txt" in text and "--sbd" in text
    assert not (root / SPLITS / "train_aug.txt").exists()


def test_missing_aug_masks_are_explained(root):
    shutil.rmtree(root / "SegmentationClassAug")
    code, text = run(root)
    assert code == 1
    assert f"{root / 'SegmentationClassAug'} is missing" in text
    assert "SegmentationClassAug.zip" in text and "DeepLab" in text and "IRN" in text
    assert not (root / SPLITS / "train_aug.txt").exists()


def test_misplaced_aug_folder_is_pointed_out(root):
    shutil.move(root / "SegmentationClassAug", root.parent / "SegmentationClassAug")
    code, text = run(root)
    assert code == 1 and f"found one at {root.parent / 'SegmentationClassAug'}" in text


def test_every_missing_voc_part_is_listed_with_its_source(root):
    shutil.rmtree(root / "JPEGImages")
    (root / SPLITS / "val.txt").unlink()
    code, text = run(root)
    assert code == 1
    assert (
        f"{root / 'JPEGImages'} is missing" in text
        and f"{root / SPLITS / 'val.txt'} is missing" in text
    )
    assert "VOCtrainval_11-May-2012.tar" in text


def test_wrong_root_is_explained(root, tmp_path):
    code, text = run(tmp_path / "nowhere")
    assert code == 1 and "does not exist" in text
    code, text = run(root.parent)  # VOCdevkit instead of VOCdevkit/VOC2012
    assert code == 1 and f"--root {root}" in text


def test_ids_without_masks_or_images_fail(root):
    (root / SPLITS / "train_aug.txt").write_text("2011_000003\n2099_000001\n")
    code, text = run(root)
    assert code == 1
    assert "1 of 2 train_aug id(s) have no .jpg file" in text and "2099_000001" in text
    assert "1 of 2 train_aug id(s) have no .png file" in text


def test_command_line_exit_codes(root, tmp_path):
    ok = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root)], capture_output=True, text=True
    )
    assert (
        ok.returncode == 0 and "wrote" in ok.stdout and (root / SPLITS / "train_aug.txt").is_file()
    )
    bad = subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "does not exist" in bad.stdout
