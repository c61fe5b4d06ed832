"""Stage 4: evaluation. The trained segmenter predicts the val split (and the test split, if
any) as palette PNGs, scored with mIoU where ground truth exists."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

from wsss.config import Config
from wsss.data.datamodule import build_source, make_loader
from wsss.stages.base import begin_stage, finish_stage, make_trainer, stage_dir
from wsss.stages.segmenter import load_segmenter


def _predict_split(cfg: Config, module, split: str, out_dir: Path) -> Optional[dict[str, Any]]:
    from wsss.models.prediction_writer import SegmentationWriter

    mean, std = module.hparams.mean, module.hparams.std
    dataset = build_source(cfg, split, mean=mean, std=std)
    batch = cfg.data.batch_size if cfg.data.name == "synthetic" else 1  # full size, no padding
    writer = SegmentationWriter(out_dir, module.hparams.num_classes)
    trainer = make_trainer(cfg, 1, callbacks=[writer], limit_predict_batches=None)
    trainer.predict(module, dataloaders=make_loader(dataset, cfg, batch, shuffle=False),
                    return_predictions=False)
    return writer.scores()


def evaluate(cfg: Config) -> dict[str, Any]:
    """Stage 4: segmenter mIoU on the val split; predictions of val (and test) as palette PNGs."""
    done = begin_stage(cfg, "evaluation")
    if done is not None:
        return {**done, "skipped": True}
    started = time.perf_counter()
    module = load_segmenter(cfg)
    results: dict[str, Any] = {"class_names": list(module.hparams.class_names or [])}
    scores = _predict_split(cfg, module, cfg.data.val_split, stage_dir(cfg, "evaluation") / cfg.data.val_split)
    if scores is not None:
        results.update(split=cfg.data.val_split, miou=scores["miou"], per_class_iou=scores["per_class_iou"])
    if cfg.data.test_split:
        _predict_split(cfg, module, cfg.data.test_split, stage_dir(cfg, "evaluation") / cfg.data.test_split)
        results["test_predictions"] = str(stage_dir(cfg, "evaluation") / cfg.data.test_split)
    return finish_stage(cfg, "evaluation", results, time.perf_counter() - started)
