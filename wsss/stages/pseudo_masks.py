"""Stage 2: pseudo-masks. Thresholds are calibrated Libra-style on training images (no pixel
labels), then Relevance-CAM maps become label PNGs through ``Trainer.predict`` and a writer
callback (models/pseudo_labeler), resuming past finished images. Seeds and pseudo-masks are
scored from the written files wherever ground truth exists."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from wsss.config import Config
from wsss.data.datamodule import build_source, make_loader
from wsss.data.imageio import DataError
from wsss.io import read_json, write_json_atomic
from wsss.stages.base import (StageError, begin_stage, finish_stage, make_trainer, stage_device,
                              stage_dir, stage_hashes)
from wsss.stages.classifier import load_classifier
from wsss.tracking import close_logger, make_logger


def make_pseudo_masks(cfg: Config) -> dict[str, Any]:
    """Stage 2: Relevance-CAM pseudo-masks for the training split (see models/pseudo_labeler)."""
    done = begin_stage(cfg, "pseudo_masks")
    if done is not None:
        return {**done, "skipped": True}
    started = time.perf_counter()
    results = run_pseudo_stage(cfg, load_classifier(cfg), stage_dir(cfg, "pseudo_masks"))
    return finish_stage(cfg, "pseudo_masks", results, time.perf_counter() - started)


def _pseudo_module(cfg: Config, classifier, thresholds=None):
    from wsss.models.pseudo_labeler import PseudoMaskModule

    c, p = cfg.cam, cfg.pseudo
    return PseudoMaskModule(
        classifier.export(), method=c.method, layers=c.layers, preset=c.preset,
        layer_weights=c.layer_weights, scales=c.scales, flip=c.flip, normalize=c.normalize,
        thresholds=thresholds,
        seed_threshold=p.threshold, ignore_band=p.ignore_band, crf=p.crf,
        mean=classifier.hparams.mean, std=classifier.hparams.std)


def calibrate_thresholds(cfg: Config, classifier) -> dict[str, Any]:
    """Per-class thresholds from the classifier queried on masked training images (no pixels)."""
    import torch
    from torch.utils.data import Subset
    from tqdm.auto import tqdm

    from wsss.pseudo.calibrate import ThresholdCalibrator

    names = list(classifier.hparams.class_names)
    p = cfg.pseudo
    if p.calibration == "fixed":
        return {"method": "fixed", "objective": None, "global": p.threshold,
                "per_class": {n: p.threshold for n in names}, "images": 0}
    device = stage_device(cfg)
    module = _pseudo_module(cfg, classifier).to(device)
    dataset = build_source(cfg, cfg.data.train_split, mean=classifier.hparams.mean, std=classifier.hparams.std)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.run.seed))
    subset = Subset(dataset, order[: min(p.calibration_images, len(dataset))].tolist())
    calibrator = ThresholdCalibrator(p.grid, p.objective, p.rho, len(names), p.threshold,
                                     min_confidence=p.min_confidence, delta=p.delta)
    loader = make_loader(subset, cfg, cfg.cam.batch_size, shuffle=False)
    for batch in tqdm(loader, desc="calibrating thresholds", leave=False):
        images, labels = batch["image"].to(device), batch["labels"].to(device)
        maps = module.fused_maps(images, labels, batch["size"])
        calibrator.update(module.model, images, maps["fused"], maps["targets"], maps["valid"])
    per_class = calibrator.compute()
    return {"method": "libra", "objective": p.objective, "global": round(calibrator.global_threshold(), 4),
            "per_class": {n: round(float(t), 4) for n, t in zip(names, per_class)},
            "images": len(subset), "pairs": dict(zip(names, calibrator.pairs_per_class())),
            "low_confidence_pairs": calibrator.skipped}


def _done_ids(directory: Path, ids: list[str]) -> set[str]:
    """Images whose pseudo-mask and seed are already written and readable."""
    from wsss.data.imageio import read_mask
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


def score_mask_dir(source, directory: Path) -> dict[str, Any]:
    """mIoU, per-class IoU and the ignored share of pseudo / seed PNGs against ground truth."""
    import torch
    from tqdm.auto import tqdm

    from wsss.data.imageio import read_mask
    from wsss.metrics import IoUMeter

    meter = IoUMeter(source.num_classes)
    ignored = total = 0
    for index in tqdm(range(len(source)), desc=f"scoring {directory.name}", leave=False):
        raw = source.load_raw(index)
        pred = read_mask(directory / f"{raw.id}.png")
        ignored += int((pred == 255).sum())
        total += pred.size
        if raw.mask is not None:  # ignored pixels count as background, as IRN scores its labels
            scored = np.where(pred == 255, 0, pred)
            meter.update(torch.from_numpy(scored).long()[None], torch.from_numpy(raw.mask).long()[None])
    result = {"ignore_fraction": round(ignored / max(1, total), 4)}
    if source.has_masks:
        result.update(meter.compute())
    return result


def run_pseudo_stage(cfg: Config, classifier, out_dir: Path) -> dict[str, Any]:
    """Calibrate, predict (resuming past finished images), score, panel, manifest."""
    import torch
    from torch.utils.data import Subset

    from wsss.models.pseudo_labeler import RANK_DIR, SEED_DIR, PseudoMaskWriter

    manifest_path = out_dir / "manifest.json"
    calibration_path = out_dir / "thresholds.json"
    if calibration_path.is_file():  # calibrated before an interruption: reuse, don't redo
        thresholds = read_json(calibration_path)
    else:
        thresholds = calibrate_thresholds(cfg, classifier)
        write_json_atomic(calibration_path, thresholds)
    names = list(classifier.hparams.class_names)
    per_class = torch.tensor([thresholds["per_class"][n] for n in names])
    module = _pseudo_module(cfg, classifier, per_class)

    dataset = build_source(cfg, cfg.data.train_split, mean=classifier.hparams.mean, std=classifier.hparams.std)
    done = _done_ids(out_dir, dataset.ids)
    todo = [i for i, sample_id in enumerate(dataset.ids) if sample_id not in done]
    writer = PseudoMaskWriter(out_dir, save_maps=cfg.pseudo.save_maps, num_panels=cfg.pseudo.num_panels)
    logger = make_logger(cfg, "pseudo_masks")
    started = time.perf_counter()
    try:
        if todo:
            trainer = make_trainer(cfg, 1, logger, [writer], inference_mode=False)
            trainer.predict(module, dataloaders=make_loader(Subset(dataset, todo), cfg, cfg.cam.batch_size,
                                                            shuffle=False), return_predictions=False)
            if trainer.interrupted:
                raise StageError("pseudo-mask stage interrupted; run the same command again to "
                                 "finish the remaining images")
        seconds = time.perf_counter() - started
        rank_counts = _collect_rank_counts(out_dir / RANK_DIR)
        pseudo_scores = score_mask_dir(dataset, out_dir)
        seed_scores = score_mask_dir(dataset, out_dir / SEED_DIR)
        if writer.panels:
            from wsss.viz import save_png

            grid = pseudo_panel_grid(writer.panels, classifier.hparams.mean, classifier.hparams.std,
                                     cfg.cam.layers)
            save_png(out_dir / "panels.png", grid)
            from wsss.tracking import log_images

            log_images(logger, "pseudo/panels", [grid], ["image | layers | fused | pseudo | ground truth"])
    finally:
        close_logger(logger)
    results = {
        "count": len(dataset), "written_now": len(todo), "images_per_second": round(len(todo) / max(seconds, 1e-9), 2),
        "thresholds": thresholds, "class_names": ["background", *names],
        "seed_miou": seed_scores.get("miou"), "seed_per_class_iou": seed_scores.get("per_class_iou"),
        "pseudo_miou": pseudo_scores.get("miou"), "pseudo_per_class_iou": pseudo_scores.get("per_class_iou"),
        "ignore_fraction": pseudo_scores["ignore_fraction"], "rank_counts": rank_counts,
    }
    write_json_atomic(manifest_path, {"config_hash": stage_hashes(cfg)["pseudo_masks"], "count": len(dataset),
                                      "thresholds": thresholds, "complete": True})
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
        row = [image] + [overlay(image, heatmap(item["layers"][n].numpy())) for n in layers]
        row += [overlay(image, heatmap(item["fused"].numpy())), colorize(item["pseudo"])]
        row.append(colorize(item["mask"]) if item["mask"] is not None else np.zeros_like(image))
        rows.append(row)
    return panel_grid(rows, ["image", *layers, "fused", "pseudo", "ground truth"])
