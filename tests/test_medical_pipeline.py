"""The medical folder path end to end: the synthetic lesion set written as 16-bit PNG runs through
`wsss run configs/medical_demo.yaml` (0/255 masks mapped, images resized for training and CAMs);
masks come back at each file's size; negatives are all background; the report leads with the
lesion's Dice. The same set written as 16-bit TIFF and as DICOM gives the pipeline the very items
the PNG copy gives it (raw arrays, statistics, the working-size tensors and original sizes), so the
run on the PNG copy stands for all three."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from wsss.cli import main
from wsss.data.datamodule import build_source
from wsss.data.imageio import read_mask

from conftest import load_script, tiny_args, tiny_config

FORMATS = ("png16", "tiff", "dcm")
DEMO = "configs/medical_demo.yaml"
make_synthetic_lesion = load_script("make_synthetic_lesion")


def demo_config(run_dir: Path, data: Path):
    return tiny_config(run_dir, f"data.root={data}", size="medical", base=DEMO)


@pytest.fixture(scope="module")
def lesion_sets(tmp_path_factory) -> dict[str, Path]:
    """The lesion set in each file format: 16 + 6 images of 56 px +- 20 %, masks stored 0/255."""
    root = tmp_path_factory.mktemp("medical")
    sets = {}
    for fmt in FORMATS:
        sets[fmt] = root / f"data_{fmt}"
        make_synthetic_lesion.main(
            [
                "--out",
                str(sets[fmt]),
                "--format",
                fmt,
                "--num-train",
                "16",
                "--num-val",
                "6",
                "--size",
                "56",
                "--size-jitter",
                "0.2",
                "--masks",
                "binary255",
            ]
        )
    return sets


@pytest.fixture(scope="module")
def run(lesion_sets, tmp_path_factory) -> tuple[Path, Path]:
    """`wsss run` on the PNG copy: (data folder, run folder)."""
    data = lesion_sets["png16"]
    run_dir = tmp_path_factory.mktemp("run_png16")
    assert main(["run", *tiny_args(run_dir, f"data.root={data}", size="medical", base=DEMO)]) == 0
    return data, run_dir / "medical_demo"


def _same_item(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def test_png16_tiff_and_dicom_copies_give_the_pipeline_the_same_items(lesion_sets, tmp_path):
    for split in ("train", "val"):
        sources = {
            fmt: build_source(demo_config(tmp_path, data), split)
            for fmt, data in lesion_sets.items()
        }
        png = sources["png16"]
        assert len(png) == (16 if split == "train" else 6)
        for fmt in ("tiff", "dcm"):
            other = sources[fmt]
            assert other.ids == png.ids and other.class_names == png.class_names, fmt
            assert other.stats == png.stats, fmt
            for index in range(len(png)):
                a, b = png.load_raw(index), other.load_raw(index)
                assert a.image.max() > 255  # really 16-bit
                assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask), (
                    fmt,
                    a.id,
                )
                assert np.array_equal(a.labels, b.labels), (fmt, a.id)
                assert _same_item(png[index], other[index]), (fmt, a.id)
        sizes = {tuple(png[index]["orig_size"].tolist()) for index in range(len(png))}
        assert len(sizes) > 1  # sizes jitter, so original sizes are compared, not one shared size


@pytest.mark.slow
def test_masks_at_each_files_size_negatives_background_and_dice_first(run):
    data, run = run
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
