"""The medical folder path end to end: the synthetic lesion set written as 16-bit PNG, 16-bit
TIFF and DICOM runs through `wsss run configs/medical_demo.yaml` (0/255 masks mapped, images
resized for training and CAMs) and gives the same masks from every format; masks come back at
each file's size; negatives are all background; the report leads with the lesion's Dice."""

import csv
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wsss.cli import main
from wsss.data.imageio import read_mask

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("png16", "tiff", "dcm")
TINY = ["data.batch_size=8", "data.num_workers=0", "data.image_size=48", "data.crop_size=48",
        "classifier.max_epochs=2", "segmenter.max_epochs=1", "cam.flip=false", "cam.batch_size=8",
        "pseudo.calibration_images=8", "pseudo.num_panels=2", "logger.kind=none"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("medical")
    out = {}
    for fmt in FORMATS:
        data = root / f"data_{fmt}"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_lesion.py"), "--out", str(data),
                        "--format", fmt, "--num-train", "16", "--num-val", "6", "--size", "56",
                        "--size-jitter", "0.2", "--masks", "binary255"], check=True, cwd=ROOT, timeout=300)
        run_dir = root / f"run_{fmt}"
        assert main(["run", "configs/medical_demo.yaml", f"data.root={data}", f"run.dir={run_dir}", *TINY]) == 0
        out[fmt] = (data, run_dir / "medical_demo")
    return out


def digest(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*.png")) if ".panels" not in p.parts and p.name != "panels.png"}


@pytest.mark.slow
def test_png16_tiff_and_dicom_copies_give_the_same_masks_and_figures(runs):
    masks = {fmt: digest(run / "pseudo_masks") for fmt, (_, run) in runs.items()}
    assert masks["png16"] and masks["png16"] == masks["tiff"] == masks["dcm"]
    reports = {fmt: json.loads((run / "report.json").read_text()) for fmt, (_, run) in runs.items()}
    for key in ("seed_miou", "pseudo_miou", "seg_miou", "dice", "pseudo_dice"):
        assert reports["png16"][key] == reports["tiff"][key] == reports["dcm"][key], key


@pytest.mark.slow
def test_masks_at_each_files_size_negatives_background_and_dice_first(runs):
    data, run = runs["png16"]
    with open(data / "train.csv") as handle:
        rows = list(csv.DictReader(handle))
    negatives = [Path(r["image"]).stem for r in rows if not r["labels"].strip()]
    assert negatives and len(negatives) < len(rows)
    sizes = set()
    for row in rows:
        stem = Path(row["image"]).stem
        written = read_mask(run / "pseudo_masks" / f"{stem}.png")
        truth = read_mask(data / "masks" / f"{stem}.png")
        assert written.shape == truth.shape  # the file's size, not the 48 px working size
        sizes.add(written.shape)
        if stem in negatives:
            assert not written.any()
    assert len(sizes) > 1  # sizes jitter, so each mask really was restored to its own file
    for path in (run / "evaluation" / "val").glob("*.png"):
        assert read_mask(path).shape == read_mask(data / "masks" / path.name).shape
    report = json.loads((run / "report.json").read_text())
    assert set(report["per_class_dice"]) == {"background", "lesion"} and report["dice"] is not None
    assert report["pseudo_per_class_dice"]["lesion"] is not None
    text = (run / "report.md").read_text()
    assert text.index("## Findings") < text.index("| step | mIoU")
    assert np.isfinite(report["seg_miou"])
