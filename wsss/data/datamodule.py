"""From a config to data sets and loaders: one factory for the three sources, a padding collate
for images of different sizes, and one LightningDataModule per training stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Sampler

from wsss.config import SYNTHETIC_IMAGE_SIZE, Config
from wsss.data.base import SegmentationSource
from wsss.data.folder import FolderDataset
from wsss.data.negatives import with_negatives
from wsss.data.samplers import GlobalBatchSampler, ShardSampler
from wsss.data.synthetic import SyntheticSegmentation
from wsss.data.synthetic_lesion import SyntheticLesion
from wsss.data.transforms import eval_transform, train_transform
from wsss.data.voc import VOCSegmentation
from wsss.label_maps import IGNORE_INDEX


def build_source(
    cfg: Config,
    split: str,
    transform: Optional[Callable[..., dict[str, Any]]] = None,
    mean: Optional[list[float]] = None,
    std: Optional[list[float]] = None,
) -> SegmentationSource:
    """The configured data source for one split (``mean``/``std`` override the data set's)."""
    data = cfg.data
    mean = mean if mean is not None else data.mean
    std = std if std is not None else data.std
    common = dict(transform=transform, mean=mean, std=std, channels=data.channels)
    medical = dict(
        intensity=data.intensity, window=data.window
    )  # sources in 16-bit / modality units
    sizes = {"train": data.num_train, "val": data.num_val}
    side = data.image_size or SYNTHETIC_IMAGE_SIZE
    if data.name == "synthetic":
        return SyntheticSegmentation(
            split,
            num_images=sizes.get(split, data.num_val),
            image_size=side,
            seed=cfg.run.seed,
            **common,
        )
    if data.name == "synthetic_lesion":
        return SyntheticLesion(
            split,
            num_images=sizes.get(split, data.num_val),
            image_size=side,
            seed=cfg.run.seed,
            negative_fraction=data.negative_fraction,
            findings=data.findings,
            **common,
            **medical,
        )
    if data.name == "voc":
        return VOCSegmentation(data.root, split, **common)
    splits = [data.train_split, data.val_split] + ([data.test_split] if data.test_split else [])
    return FolderDataset(
        data.root,
        split,
        image_dir=data.image_dir,
        mask_dir=data.mask_dir,
        class_names=data.class_names,
        class_splits=splits,
        mask_values=data.mask_values,
        cache_dir=data.cache_dir,
        long_side=data.image_size,
        **common,
        **medical,
    )


def train_stats(cfg: Config) -> tuple[list[float], list[float]]:
    """Normalisation statistics of the training split, shared by every split and stage."""
    return build_source(cfg, cfg.data.train_split).stats


def pad_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples of different sizes: images padded with 0 (the mean after normalising),
    masks with 255 (ignore). ``size`` keeps each item's (H, W) so outputs can be cropped back;
    ``orig_size`` each image file's (H, W) before ``data.image_size`` resizing."""
    height = max(item["image"].shape[1] for item in items)
    width = max(item["image"].shape[2] for item in items)
    batch: dict[str, Any] = {
        "image": torch.stack(
            [
                F.pad(
                    item["image"],
                    (0, width - item["image"].shape[2], 0, height - item["image"].shape[1]),
                )
                for item in items
            ]
        ),
        "labels": torch.stack([item["labels"] for item in items]),
        "id": [item["id"] for item in items],
        "size": torch.tensor([tuple(item["image"].shape[1:]) for item in items]),
    }
    if all(
        "orig_size" in item for item in items
    ):  # (B, 2): each image file's (H, W), for restore_size
        batch["orig_size"] = torch.stack([item["orig_size"] for item in items])
    if all("mask" in item for item in items):
        batch["mask"] = torch.stack(
            [
                F.pad(
                    item["mask"],
                    (0, width - item["mask"].shape[1], 0, height - item["mask"].shape[0]),
                    value=IGNORE_INDEX,
                )
                for item in items
            ]
        )
    if all("confidence" in item for item in items):  # padding has no confidence
        batch["confidence"] = torch.stack(
            [
                F.pad(
                    item["confidence"],
                    (
                        0,
                        width - item["confidence"].shape[1],
                        0,
                        height - item["confidence"].shape[0],
                    ),
                )
                for item in items
            ]
        )
    return batch


def make_loader(
    dataset: SegmentationSource,
    cfg: Config,
    batch_size: int,
    shuffle: bool = False,
    drop_last: bool = False,
    sampler: Optional[Sampler] = None,
    own_generator: bool = False,
) -> DataLoader:
    """A DataLoader with the padding collate; workers seeded by Lightning's worker init.

    own_generator: draw the workers' base seed from the loader's own generator (seeded from
    ``run.seed``) instead of the global RNG, so creating the loader shifts no other random stream
    (training loaders, which the resume guarantee needs). Only for loaders made inside the
    process that uses them: a torch.Generator cannot be sent to a spawned process.
    """
    workers = cfg.data.num_workers
    generator = torch.Generator().manual_seed(cfg.run.seed) if own_generator else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=pad_collate,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=pl_worker_init_function if workers else None,
        generator=generator,
    )


class StageDataModule(L.LightningDataModule):
    """Loaders for one training stage.

    Training uses random scale / crop / flip at ``data.crop_size``. Validation of the classifier
    fits images into a ``crop_size`` square; validation of the segmenter keeps full size (mIoU is
    measured on the original pixels), padded per batch.
    """

    def __init__(
        self,
        cfg: Config,
        stage: str,
        train_masks: Optional[Path | str] = None,
        confidence: bool = False,
    ) -> None:
        super().__init__()
        if stage not in ("classifier", "segmenter"):
            raise ValueError(f"unknown stage {stage!r}")
        self.cfg = cfg
        self.stage = stage
        self.train_masks = train_masks
        self.mean, self.std = train_stats(cfg)
        fill = tuple(float(m) for m in self.mean)
        augment = train_transform(cfg.data.crop_size, fill, seed=cfg.run.seed)
        self.train_set = build_source(cfg, cfg.data.train_split, augment, self.mean, self.std)
        if stage == "classifier":  # background-only images, all-zero targets; no masks
            self.train_set = with_negatives(self.train_set, cfg.data.negatives)
        if train_masks is not None:
            self.train_set.use_masks_from(train_masks, confidence=confidence)
        val_transform = eval_transform(cfg.data.crop_size, fill) if stage == "classifier" else None
        self.val_set = build_source(cfg, cfg.data.val_split, val_transform, self.mean, self.std)

    @property
    def num_foreground(self) -> int:
        return len(self.train_set.class_names)

    def _process(self) -> tuple[int, int]:
        """(global rank, world size) of this process in the Trainer that asks for loaders."""
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _epoch(self) -> int:
        """The epoch Lightning is about to run, also while it restores a resumed fit (the value it
        passes to ``set_epoch``; ``current_epoch`` lags behind then)."""
        return self.trainer.fit_loop.epoch_progress.current.processed

    def train_dataloader(self) -> DataLoader:
        """This process's share of each global batch of ``data.batch_size`` (see samplers)."""
        rank, world = self._process()
        sampler = GlobalBatchSampler(
            len(self.train_set),
            self.cfg.data.batch_size,
            self.cfg.run.seed,
            shuffle=True,
            drop_last=True,
            rank=rank,
            world_size=world,
            epoch_source=self._epoch if self.trainer else None,
            with_epoch=getattr(self.train_set, "reads_epoch", False),
        )
        return make_loader(
            self.train_set,
            self.cfg,
            self.cfg.data.batch_size // world,
            sampler=sampler,
            own_generator=True,
        )

    def val_dataloader(self) -> DataLoader:
        rank, world = self._process()
        batch = (
            self.cfg.data.batch_size
            if self.stage == "classifier"
            else max(1, self.cfg.data.batch_size // 4)
        )
        return make_loader(
            self.val_set,
            self.cfg,
            batch,
            sampler=ShardSampler(len(self.val_set), rank, world),
            own_generator=True,
        )
