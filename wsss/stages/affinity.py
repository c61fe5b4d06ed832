"""The affinity stage (``pseudo.refine=affinity``), AffinityNet / IRN style:

1. an ``AffinityModule`` learns inter-pixel affinities from the calibrated pseudo-masks, or
   from those masks refined by par / crf (``pseudo.affinity_labels``) (pixel
   pairs within ``affinity.radius``: same label -> 1, different -> 0, pairs touching the ignore
   band left out), on the classifier's backbone; resumable from ``last.ckpt``;
2. every training image's saved class maps (background included, as the calibrated
   distribution) are diffused by a random walk over the predicted affinities, labelled and
   their uncertain pixels ignored, through ``Trainer.predict`` (sharded, resumable past written
   masks), into ``affinity/masks/<id>.png``: the refined pseudo-masks the segmenter trains on.

With any other ``pseudo.refine`` the stage has nothing to do and leaves no folder.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Subset

from wsss.config import Config
from wsss.data.datamodule import StageDataModule, build_source, make_loader
from wsss.data.masks import CONFIDENCE_DIR
from wsss.data.resize import restore_size
from wsss.distributed import barrier, echo, is_global_zero
from wsss.models.affinity import AffinityModule, propagate
from wsss.models.prediction_writer import SegmentationWriter
from wsss.models.pseudo_writer import MAP_DIR
from wsss.pseudo.distribution import confidence_levels
from wsss.pseudo.refine import distribution_labels, ignore_uncertain, slot_distribution
from wsss.stages.classifier import load_classifier
from wsss.stages.pseudo_masks import affinity_labels_dir, done_ids
from wsss.stages.records import StageError, read_stage, run_stage, stage_dir
from wsss.stages.scoring import score_mask_dir
from wsss.stages.trainer import fit_stage, log_checkpoint, make_trainer

MASK_DIR = "masks"
RESNET_LEVELS = ("layer1", "layer2", "layer3", "layer4")


def train_affinity(cfg: Config) -> dict[str, Any]:
    """Stage 3 when ``pseudo.refine=affinity``: affinities, then the refined pseudo-masks."""
    if cfg.pseudo.refine != "affinity":
        echo(f"[wsss] affinity: not used (pseudo.refine={cfg.pseudo.refine})")
        return {"skipped": True, "not_used": True}
    return run_stage(
        cfg,
        "affinity",
        lambda logger: _run(cfg, logger),
        recorder=lambda logger, record: log_checkpoint(cfg, "affinity", logger),
    )


def refined_mask_dir(cfg: Config) -> Path:
    return stage_dir(cfg, "affinity") / MASK_DIR


def feature_levels(model: torch.nn.Module, cfg: Config) -> list[str]:
    """The backbone levels the affinity head reads: ResNet's four stages, else ``cam.layers``."""
    names = dict(model.named_modules())
    return list(RESNET_LEVELS) if all(n in names for n in RESNET_LEVELS) else list(cfg.cam.layers)


def affinity_training_masks(cfg: Config) -> Path:
    """The masks the affinities learn from: the calibrated pseudo-masks, or (with
    ``pseudo.affinity_labels``) those masks refined in the image by the pseudo-mask stage."""
    out_dir = stage_dir(cfg, "pseudo_masks")
    return affinity_labels_dir(cfg, out_dir) or out_dir


def _pseudo_record(cfg: Config) -> dict[str, Any]:
    record = read_stage(cfg, "pseudo_masks")
    if record is None or record.get("status") != "done":
        raise StageError(
            f"the affinity stage learns from the pseudo-masks, but {stage_dir(cfg, 'pseudo_masks')} "
            f"is not complete; run `wsss make-pseudo-masks` first"
        )
    return record


def _run(cfg: Config, logger: Any) -> dict[str, Any]:
    record = _pseudo_record(cfg)
    classifier = load_classifier(cfg)
    a = cfg.affinity
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    datamodule = StageDataModule(cfg, "segmenter", train_masks=affinity_training_masks(cfg))
    backbone = classifier.export()
    module = AffinityModule(
        backbone,
        layers=feature_levels(backbone, cfg),
        stride=a.stride,
        radius=a.radius,
        freeze_backbone=a.freeze_backbone,
        lr=a.lr,
        backbone_lr_mult=a.backbone_lr_mult,
        beta=a.beta,
        steps=a.steps,
    )
    # validated on nothing: the val split's masks are ground truth, which the stage must not see
    with warnings.catch_warnings():
        # the backbone's BatchNorm stays in eval mode by design (the classifier's statistics)
        warnings.filterwarnings(
            "ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training"
        )
        results = fit_stage(
            cfg, "affinity", module, datamodule, a.max_epochs, logger, limit_val_batches=0
        )
    trained = AffinityModule.load_from_checkpoint(
        stage_dir(cfg, "affinity") / "last.ckpt", backbone=classifier.export(), map_location="cpu"
    )
    results.update(_propagate(cfg, classifier, trained, record["thresholds"], logger))
    return results


class AffinityRefiner(L.LightningModule):
    """predict_step: each image's saved class maps (``pseudo_masks/maps/<id>.npz``) as the
    calibrated distribution, diffused by the random walk over the image's affinities, labelled,
    uncertain pixels set to 255 (two best classes within ``ignore_band``); ``confidence``: each
    pixel's top-two margin of the walked distribution (uint8)."""

    def __init__(
        self,
        affinity,
        maps_dir: Path,
        thresholds: dict[int, float],
        ignore_band: float,
        boundary_power: float = 0.0,
    ) -> None:
        super().__init__()
        self.affinity = affinity.eval()
        self.maps_dir = Path(maps_dir)
        self.thresholds = thresholds  # mask value -> threshold
        self.ignore_band = ignore_band
        self.boundary_power = boundary_power

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        canvas = batch["image"].shape[-2:]
        preds = torch.zeros((len(batch["id"]), *canvas), dtype=torch.uint8, device=self.device)
        confidence = torch.zeros_like(preds)
        for i, sample_id in enumerate(batch["id"]):
            h, w = (int(v) for v in batch["size"][i])
            saved = np.load(
                self.maps_dir / f"{sample_id}.npz"
            )  # at the file's size: back to the image's
            maps = restore_size(torch.from_numpy(saved["maps"].astype(np.float32)), (h, w))[
                None
            ].to(self.device)
            classes = torch.from_numpy(saved["classes"].astype(np.int64))[None].to(self.device)
            valid = torch.ones_like(classes, dtype=torch.bool)
            per_slot = torch.tensor(
                [[self.thresholds[int(c)] for c in classes[0]]], device=self.device
            )
            probs = slot_distribution(maps, valid, per_slot)
            refined = propagate(
                self.affinity,
                probs,
                images=batch["image"][i : i + 1, :, :h, :w],
                boundary_power=self.boundary_power,
            )
            labels = distribution_labels(refined, classes, valid)
            if self.ignore_band > 0:
                labels = ignore_uncertain(labels, refined, margin=self.ignore_band)
            preds[i, :h, :w] = labels[0]
            confidence[i, :h, :w] = confidence_levels(refined)[0]
        return {"pred": preds, "confidence": confidence}


def _propagate(
    cfg: Config, classifier, trained, thresholds: dict[str, Any], logger: Any
) -> dict[str, Any]:
    """Refined masks for every training image not written yet, then their scores (rank zero)."""
    names = list(classifier.hparams.class_names)
    per_class = {i + 1: float(thresholds["per_class"][n]) for i, n in enumerate(names)}
    refiner = AffinityRefiner(
        trained,
        stage_dir(cfg, "pseudo_masks") / MAP_DIR,
        per_class,
        cfg.pseudo.ignore_band,
        boundary_power=cfg.affinity.boundary_power,
    )
    dataset = build_source(
        cfg, cfg.data.train_split, mean=classifier.hparams.mean, std=classifier.hparams.std
    )
    out_dir = refined_mask_dir(cfg)
    done = done_ids([out_dir], dataset.ids)  # read once: each check opens the mask
    todo = [i for i, sample_id in enumerate(dataset.ids) if sample_id not in done]
    barrier()
    if todo:
        writer = SegmentationWriter(out_dir, confidence_dir=out_dir / CONFIDENCE_DIR)
        trainer = make_trainer(cfg, 1, logger, [writer])
        trainer.predict(
            refiner,
            dataloaders=make_loader(Subset(dataset, todo), cfg, cfg.cam.batch_size),
            return_predictions=False,
        )
    barrier()
    if not is_global_zero():
        return {}
    scores = score_mask_dir(dataset, out_dir)
    results = {f"refined_{key}": value for key, value in scores.items()}
    results["refined_written_now"] = len(todo)
    return results


def affinity_masks(cfg: Config) -> Path:
    """The refined masks of a finished affinity stage, for the segmenter."""
    record = read_stage(cfg, "affinity")
    if record is None or record.get("status") != "done":
        raise StageError(
            f"pseudo.refine=affinity but {stage_dir(cfg, 'affinity')} is not complete; run "
            f"`wsss train-affinity` first"
        )
    return refined_mask_dir(cfg)
