"""data.negatives: background-only images join the classifier's training split with all-zero
targets and the Libra reference library as images lacking every class; a bad folder or list
stops the run before any work with a message naming the key."""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from torch import nn

from wsss.cam.libra.library import LibrarySettings, build_library
from wsss.config import load_config
from wsss.data.datamodule import StageDataModule, make_loader
from wsss.data.imageio import DataError
from wsss.data.negatives import ID_PREFIX, negative_paths
from wsss.data.voc import VOCSegmentation
from wsss.stages.calibration import reference_library, training_images
from wsss.stages.records import StageError, preflight_data, stage_hashes

from conftest import TINY_COMMON, VOC_MINI, write_csv


def write_negatives(folder, count=3, value=0, size=(40, 52)):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image = np.full((*size, 3), value, np.uint8)
        Image.fromarray(image).save(folder / f"bg_{i}.jpg")
    return folder


def voc_config(tmp_path, *extra):
    return load_config(
        "configs/voc.yaml",
        [
            f"run.dir={tmp_path / 'runs'}",
            f"data.root={VOC_MINI}",
            "data.train_split=train",
            "data.crop_size=32",
            "data.batch_size=4",
            *TINY_COMMON,
            *extra,
        ],
    )


def test_negatives_reach_the_classifier_with_all_zero_targets(tmp_path):
    folder = write_negatives(tmp_path / "neg")
    cfg = voc_config(tmp_path, f"data.negatives={folder}")
    train = VOCSegmentation(VOC_MINI, "train")
    module = StageDataModule(cfg, "classifier")
    assert len(module.train_set) == len(train) + 3
    assert module.num_foreground == 20
    seen = {}
    for batch in module.train_dataloader():  # the real loader: sampler, augmentation, collate
        assert batch["image"].shape[-2:] == (32, 32)
        for sample_id, labels in zip(batch["id"], batch["labels"]):
            seen[sample_id] = labels
    negatives = {k: v for k, v in seen.items() if k.startswith(ID_PREFIX)}
    assert negatives, "no negative in an epoch of the classifier's loader"
    assert all(float(v.abs().sum()) == 0 for v in negatives.values())
    assert all(float(v.sum()) > 0 for k, v in seen.items() if k not in negatives)
    # the segmenter's training set has no negatives (they have no masks)
    assert len(StageDataModule(cfg, "segmenter").train_set) == len(train)


def test_negatives_from_a_list_file(tmp_path):
    folder = write_negatives(tmp_path / "neg", count=2)
    listing = tmp_path / "negatives.txt"
    listing.write_text("# background only\nneg/bg_1.jpg\n\n" + str(folder / "bg_0.jpg") + "\n")
    assert negative_paths(listing) == [folder / "bg_1.jpg", folder / "bg_0.jpg"]
    listing.write_text("neg/bg_1.jpg\nneg/missing.jpg\n")
    with pytest.raises(DataError, match=r"data\.negatives=.*missing\.jpg"):
        negative_paths(listing)


@pytest.mark.parametrize("problem", ["missing", "empty", "bad_list"])
def test_bad_negatives_stop_the_run_before_any_work(tmp_path, problem):
    target = tmp_path / "neg"
    if problem == "empty":
        target.mkdir()
        (target / "notes.txt").write_text("no images here")
    if problem == "bad_list":
        target = tmp_path / "list.txt"
        target.write_text("gone.jpg\n")
    cfg = voc_config(tmp_path, f"data.negatives={target}")
    with pytest.raises(DataError, match=r"data\.negatives"):
        preflight_data(cfg, ["classifier", "pseudo_masks", "segmenter"])
    assert not (tmp_path / "runs").exists()  # nothing was written


def test_wsss_run_refuses_a_missing_negatives_folder(tmp_path, capsys):
    from wsss.cli import main

    args = ["run", "configs/voc.yaml", f"run.dir={tmp_path / 'runs'}", f"data.root={VOC_MINI}"]
    code = main([*args, *TINY_COMMON, f"data.negatives={tmp_path / 'nowhere'}"])
    assert code != 0
    assert "data.negatives" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "voc" / "classifier").exists()


def test_key_is_hash_neutral_when_off_and_changes_the_classifier_when_set(tmp_path):
    off = stage_hashes(voc_config(tmp_path))
    assert stage_hashes(voc_config(tmp_path, "data.negatives=null")) == off
    on = stage_hashes(voc_config(tmp_path, f"data.negatives={tmp_path}"))
    assert on["classifier"] != off["classifier"] and on["pseudo_masks"] != off["pseudo_masks"]


class MeanBrightness(nn.Module):
    """Every class scores the image's mean normalised intensity: dark images score low."""

    def __init__(self, classes):
        super().__init__()
        self.features = nn.Conv2d(3, 2, 1, bias=False)
        nn.init.constant_(self.features.weight, 1 / 3)
        self.classes = classes

    def forward(self, x):
        return (4 * self.features(x).mean((1, 2, 3)) + 2)[:, None].expand(-1, self.classes)


def test_libra_library_takes_references_from_the_negatives(tmp_path):
    """The VOC images score above the bound for every class, the dark negatives below it: the
    library has references for every class only if the negatives are among its images."""
    folder = write_negatives(tmp_path / "neg", count=3, value=0)
    cfg = voc_config(tmp_path, f"data.negatives={folder}", "cam.method=libra")
    train = VOCSegmentation(VOC_MINI, "train")
    classifier = SimpleNamespace(hparams=SimpleNamespace(mean=train.stats[0], std=train.stats[1]))
    dataset = training_images(cfg, classifier)
    assert len(dataset) == len(train) + 3
    settings = LibrarySettings(("features",), references=2, bound=0.1, bound_mode="absolute")
    model = MeanBrightness(20).eval()
    library = build_library(model, make_loader(dataset, cfg, 4), settings)
    assert library.counts.tolist() == [2] * 20
    assert bool((library.indices[:, :2] >= len(train)).all())  # the negatives' indices
    without = build_library(model, make_loader(train, cfg, 4), settings)
    assert without.counts.sum() == 0  # the oracle: no VOC image is inside the bound


def test_folder_csv_negatives_are_used_the_same_way(tmp_path):
    """A folder data set's own negatives (empty labels cells) reach the classifier with all-zero
    targets and the Libra library as images lacking every class, beside data.negatives."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(4):
        value = 0 if i == 3 else 200  # the CSV negative is dark, the labelled images bright
        Image.fromarray(np.full((30, 40, 3), value, np.uint8)).save(root / "images" / f"s{i}.png")
        rows.append((f"s{i}.png", "" if i == 3 else "lesion"))
    write_csv(root / "train.csv", rows)
    write_csv(root / "val.csv", rows[:2])
    extra = write_negatives(tmp_path / "neg", count=2, value=0)
    cfg = load_config(
        "configs/medical.yaml",
        [
            f"run.dir={tmp_path / 'runs'}",
            f"data.root={root}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.crop_size=32",
            "data.batch_size=2",
            "data.channels=3",
            "data.image_size=40",
            "data.mean=[100, 100, 100]",
            "data.std=[50, 50, 50]",
            f"data.negatives={extra}",
            *TINY_COMMON,
        ],
    )
    module = StageDataModule(cfg, "classifier")
    assert len(module.train_set) == 6
    targets = {module.train_set[i]["id"]: module.train_set[i]["labels"] for i in range(6)}
    zero = sorted(k for k, v in targets.items() if float(v.sum()) == 0)
    assert zero == ["negative_00000_bg_0", "negative_00001_bg_1", "s3"]
    classifier = SimpleNamespace(hparams=SimpleNamespace(mean=[100.0] * 3, std=[50.0] * 3))
    dataset = training_images(cfg, classifier)
    settings = LibrarySettings(("features",), references=3, bound=0.1, bound_mode="absolute")
    library = build_library(MeanBrightness(1).eval(), make_loader(dataset, cfg, 2), settings)
    assert library.counts.tolist() == [3]  # the CSV negative and both data.negatives images
    assert sorted(library.indices[0].tolist()) == [3, 4, 5]


@pytest.mark.parametrize("with_negatives", [True, False])
def test_the_stage_builds_its_libra_library_with_the_negatives(tmp_path, with_negatives):
    """The pseudo-mask stage's own library builder: with data.negatives every class gets its
    references from them; without, no VOC image is inside the bound and the stage refuses."""
    folder = write_negatives(tmp_path / "neg", count=3, value=0)
    extra = [f"data.negatives={folder}"] if with_negatives else []
    cfg = voc_config(
        tmp_path,
        *extra,
        "cam.method=libra",
        "cam.libra_bound_mode=absolute",
        "cam.libra_bound=0.1",
        "cam.libra_references=2",
    )
    cfg.cam.layers = ["features"]  # the stand-in classifier's layer
    train = VOCSegmentation(VOC_MINI, "train")
    model = MeanBrightness(20).eval()
    classifier = SimpleNamespace(
        export=lambda: model,
        hparams=SimpleNamespace(
            mean=train.stats[0], std=train.stats[1], class_names=train.class_names
        ),
    )
    out = tmp_path / "pseudo"
    out.mkdir()
    if not with_negatives:
        with pytest.raises(StageError, match="no training image scored below"):
            reference_library(cfg, classifier, out)
        return
    library = reference_library(cfg, classifier, out)
    assert library.counts.tolist() == [2] * 20
    assert bool((library.indices[:, :2] >= len(train)).all())
