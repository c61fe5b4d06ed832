"""scripts/prepare_voc.py: train_aug = (train + aug ids) - val; what is missing is explained."""

import importlib.util
import shutil
from pathlib import Path

spec = importlib.util.spec_from_file_location("prepare_voc", Path(__file__).parents[1] / "scripts" / "prepare_voc.py")
prepare_voc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prepare_voc)


def copy(voc_root, tmp_path):
    root = tmp_path / "VOC2012"
    shutil.copytree(voc_root, root)
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").unlink()
    return root


def test_writes_train_aug_as_union_minus_val(voc_root, tmp_path):
    root = copy(voc_root, tmp_path)
    lines = []
    assert prepare_voc.prepare(root, echo=lines.append) == 0
    ids = (root / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split()
    train = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val = set((root / "ImageSets" / "Segmentation" / "val.txt").read_text().split())
    # SegmentationClassAug holds train and val ids here: val ones must be dropped
    assert sorted(ids) == sorted(train) and not set(ids) & val
    assert any("4 ids" in line and "10582" in line for line in lines)


def test_sbd_lists_are_used_when_given(voc_root, tmp_path):
    root = copy(voc_root, tmp_path)
    sbd = tmp_path / "sbd"
    sbd.mkdir()
    (sbd / "train.txt").write_text("2011_000003\n2007_000033\n")  # a val id, must be removed
    (sbd / "val.txt").write_text("2011_003066\n")
    assert prepare_voc.build_train_aug(root, sbd) == sorted(
        (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split())


def test_missing_aug_masks_are_explained(voc_root, tmp_path):
    root = copy(voc_root, tmp_path)
    shutil.rmtree(root / "SegmentationClassAug")
    lines = []
    assert prepare_voc.prepare(root, echo=lines.append) == 1
    text = "\n".join(lines)
    assert "SegmentationClassAug is missing" in text and "SegmentationClassAug.zip" in text
