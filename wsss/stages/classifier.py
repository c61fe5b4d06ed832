"""Stage 1: the multi-label classifier, trained on image-level labels only."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from wsss.config import Config
from wsss.data.datamodule import StageDataModule
from wsss.stages.base import fit_stage, load_trained, log_checkpoint, run_stage


def train_classifier(cfg: Config) -> dict[str, Any]:
    """Stage 1: the multi-label classifier on image-level labels."""
    return run_stage(cfg, "classifier", lambda logger: _train(cfg, logger),
                     recorder=lambda logger, record: _record(cfg, logger, record))


def _train(cfg: Config, logger: Any) -> dict[str, Any]:
    from wsss.models.classifier import ClassifierModule

    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    datamodule = StageDataModule(cfg, "classifier")
    c = cfg.classifier
    module = ClassifierModule(
        num_classes=datamodule.num_foreground, backbone=c.backbone, pretrained=c.pretrained,
        output_stride=c.output_stride, in_channels=cfg.data.channels, lr=c.lr,
        backbone_lr_mult=c.backbone_lr_mult, weight_decay=c.weight_decay, momentum=c.momentum,
        schedule=c.schedule, optimizer=c.optimizer, class_names=datamodule.train_set.class_names,
        mean=datamodule.mean, std=datamodule.std)
    return fit_stage(cfg, "classifier", module, datamodule, c.max_epochs, logger)


def _record(cfg: Config, logger: Any, record: dict[str, Any]) -> None:
    """Per-class average precision on the val split as a table, and the checkpoint."""
    from wsss.tracking import log_table

    metrics = record.get("metrics") or {}
    rows = [[key[len("val/ap_"):], value] for key, value in metrics.items() if key.startswith("val/ap_")]
    log_table(logger, "classifier/per_class_ap", ["class", "average precision"], rows)
    log_checkpoint(cfg, "classifier", logger)


def load_classifier(cfg: Config):
    from wsss.models.classifier import ClassifierModule

    return load_trained(cfg, "classifier", ClassifierModule, "train-classifier")


def classifier_fingerprint(classifier) -> str:
    """sha256 of the trained network's weights: what artefacts computed from the classifier
    (the Libra-CAM reference library) are tied to, so a retrained classifier rebuilds them."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(classifier.export().state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]

