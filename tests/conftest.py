"""Test environment (offline, CPU, small) and what the tests share: the small configs, a trained
tiny classifier, a copy of voc_mini, the repository's scripts and small file-writing helpers."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# idle OpenMP threads sleep instead of spinning: on a busy 2-core machine spinning makes each
# training step 5-20x slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# folder data sets cache their statistics here, not in the user's ~/.cache/wsss
os.environ["WSSS_CACHE_DIR"] = tempfile.mkdtemp(prefix="wsss-test-cache-")

import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from wsss import stages  # noqa: E402
from wsss.config import Config, load_config  # noqa: E402
from wsss.data.datamodule import build_source  # noqa: E402
from wsss.data.masks import voc_palette  # noqa: E402
from wsss.stages import trainer as stage_trainer  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(__file__).parent / "data"
VOC_MINI = DATA_DIR / "voc_mini" / "VOCdevkit" / "VOC2012"

# What every small config holds: the CPU, one process, no loader workers and no logger (a test
# that checks a logger names it; later overrides win).
TINY_COMMON = (
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "logger.kind=none",
)

# The sizes the tests run at. A file adds what it needs on top as extras, so that differences
# between files stay visible where they are used.
TINY_SIZES = {
    # a whole `wsss run` on the synthetic set: two classifier epochs, so the CAMs have something
    # to show and calibration has pairs to find
    "run": (
        "data.num_train=16",
        "data.num_val=6",
        "data.image_size=64",
        "data.crop_size=64",
        "data.batch_size=8",
        "classifier.max_epochs=2",
        "classifier.output_stride=16",
        "segmenter.max_epochs=1",
        "segmenter.arch=FPN",
        "cam.batch_size=8",
        "cam.flip=false",
        "pseudo.calibration_images=8",
        "pseudo.grid=[0.1, 0.3, 0.5]",
        "pseudo.num_panels=2",
    ),
    # one stage at a time on a one-epoch classifier, without in-image refinement
    "stage": (
        "data.num_train=12",
        "data.num_val=4",
        "data.image_size=64",
        "data.crop_size=64",
        "data.batch_size=4",
        "classifier.max_epochs=1",
        "classifier.output_stride=16",
        "segmenter.max_epochs=1",
        "segmenter.arch=FPN",
        "cam.batch_size=4",
        "cam.flip=false",
        "pseudo.refine=none",
    ),
    # bookkeeping: hashes, refusals and error messages on the smallest set a stage accepts
    "micro": (
        "data.num_train=8",
        "data.num_val=4",
        "data.image_size=48",
        "data.crop_size=48",
        "data.batch_size=4",
        "classifier.max_epochs=1",
        "pseudo.refine=none",
    ),
    # configs/medical_demo.yaml at 48 px (the data set's size comes from the files)
    "medical": (
        "data.batch_size=8",
        "data.image_size=48",
        "data.crop_size=48",
        "classifier.max_epochs=2",
        "segmenter.max_epochs=1",
        "cam.flip=false",
        "cam.batch_size=8",
        "pseudo.calibration_images=8",
        "pseudo.num_panels=2",
    ),
}


def tiny_args(
    run_dir: Path, *extra: str, size: str = "run", base: str = "configs/default.yaml"
) -> list[str]:
    """``BASE run.dir=... overrides...``: the tail of a small `wsss <command>` line (for
    ``wsss.cli.main`` or a subprocess); ``extra`` comes last and wins."""
    return [base, f"run.dir={run_dir}", *TINY_COMMON, *TINY_SIZES[size], *extra]


def tiny_config(
    run_dir: Path, *extra: str, size: str = "run", base: str = "configs/default.yaml"
) -> Config:
    """The config of ``tiny_args``, loaded."""
    path, *overrides = tiny_args(run_dir, *extra, size=size, base=base)
    return load_config(path, overrides)


def reuse_stage(trained_root: Path, run_root: Path, stage: str = "classifier") -> None:
    """Copy a finished stage into another run root, so the stages after it start from it there."""
    shutil.copytree(trained_root / "default" / stage, run_root / "default" / stage)


def digest(directory: Path, pattern: str = "syn_*.png") -> dict[str, str]:
    """SHA-256 of every file matching ``pattern`` below ``directory``, by relative path."""
    return {
        p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob(pattern))
    }


class SimulatedKill(RuntimeError):
    """Stands in for a killed process: Lightning re-raises it after its own clean-up."""


def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` as a module, so tests call its functions in this process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_csv(path: Path, rows, header: str = "image,labels") -> None:
    """A folder data set's split CSV from ``(image, labels)`` rows."""
    path.write_text("\n".join([header] + [f"{image},{labels}" for image, labels in rows]) + "\n")


def save_palette_png(path: Path, array) -> None:
    """A VOC-style palette PNG, written here rather than by the package's writer under test."""
    img = Image.fromarray(np.asarray(array, np.uint8), mode="P")
    img.putpalette(voc_palette())
    img.save(path)


@pytest.fixture
def voc_root() -> Path:
    """The checked-in voc_mini (read only)."""
    return VOC_MINI


@pytest.fixture
def voc_copy(tmp_path) -> Path:
    """A writable copy of voc_mini at ``tmp_path/VOCdevkit/VOC2012``, for tests that damage it."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    shutil.copytree(VOC_MINI, root)
    return root


@pytest.fixture(scope="session")
def trained_classifier(tmp_path_factory) -> Path:
    """A run root holding a classifier trained at the "stage" size. Shared by several files, so
    read only: copy it into your own root with ``reuse_stage`` before running stages."""
    root = tmp_path_factory.mktemp("trained_classifier")
    stages.train_classifier(tiny_config(root, size="stage"))
    return root


@pytest.fixture
def training_callbacks(monkeypatch) -> list:
    """Callbacks to add to every Trainer a training stage fits with (classifier, affinity,
    segmenter): the test fills the returned list, for instance with a simulated kill."""
    extra: list = []
    original = stage_trainer.make_trainer

    def with_extra(cfg, epochs, logger=False, callbacks=None, **overrides):
        return original(cfg, epochs, logger, [*(callbacks or []), *extra], **overrides)

    monkeypatch.setattr(stage_trainer, "make_trainer", with_extra)
    return extra


def write_masks_with_confidence(cfg, directory, confidence_of):
    """The data set's own masks as pseudo-masks in ``directory``, with confidence maps
    ``confidence_of(mask)`` written as plain grayscale PNGs (not by the package's writer)."""
    source = build_source(cfg, cfg.data.train_split)
    (directory / "confidence").mkdir(parents=True)
    for index in range(len(source)):
        raw = source.load_raw(index)
        save_palette_png(directory / f"{raw.id}.png", raw.mask)
        Image.fromarray(confidence_of(raw.mask), mode="L").save(
            directory / "confidence" / f"{raw.id}.png"
        )
    return source
