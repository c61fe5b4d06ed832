"""Self-training rounds (``segmenter.rounds`` > 1). Round 1 is the segmenter stage; round r is the
stage ``segmenter_round<r>`` (``wsss.stages.registry.expand``), in its own folder:

1. round r-1's segmenter predicts the training split with the config's test-time augmentation;
   the distribution, kept to each image's labelled classes, is refined (``pseudo.refine``),
   labelled and banded as the pseudo-mask stage does (``wsss.models.round_labeler``), and
   written with its confidence to ``segmenter_round<r>/masks/`` (resumable past written masks);
2. the masks are scored against the training ground truth where it exists, and the panel
   samples' previous and new masks are drawn side by side in ``segmenter_round<r>/panels.png``
   (and logged as mask overlays);
3. a fresh segmenter trains on them, resumable from ``segmenter_round<r>/last.ckpt``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Subset

from wsss.config import Config
from wsss.data.datamodule import build_source, make_loader
from wsss.data.masks import CONFIDENCE_DIR
from wsss.distributed import barrier, echo, is_global_zero
from wsss.models.prediction_writer import SegmentationWriter
from wsss.models.round_labeler import RoundMaskModule
from wsss.stages.evaluation import prediction_batch
from wsss.stages.mask_overlays import mask_overlay_items
from wsss.stages.pseudo_masks import done_ids, panel_ids
from wsss.stages.records import StageError, run_stage, stage_dir
from wsss.stages.registry import round_name
from wsss.stages.scoring import score_mask_dir
from wsss.stages.segmenter import load_segmenter, segmenter_masks, train_on_masks
from wsss.stages.trainer import log_checkpoint, make_trainer
from wsss.tracking import log_images, log_mask_overlays
from wsss.viz import mask_panel_grid, save_png

MASK_DIR = "masks"
PANELS = "panels.png"


def train_rounds(cfg: Config) -> dict[str, Any]:
    """Every self-training round after the first, in order; the last one's record."""
    if cfg.segmenter.rounds < 2:
        echo("[wsss] segmenter_rounds: not used (segmenter.rounds=1)")
        return {"skipped": True, "not_used": True}
    record: dict[str, Any] = {}
    for index in range(2, cfg.segmenter.rounds + 1):
        record = train_round(cfg, index)
    return record


def round_masks(cfg: Config, index: int) -> Path:
    """The folder of the masks round ``index`` > 1 trains on."""
    return stage_dir(cfg, round_name(index)) / MASK_DIR


def train_round(cfg: Config, index: int) -> dict[str, Any]:
    """Round ``index`` > 1: masks from the previous round's segmenter, then a fresh segmenter."""
    if not 2 <= index <= cfg.segmenter.rounds:
        raise StageError(f"round {index} is not one of the rounds 2..{cfg.segmenter.rounds}")
    name = round_name(index)
    return run_stage(
        cfg,
        name,
        lambda logger: _run_round(cfg, index, logger),
        recorder=lambda logger, record: _record_round(cfg, index, logger),
    )


def compared_masks(cfg: Config, index: int) -> dict[str, Path]:
    """The mask folders a round's panels show: the masks round ``index`` - 1 trained on (left
    out where that was the data set's own ground truth), then round ``index``'s."""
    previous = segmenter_masks(cfg) if index == 2 else round_masks(cfg, index - 1)
    folders = {f"round {index - 1} masks": previous} if previous is not None else {}
    folders[f"round {index} masks"] = round_masks(cfg, index)
    return folders


def round_panel_items(cfg: Config, index: int, dataset) -> list[dict[str, Any]]:
    """The pseudo-mask stage's panel samples (``pseudo.num_panels``) with the masks of
    ``compared_masks``."""
    shown = set(panel_ids(dataset.ids, cfg.pseudo.num_panels))
    indices = [i for i, sample_id in enumerate(dataset.ids) if sample_id in shown]
    return mask_overlay_items(dataset, compared_masks(cfg, index), indices)


def _record_round(cfg: Config, index: int, logger: Any) -> None:
    name = round_name(index)
    log_checkpoint(cfg, name, logger)
    panels = stage_dir(cfg, name) / PANELS
    if not panels.is_file():
        return
    dataset = build_source(cfg, cfg.data.train_split)
    log_mask_overlays(
        logger, f"{name}/overlays", round_panel_items(cfg, index, dataset), dataset.all_class_names
    )
    log_images(logger, f"{name}/panels", [np.asarray(Image.open(panels))])


def _run_round(cfg: Config, index: int, logger: Any) -> dict[str, Any]:
    if cfg.pseudo.refine == "affinity":
        raise StageError(
            "segmenter.rounds > 1 refines the round masks in the image (pseudo.refine=par, crf "
            "or none); with pseudo.refine=affinity use segmenter.rounds=1"
        )
    masks = round_masks(cfg, index)
    results = write_round_masks(cfg, index, masks, logger)
    results.update(train_on_masks(cfg, masks, logger, stage=round_name(index)))
    return results


def write_round_masks(
    cfg: Config, index: int, out_dir: Path, logger: Any = False
) -> dict[str, Any]:
    """The previous round's masks of every training image not written yet, then their scores
    against the training ground truth (``masks_`` keys, rank zero, where ground truth exists)."""
    segmenter = load_segmenter(cfg, round_name(index - 1))
    p = cfg.pseudo
    module = RoundMaskModule(
        segmenter,
        refine=p.refine,
        refine_options={"iterations": p.par_iterations} if p.refine == "par" else {},
        ignore_band=p.ignore_band,
    )
    mean, std = segmenter.hparams.mean, segmenter.hparams.std
    dataset = build_source(cfg, cfg.data.train_split, mean=mean, std=std)
    done = done_ids([out_dir], dataset.ids)
    todo = [i for i, sample_id in enumerate(dataset.ids) if sample_id not in done]
    barrier()  # everyone has listed what is done before anyone writes more
    if todo:
        writer = SegmentationWriter(out_dir, confidence_dir=out_dir / CONFIDENCE_DIR)
        trainer = make_trainer(cfg, 1, logger, [writer], limit_predict_batches=None)
        trainer.predict(
            module,
            dataloaders=make_loader(Subset(dataset, todo), cfg, prediction_batch(cfg)),
            return_predictions=False,
        )
        if trainer.interrupted:
            raise StageError(
                f"{round_name(index)}: writing masks was interrupted; run the same command "
                f"again to finish the remaining images"
            )
    barrier()
    if not is_global_zero():
        return {}
    scores = score_mask_dir(dataset, out_dir)
    items = round_panel_items(cfg, index, dataset)
    if items:
        save_png(out_dir.parent / PANELS, mask_panel_grid(items, dataset.all_class_names))
    results = {f"masks_{key}": value for key, value in scores.items()}
    results.update(round=index, masks_written_now=len(todo))
    return results
