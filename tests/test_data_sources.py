"""Synthetic data, the albumentations pipeline, the padding collate and the source factory
(VOC and folder sources have their own test files)."""

import numpy as np

from wsss.config import load_config
from wsss.data.datamodule import build_source, pad_collate
from wsss.data.synthetic import SyntheticSegmentation
from wsss.data.transforms import train_transform
from wsss.data.voc import VOCSegmentation


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
    data = SyntheticSegmentation(
        "train",
        num_images=2,
        image_size=48,
        seed=0,
        transform=train_transform(64, (127.0, 127.0, 127.0), (1.0, 1.0)),
    )
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


def _first_batches(cfg, count=3):
    import lightning as L

    from wsss.data.datamodule import StageDataModule

    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    loader = StageDataModule(cfg, "classifier").train_dataloader()
    batches = []
    for batch in loader:
        batches.append(batch["image"])
        if len(batches) == count:
            break
    return batches


def test_training_augmentation_is_reproducible_with_workers():
    """albumentations ignores global seeds: the pipeline is seeded from run.seed and each worker
    reseeds its copy, so two runs with one seed load the same augmented batches and another seed
    loads others. Random scale and crop on 48 px images make every batch seed-dependent."""
    import torch

    overrides = [
        "data.num_train=12",
        "data.image_size=48",
        "data.crop_size=40",
        "data.batch_size=2",
        "data.num_workers=2",
    ]
    first = _first_batches(load_config("configs/default.yaml", overrides))
    again = _first_batches(load_config("configs/default.yaml", overrides))
    other = _first_batches(load_config("configs/default.yaml", [*overrides, "run.seed=1"]))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(a.shape == c.shape and torch.equal(a, c) for a, c in zip(first, other))
