"""Stage 1: the multi-label classifier, trained on image-level labels only."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L

from wsss.config import Config
from wsss.data.datamodule import StageDataModule
from wsss.models.classifier import ClassifierModule
from wsss.stages.records import run_stage
from wsss.stages.trainer import fit_stage, load_trained, log_checkpoint
from wsss.tracking import log_table


def train_classifier(cfg: Config) -> dict[str, Any]:
    """Stage 1: the multi-label classifier on image-level labels."""
    return run_stage(
        cfg,
        "classifier",
        lambda logger: fit_classifier(
            cfg, "classifier", lambda: StageDataModule(cfg, "classifier"), logger
        ),
        recorder=lambda logger, record: record_classifier(cfg, "classifier", logger, record),
    )


def fit_classifier(
    cfg: Config, stage: str, make_data: Callable[[], StageDataModule], logger: Any
) -> dict[str, Any]:
    """A fresh classifier of the ``classifier`` recipe fitted on the data ``make_data`` builds
    (after seeding) into the folder of ``stage``: this stage, or the context-decoupling round."""
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    datamodule = make_data()
    c = cfg.classifier
    module = ClassifierModule(
        num_classes=datamodule.num_foreground,
        backbone=c.backbone,
        pretrained=c.pretrained,
        output_stride=c.output_stride,
        in_channels=cfg.data.channels,
        lr=c.lr,
        backbone_lr_mult=c.backbone_lr_mult,
        weight_decay=c.weight_decay,
        momentum=c.momentum,
        schedule=c.schedule,
        optimizer=c.optimizer,
        class_names=datamodule.train_set.class_names,
        mean=datamodule.mean,
        std=datamodule.std,
        token_pool=c.token_pool,
    )
    return fit_stage(cfg, stage, module, datamodule, c.max_epochs, logger)


def record_classifier(cfg: Config, stage: str, logger: Any, record: dict[str, Any]) -> None:
    """Per-class average precision on the val split as a table, and the checkpoint."""
    metrics = record.get("metrics") or {}
    rows = [
        [key[len("val/ap_") :], value]
        for key, value in metrics.items()
        if key.startswith("val/ap_")
    ]
    log_table(logger, f"{stage}/per_class_ap", ["class", "average precision"], rows)
    log_checkpoint(cfg, stage, logger)


def load_classifier(cfg: Config) -> ClassifierModule:
    """The trained classifier of the run, on the CPU."""
    return load_trained(cfg, "classifier", ClassifierModule)
