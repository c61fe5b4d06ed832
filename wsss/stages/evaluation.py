"""Stage 4: evaluation. The trained segmenter predicts the val split (and the test split, if
any) as palette PNGs, each process writing its share; global rank zero then scores the files
against the ground truth (mIoU, Dice, accuracies)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from wsss.config import Config
from wsss.data.datamodule import build_source, make_loader
from wsss.distributed import barrier, is_global_zero
from wsss.models.prediction_writer import SegmentationWriter
from wsss.stages.mask_overlays import mask_overlay_items
from wsss.stages.records import run_stage, stage_dir
from wsss.stages.scoring import score_mask_dir
from wsss.stages.segmenter import load_segmenter
from wsss.stages.trainer import make_trainer
from wsss.tracking import log_mask_overlays, log_table


def prediction_batch(cfg: Config) -> int:
    """Images per predict batch: sources of one image size batch; others go one image at a
    time (full size, no padding for the network to see)."""
    return cfg.data.batch_size if cfg.data.name in ("synthetic", "synthetic_lesion") else 1


def _predict_split(
    cfg: Config, module, split: str, out_dir: Path, logger: Any = False
) -> Optional[dict[str, Any]]:
    """Write the split's predictions (and, with ``segmenter.eval_crf``, their CRF-refined form
    in ``<split>_crf``); their scores (rank zero, where ground truth exists), the CRF's under
    ``crf_`` keys."""
    mean, std = module.hparams.mean, module.hparams.std
    dataset = build_source(cfg, split, mean=mean, std=std)
    batch = prediction_batch(cfg)
    crf_dir = out_dir.with_name(f"{out_dir.name}_crf")
    writer = SegmentationWriter(out_dir, {"pred_crf": crf_dir} if module.eval_crf else None)
    trainer = make_trainer(cfg, 1, logger, callbacks=[writer], limit_predict_batches=None)
    trainer.predict(module, dataloaders=make_loader(dataset, cfg, batch), return_predictions=False)
    barrier()
    if not (is_global_zero() and dataset.has_masks):
        return None
    scores = score_mask_dir(dataset, out_dir)
    if module.eval_crf:
        scores.update(
            {
                f"crf_{k}": v
                for k, v in score_mask_dir(dataset, crf_dir).items()
                if k != "ignore_fraction"
            }
        )
    return scores if scores.get("miou") is not None else None


def evaluate(cfg: Config) -> dict[str, Any]:
    """Stage 4: segmenter scores on the val split; predictions of val (and test) as palette PNGs."""
    return run_stage(
        cfg,
        "evaluation",
        lambda logger: _evaluate(cfg, logger),
        recorder=lambda logger, record: _record(cfg, logger, record),
    )


def _evaluate(cfg: Config, logger: Any) -> dict[str, Any]:
    module = load_segmenter(cfg)  # the last round's, with the config's test-time augmentation
    module.eval_crf = cfg.segmenter.eval_crf
    directory = stage_dir(cfg, "evaluation")
    results: dict[str, Any] = {"class_names": list(module.hparams.class_names or [])}
    scores = _predict_split(cfg, module, cfg.data.val_split, directory / cfg.data.val_split, logger)
    if scores is not None:
        results.update(
            split=cfg.data.val_split, **{k: v for k, v in scores.items() if k != "ignore_fraction"}
        )
    if cfg.data.test_split:
        _predict_split(cfg, module, cfg.data.test_split, directory / cfg.data.test_split, logger)
        results["test_predictions"] = str(directory / cfg.data.test_split)
    return results


def _record(cfg: Config, logger: Any, record: dict[str, Any], overlays: int = 8) -> None:
    """Per-class IoU / Dice as a table, and the first val predictions over their images."""
    names = record.get("class_names") or []
    iou, dice = record.get("per_class_iou") or [], record.get("per_class_dice") or []
    log_table(
        logger,
        "evaluation/per_class",
        ["class", "IoU", "Dice"],
        [
            [name, iou[c] if c < len(iou) else None, dice[c] if c < len(dice) else None]
            for c, name in enumerate(names)
        ],
    )
    source = build_source(cfg, cfg.data.val_split)
    directory = stage_dir(cfg, "evaluation") / cfg.data.val_split
    items = mask_overlay_items(source, {"prediction": directory}, range(min(overlays, len(source))))
    log_mask_overlays(logger, "evaluation/overlays", items, names)
