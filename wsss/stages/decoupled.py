"""The context-decoupling round (``classifier.context_decoupling``, CDA): a second classifier
trained on copy-paste images cut with the round-1 pseudo-masks (``wsss.data.copy_paste``), then
the pseudo-masks made again with it, by the pseudo-mask stage's own code. The segmenter trains on
the round-2 masks (``registry.training_masks_stage``). With the key off both stages have nothing
to do and leave no folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from wsss.config import Config
from wsss.data.copy_paste import CopyPasteSource
from wsss.data.datamodule import StageDataModule, build_source
from wsss.distributed import echo
from wsss.models.classifier import ClassifierModule
from wsss.stages.classifier import fit_classifier, record_classifier
from wsss.stages.pseudo_masks import record_pseudo_stage, run_pseudo_stage
from wsss.stages.records import StageError, read_stage, run_stage, stage_dir
from wsss.stages.trainer import load_trained

CLASSIFIER = "decoupled_classifier"
PSEUDO_MASKS = "decoupled_pseudo_masks"


def _not_used(stage: str) -> dict[str, Any]:
    echo(f"[wsss] {stage}: not used (classifier.context_decoupling=false)")
    return {"skipped": True, "not_used": True}


def round_one_masks(cfg: Config) -> Path:
    """The final masks of the pseudo-mask stage (refined where a refinement is on): the donors'
    object regions."""
    record = read_stage(cfg, "pseudo_masks")
    if record is None or record.get("status") != "done":
        raise StageError(
            f"context decoupling cuts objects out with the round-1 pseudo-masks, but "
            f"{stage_dir(cfg, 'pseudo_masks')} is not complete; run `wsss make-pseudo-masks` first"
        )
    return stage_dir(cfg, "pseudo_masks")


def copy_paste_data(cfg: Config, masks: Path) -> StageDataModule:
    """The classifier's data module with its training set replaced by copy-paste images."""
    datamodule = StageDataModule(cfg, "classifier")
    donors = build_source(cfg, cfg.data.train_split, mean=datamodule.mean, std=datamodule.std)
    donors.use_masks_from(masks)
    c = cfg.classifier
    datamodule.train_set = CopyPasteSource(
        datamodule.train_set, donors, cfg.run.seed, c.paste_probability, c.paste_min_scale
    )
    return datamodule


def train_decoupled_classifier(cfg: Config) -> dict[str, Any]:
    """The round-2 classifier on copy-paste images, resumable like the first."""
    if not cfg.classifier.context_decoupling:
        return _not_used(CLASSIFIER)
    masks = round_one_masks(cfg)
    return run_stage(
        cfg,
        CLASSIFIER,
        lambda logger: fit_classifier(cfg, CLASSIFIER, lambda: copy_paste_data(cfg, masks), logger),
        recorder=lambda logger, record: record_classifier(cfg, CLASSIFIER, logger, record),
    )


def make_decoupled_pseudo_masks(cfg: Config) -> dict[str, Any]:
    """The pseudo-masks of the round-2 classifier: what the segmenter trains on."""
    if not cfg.classifier.context_decoupling:
        return _not_used(PSEUDO_MASKS)
    return run_stage(
        cfg,
        PSEUDO_MASKS,
        lambda logger: run_pseudo_stage(
            cfg,
            load_trained(cfg, CLASSIFIER, ClassifierModule),
            stage_dir(cfg, PSEUDO_MASKS),
            logger,
            stage=PSEUDO_MASKS,
        ),
        recorder=lambda logger, record: record_pseudo_stage(cfg, logger, record, PSEUDO_MASKS),
    )
