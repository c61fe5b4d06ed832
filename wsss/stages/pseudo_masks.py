"""Stage 2: pseudo-masks.

1. Thresholds are calibrated Libra-style on training images, without pixel labels: the
   classifier is queried on masked copies through ``Trainer.predict`` (models/calibration), on
   the configured devices and sharded over processes; every process's answers are merged from
   files and the thresholds chosen once.
2. Relevance-CAM maps become label PNGs through ``Trainer.predict`` and a writer callback
   (models/pseudo_labeler), resuming past finished images; each image is written once.
3. On global rank zero: seeds and pseudo-masks are scored from the written files wherever
   ground truth exists, the panel grid is drawn and the manifest written.

Every process meets the others at a barrier after each predict and before reading what rank
zero wrote, so ``ddp`` (every process runs this code) and ``ddp_spawn`` (only the main one does)
both work.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Subset

from wsss.config import Config
from wsss.data.datamodule import build_source, make_loader
from wsss.data.imageio import DataError, read_mask
from wsss.io import read_json, write_json_atomic
from wsss.stages.base import (StageError, barrier, is_global_zero, make_trainer, run_stage, stage_dir,
                              stage_hashes)
from wsss.stages.classifier import load_classifier
from wsss.stages.scoring import score_mask_dir
from wsss.tracking import close_logger, log_images, make_logger

CALIBRATION_DIR = ".calibration"


def make_pseudo_masks(cfg: Config) -> dict[str, Any]:
    """Stage 2: calibrated Relevance-CAM pseudo-masks for the training split."""
    return run_stage(cfg, "pseudo_masks",
                     lambda: run_pseudo_stage(cfg, load_classifier(cfg), stage_dir(cfg, "pseudo_masks")))


def pseudo_module_options(cfg: Config, classifier) -> dict[str, Any]:
    """The PseudoMaskModule keywords the config and the classifier define (thresholds aside)."""
    c, p = cfg.cam, cfg.pseudo
    return dict(method=c.method, layers=c.layers, preset=c.preset, layer_weights=c.layer_weights,
                scales=c.scales, flip=c.flip, normalize=c.normalize, seed_threshold=p.threshold,
                ignore_band=p.ignore_band, crf=p.crf, mean=classifier.hparams.mean, std=classifier.hparams.std)


def pseudo_module(cfg: Config, classifier, thresholds: Optional[torch.Tensor] = None):
    """The pseudo-mask LightningModule around the trained classifier's network."""
    from wsss.models.pseudo_labeler import PseudoMaskModule

    return PseudoMaskModule(classifier.export(), thresholds=thresholds, **pseudo_module_options(cfg, classifier))


def calibration_subset(cfg: Config, dataset) -> Subset:
    """The ``pseudo.calibration_images`` training images calibration looks at (seeded choice)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.run.seed))
    return Subset(dataset, order[: min(cfg.pseudo.calibration_images, len(dataset))].tolist())


def thresholds_from_confidences(cfg: Config, names: list[str], confidences: dict[str, torch.Tensor],
                                images: int) -> dict[str, Any]:
    """Per-class thresholds (thresholds.json) from every process's masked-query answers."""
    from wsss.pseudo.calibrate import ThresholdCalibrator

    p = cfg.pseudo
    calibrator = ThresholdCalibrator(p.grid, p.objective, p.rho, len(names), p.threshold,
                                     min_confidence=p.min_confidence, delta=p.delta)
    if confidences["base"].numel():
        base = confidences["base"][:, None]  # one slot per row: (S, 1)
        calibrator.update_from_confidences(confidences["keep"][:, None], confidences["delete"][:, None], base,
                                           confidences["class_index"][:, None], torch.ones_like(base, dtype=torch.bool))
    per_class = calibrator.compute()
    return {"method": "libra", "objective": p.objective, "global": round(calibrator.global_threshold(), 4),
            "per_class": {n: round(float(t), 4) for n, t in zip(names, per_class)},
            "images": images, "pairs": dict(zip(names, calibrator.pairs_per_class())),
            "low_confidence_pairs": calibrator.skipped}


def calibrate_thresholds(cfg: Config, classifier, out_dir: Path) -> dict[str, Any]:
    """thresholds.json: reused when an earlier attempt wrote it, otherwise calibrated (or fixed)."""
    from wsss.models.calibration import CalibrationModule, ConfidenceCollector, merge_confidences

    path = out_dir / "thresholds.json"
    if path.is_file():  # calibrated before an interruption: reuse, don't redo
        return read_json(path)
    names = list(classifier.hparams.class_names)
    p = cfg.pseudo
    if p.calibration == "fixed":
        thresholds = {"method": "fixed", "objective": None, "global": p.threshold,
                      "per_class": {n: p.threshold for n in names}, "images": 0}
        if is_global_zero():
            write_json_atomic(path, thresholds)
        barrier()
        return thresholds
    dataset = build_source(cfg, cfg.data.train_split, mean=classifier.hparams.mean, std=classifier.hparams.std)
    subset = calibration_subset(cfg, dataset)
    shards = out_dir / CALIBRATION_DIR
    module = CalibrationModule(classifier.export(), grid=p.grid, min_confidence=p.min_confidence,
                               **pseudo_module_options(cfg, classifier))
    trainer = make_trainer(cfg, 1, False, [ConfidenceCollector(shards)], inference_mode=False)
    trainer.predict(module, dataloaders=make_loader(subset, cfg, cfg.cam.batch_size), return_predictions=False)
    barrier()
    if is_global_zero():
        thresholds = thresholds_from_confidences(cfg, names, merge_confidences(shards), len(subset))
        write_json_atomic(path, thresholds)
        shutil.rmtree(shards)
    barrier()
    return read_json(path)


def _done_ids(directory: Path, ids: list[str]) -> set[str]:
    """Images whose pseudo-mask and seed are already written and readable."""
    from wsss.models.pseudo_labeler import SEED_DIR

    done = set()
    for sample_id in ids:
        paths = [directory / f"{sample_id}.png", directory / SEED_DIR / f"{sample_id}.png"]
        try:
            if all(p.is_file() for p in paths):
                for path in paths:
                    read_mask(path)
                done.add(sample_id)
        except DataError:
            continue
    return done


def panel_ids(ids: list[str], count: int) -> list[str]:
    """``count`` ids spread evenly over the split: the same whether or not the stage resumed."""
    if count <= 0 or not ids:
        return []
    count = min(count, len(ids))
    return [ids[(i * len(ids)) // count] for i in range(count)]


def run_pseudo_stage(cfg: Config, classifier, out_dir: Path) -> dict[str, Any]:
    """Calibrate, predict (resuming past finished images), then score, panel and manifest."""
    from wsss.models.pseudo_labeler import PANEL_DIR, RANK_DIR, SEED_DIR, PseudoMaskWriter

    thresholds = calibrate_thresholds(cfg, classifier, out_dir)
    names = list(classifier.hparams.class_names)
    per_class = torch.tensor([thresholds["per_class"][n] for n in names])
    module = pseudo_module(cfg, classifier, per_class)

    dataset = build_source(cfg, cfg.data.train_split, mean=classifier.hparams.mean, std=classifier.hparams.std)
    done = _done_ids(out_dir, dataset.ids)
    todo = [i for i, sample_id in enumerate(dataset.ids) if sample_id not in done]
    shown = panel_ids(dataset.ids, cfg.pseudo.num_panels)
    writer = PseudoMaskWriter(out_dir, save_maps=cfg.pseudo.save_maps, panel_ids=shown)
    barrier()  # everyone has listed what is done before anyone writes more
    logger = make_logger(cfg, "pseudo_masks")
    started = time.perf_counter()
    try:
        if todo:
            trainer = make_trainer(cfg, 1, logger, [writer], inference_mode=False)
            trainer.predict(module, dataloaders=make_loader(Subset(dataset, todo), cfg, cfg.cam.batch_size),
                            return_predictions=False)
            if trainer.interrupted:
                raise StageError("pseudo-mask stage interrupted; run the same command again to "
                                 "finish the remaining images")
        barrier()
        seconds = time.perf_counter() - started
        if not is_global_zero():
            return {}
        rank_counts = _collect_rank_counts(out_dir / RANK_DIR)
        pseudo_scores = score_mask_dir(dataset, out_dir)
        seed_scores = score_mask_dir(dataset, out_dir / SEED_DIR)
        panels = [torch.load(out_dir / PANEL_DIR / f"{i}.pt", weights_only=False) for i in shown
                  if (out_dir / PANEL_DIR / f"{i}.pt").is_file()]
        if panels:
            from wsss.viz import save_png

            grid = pseudo_panel_grid(panels, classifier.hparams.mean, classifier.hparams.std, cfg.cam.layers)
            save_png(out_dir / "panels.png", grid)
            log_images(logger, "pseudo/panels", [grid], ["image | layers | fused | pseudo | ground truth"])
    finally:
        close_logger(logger)
    results = {
        "count": len(dataset), "written_now": len(todo), "images_per_second": round(len(todo) / max(seconds, 1e-9), 2),
        "thresholds": thresholds, "class_names": ["background", *names],
        "seed_miou": seed_scores.get("miou"), "seed_per_class_iou": seed_scores.get("per_class_iou"),
        "pseudo_miou": pseudo_scores.get("miou"), "pseudo_per_class_iou": pseudo_scores.get("per_class_iou"),
        "ignore_fraction": pseudo_scores["ignore_fraction"], "rank_counts": rank_counts,
        "panel_ids": [item["id"] for item in panels],
    }
    write_json_atomic(out_dir / "manifest.json", {"config_hash": stage_hashes(cfg)["pseudo_masks"],
                                                  "count": len(dataset), "thresholds": thresholds,
                                                  "complete": True})
    return results


def _collect_rank_counts(directory: Path) -> dict[str, int]:
    """Images written by each predict process in this call (then the reports are removed)."""
    counts = {}
    for path in sorted(directory.glob("rank_*.json")):
        counts[path.stem] = int(read_json(path)["written"])
        path.unlink()
    if directory.is_dir():
        directory.rmdir()
    return counts


def pseudo_panel_grid(panels: list[dict[str, Any]], mean, std, layers: list[str]):
    """image | map per layer | fused | pseudo-mask | ground truth, one row per sample."""
    from wsss.data.masks import colorize
    from wsss.viz import denormalise, heatmap, overlay, panel_grid

    rows = []
    for item in panels:
        image = denormalise(item["image"], mean, std)
        first = (lambda maps: maps[0].numpy() if len(maps) else np.zeros(image.shape[:2], np.float32))
        row = [image] + [overlay(image, heatmap(first(item["layers"][n]))) for n in layers]
        row += [overlay(image, heatmap(first(item["fused"]))), colorize(item["pseudo"].numpy())]
        row.append(colorize(item["mask"].numpy()) if item["mask"] is not None else np.zeros_like(image))
        rows.append(row)
    return panel_grid(rows, ["image", *layers, "fused", "pseudo", "ground truth"])
