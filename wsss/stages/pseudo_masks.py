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

import copy
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Subset

from wsss.cam import LibrarySettings, ReferenceLibrary, library_for
from wsss.cam.libra import model_fingerprint
from wsss.config import Config
from wsss.data.datamodule import build_source, make_loader
from wsss.data.imageio import DataError, read_mask
from wsss.data.masks import colorize, voc_palette
from wsss.distributed import barrier, is_global_zero
from wsss.io import atomic_path, read_json, write_json_atomic
from wsss.models.calibration import CalibrationModule, ConfidenceCollector, merge_confidences
from wsss.models.pseudo_labeler import (CALIBRATED_DIR, IMAGE_REFINEMENTS, PANEL_DIR, RANK_DIR, SEED_DIR,
                                        PseudoMaskModule, PseudoMaskWriter)
from wsss.pseudo.calibrate import ThresholdCalibrator
from wsss.stages.classifier import load_classifier
from wsss.stages.records import StageError, run_stage, stage_dir, stage_hashes
from wsss.stages.scoring import score_mask_dir
from wsss.stages.trainer import make_trainer, stage_device
from wsss.tracking import log_artifact, log_images, log_mask_overlays, log_table
from wsss.viz import (annotate, blank_like, color_legend, heatmap, mask_overlay, overlay, panel_grid, save_png,
                      stack_rows)

CALIBRATION_DIR = ".calibration"
LIBRARY_FILE = "libra_library.pt"


def make_pseudo_masks(cfg: Config) -> dict[str, Any]:
    """Stage 2: calibrated Relevance-CAM pseudo-masks for the training split."""
    return run_stage(cfg, "pseudo_masks",
                     lambda logger: run_pseudo_stage(cfg, load_classifier(cfg), stage_dir(cfg, "pseudo_masks"), logger),
                     recorder=lambda logger, record: record_pseudo_stage(cfg, logger, record))


def pseudo_module_options(cfg: Config, classifier, library=None) -> dict[str, Any]:
    """The PseudoMaskModule keywords the config and the classifier define (thresholds aside);
    ``library``: the Libra-CAM reference library (``reference_library``) when cam.method=libra."""
    c, p = cfg.cam, cfg.pseudo
    refine = p.refine if p.refine in IMAGE_REFINEMENTS else "none"  # the affinity walk is a stage of its own
    options = {"iterations": p.par_iterations} if refine == "par" else {}
    return dict(method=c.method, layers=c.layers, preset=c.preset, layer_weights=c.layer_weights,
                scales=c.scales, flip=c.flip, normalize=c.normalize, seed_threshold=p.threshold,
                ignore_band=p.ignore_band, refine=refine, refine_options=options,
                mean=classifier.hparams.mean, std=classifier.hparams.std, library=library)


def mask_steps(cfg: Config, out_dir: Path) -> dict[str, Path]:
    """Where the pseudo-mask stage writes each scored step: seeds, calibrated masks ("pseudo")
    and, after in-image refinement, the refined masks the segmenter trains on."""
    if cfg.pseudo.refine in IMAGE_REFINEMENTS:
        return {"seed": out_dir / SEED_DIR, "pseudo": out_dir / CALIBRATED_DIR, "refined": out_dir}
    return {"seed": out_dir / SEED_DIR, "pseudo": out_dir}


def pseudo_module(cfg: Config, classifier, thresholds: Optional[torch.Tensor] = None, library=None):
    """The pseudo-mask LightningModule around the trained classifier's network."""
    return PseudoMaskModule(classifier.export(), thresholds=thresholds,
                            **pseudo_module_options(cfg, classifier, library))


def library_settings(cfg: Config):
    """The Libra-CAM library settings the config defines (cam.layers, cam.libra_*)."""
    return LibrarySettings(layers=tuple(cfg.cam.layers), references=cfg.cam.libra_references,
                           bound=cfg.cam.libra_bound)


def reference_library(cfg: Config, classifier, out_dir: Path):
    """cam.method=libra: the reference library, built once per classifier from the training split
    (no augmentation, on the stage's device, with a progress bar) by global rank zero and stored
    as ``libra_library.pt`` with its settings and the classifier's fingerprint; reused while both
    match (a resumed stage), rebuilt when either changes. None for the other methods."""
    if cfg.cam.method != "libra":
        return None
    path = out_dir / LIBRARY_FILE
    library = None
    if is_global_zero():
        stored = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
        model = copy.deepcopy(classifier.export()).eval().to(stage_device(cfg))
        dataset = build_source(cfg, cfg.data.train_split, mean=classifier.hparams.mean, std=classifier.hparams.std)
        library, built = library_for(model, lambda: make_loader(dataset, cfg, cfg.cam.batch_size),
                                     library_settings(cfg), model_fingerprint(classifier.export()), stored,
                                     progress=True)
        library = library.to("cpu")
        if built:
            with atomic_path(path) as tmp:
                torch.save(library.state_dict(), tmp)
    barrier()  # every process checks the same library, so none is left waiting when it is unusable
    if library is None:
        library = ReferenceLibrary.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    empty = [name for name, count in zip(classifier.hparams.class_names, library.counts.tolist()) if count == 0]
    if empty:
        raise StageError(f"cam.method=libra: no training image scored below cam.libra_bound="
                         f"{cfg.cam.libra_bound} for {empty}, so these classes have no references; "
                         "raise cam.libra_bound or train the classifier longer")
    return library


def calibration_subset(cfg: Config, dataset) -> Subset:
    """The ``pseudo.calibration_images`` training images calibration looks at (seeded choice)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.run.seed))
    return Subset(dataset, order[: min(cfg.pseudo.calibration_images, len(dataset))].tolist())


def thresholds_from_confidences(cfg: Config, names: list[str], confidences: dict[str, torch.Tensor],
                                images: int) -> dict[str, Any]:
    """Per-class thresholds (thresholds.json) from every process's masked-query answers."""
    p = cfg.pseudo
    calibrator = ThresholdCalibrator(p.grid, p.objective, p.rho, len(names), p.threshold,
                                     min_confidence=p.min_confidence, delta=p.delta, fallback=p.fallback,
                                     shrinkage=p.shrinkage)
    if confidences["base"].numel():
        base = confidences["base"][:, None]  # one slot per row: (S, 1)
        calibrator.update_from_confidences(confidences["keep"][:, None], confidences["delete"][:, None], base,
                                           confidences["class_index"][:, None], torch.ones_like(base, dtype=torch.bool))
    per_class = calibrator.compute()
    return {"method": "libra", "objective": p.objective, "global": round(calibrator.global_threshold(), 4),
            "per_class": {n: round(float(t), 4) for n, t in zip(names, per_class)},
            "images": images, "pairs": dict(zip(names, calibrator.pairs_per_class())),
            "sources": dict(zip(names, calibrator.sources())), "fallback": p.fallback,
            "low_confidence_pairs": calibrator.skipped}


def calibrate_thresholds(cfg: Config, classifier, out_dir: Path, library=None) -> dict[str, Any]:
    """thresholds.json: reused when an earlier attempt wrote it, otherwise calibrated (or fixed)."""
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
                               **pseudo_module_options(cfg, classifier, library))
    trainer = make_trainer(cfg, 1, False, [ConfidenceCollector(shards)], inference_mode=False)
    trainer.predict(module, dataloaders=make_loader(subset, cfg, cfg.cam.batch_size), return_predictions=False)
    barrier()
    if is_global_zero():
        thresholds = thresholds_from_confidences(cfg, names, merge_confidences(shards), len(subset))
        write_json_atomic(path, thresholds)
        shutil.rmtree(shards)
    barrier()
    return read_json(path)


def _done_ids(directories: list[Path], ids: list[str]) -> set[str]:
    """Images whose masks of every step are already written and readable."""
    done = set()
    for sample_id in ids:
        paths = [directory / f"{sample_id}.png" for directory in directories]
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


def run_pseudo_stage(cfg: Config, classifier, out_dir: Path, logger: Any = False) -> dict[str, Any]:
    """Calibrate, predict (resuming past finished images), then score, panel and manifest."""
    library = reference_library(cfg, classifier, out_dir)
    thresholds = calibrate_thresholds(cfg, classifier, out_dir, library)
    names = list(classifier.hparams.class_names)
    per_class = torch.tensor([thresholds["per_class"][n] for n in names])
    module = pseudo_module(cfg, classifier, per_class, library)

    dataset = build_source(cfg, cfg.data.train_split, mean=classifier.hparams.mean, std=classifier.hparams.std)
    steps = mask_steps(cfg, out_dir)
    done = _done_ids(list(steps.values()), dataset.ids)
    todo = [i for i, sample_id in enumerate(dataset.ids) if sample_id not in done]
    shown = panel_ids(dataset.ids, cfg.pseudo.num_panels)
    # the affinity stage walks the saved maps
    save_maps = cfg.pseudo.save_maps or cfg.pseudo.refine == "affinity"
    writer = PseudoMaskWriter(out_dir, save_maps=save_maps, panel_ids=shown)
    barrier()  # everyone has listed what is done before anyone writes more
    started = time.perf_counter()
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
    results: dict[str, Any] = {
        "count": len(dataset), "written_now": len(todo), "images_per_second": round(len(todo) / max(seconds, 1e-9), 2),
        "thresholds": thresholds, "class_names": ["background", *names],
        "rank_counts": _collect_rank_counts(out_dir / RANK_DIR)}
    for step, directory in steps.items():
        results.update(_step_scores(step, score_mask_dir(dataset, directory)))
    final = "refined" if "refined" in steps else "pseudo"
    results["ignore_fraction"] = results[f"{final}_ignore_fraction"]
    if cfg.pseudo.score_split and cfg.pseudo.score_split != cfg.data.train_split:
        results["scored_on"] = _scores_on_split(cfg, dataset, out_dir, cfg.pseudo.score_split)
    panels = [torch.load(out_dir / PANEL_DIR / f"{i}.pt", weights_only=False) for i in shown
              if (out_dir / PANEL_DIR / f"{i}.pt").is_file()]
    results["panel_ids"] = [item["id"] for item in panels]
    if panels:
        grid = pseudo_panel_grid(panels, cfg.cam.layers, ["background", *names])
        save_png(out_dir / "panels.png", grid)
    write_json_atomic(out_dir / "manifest.json", {"config_hash": stage_hashes(cfg)["pseudo_masks"],
                                                  "count": len(dataset), "thresholds": thresholds,
                                                  "complete": True})
    return results


def _step_scores(step: str, scores: dict[str, Any]) -> dict[str, Any]:
    """``score_mask_dir`` keys under the step's name: seed_miou, seed_per_class_iou, ..."""
    return {f"{step}_{key}": value for key, value in scores.items()}


def _scores_on_split(cfg: Config, dataset, out_dir: Path, split: str) -> dict[str, Any]:
    """Seed and pseudo-mask scores on the pseudo-labelled images that also belong to ``split``
    (VOC: the 1,464 ``train`` images with SegmentationClass ground truth, as published tables
    report them)."""
    members = set(build_source(cfg, split).ids)
    subset = [i for i, sample_id in enumerate(dataset.ids) if sample_id in members]
    view = _SubsetSource(dataset, subset)
    scores: dict[str, Any] = {"split": split, "images": len(subset)}
    for step, directory in mask_steps(cfg, out_dir).items():
        scores.update(_step_scores(step, score_mask_dir(view, directory)))
    return scores


class _SubsetSource:
    """The part of a data source that ``score_mask_dir`` reads, restricted to some indices."""

    def __init__(self, source, indices: list[int]) -> None:
        self.source, self.indices = source, indices
        self.num_classes, self.has_masks = source.num_classes, source.has_masks

    def __len__(self) -> int:
        return len(self.indices)

    def load_raw(self, index: int):
        return self.source.load_raw(self.indices[index])


def record_pseudo_stage(cfg: Config, logger: Any, record: dict[str, Any]) -> None:
    """Thresholds and per-class scores as tables, the panel samples as mask overlays, the panel
    grid, and the pseudo-mask set (with manifest and thresholds) as an artifact."""
    out_dir = stage_dir(cfg, "pseudo_masks")
    names = record.get("class_names") or []
    thresholds = record.get("thresholds") or {}
    pairs = thresholds.get("pairs") or {}
    sources = thresholds.get("sources") or {}
    log_table(logger, "pseudo/thresholds", ["class", "threshold", "calibration pairs", "source"],
              [[name, value, pairs.get(name), sources.get(name, thresholds.get("method"))]
               for name, value in (thresholds.get("per_class") or {}).items()])
    steps = [step for step in ("seed", "pseudo", "refined") if record.get(f"{step}_per_class_iou")]
    log_table(logger, "pseudo/per_class_iou", ["class", *steps],
              [[name, *[record[f"{step}_per_class_iou"][c] for step in steps]] for c, name in enumerate(names)])
    items = []
    for sample_id in record.get("panel_ids") or []:
        item = torch.load(out_dir / PANEL_DIR / f"{sample_id}.pt", weights_only=False)
        masks = {"seeds": item["seeds"].numpy(), "pseudo": item["pseudo"].numpy()}
        if item.get("calibrated") is not None:
            masks["calibrated"] = item["calibrated"].numpy()
        if item["mask"] is not None:
            masks["ground_truth"] = item["mask"].numpy()
        items.append({"image": item["display"], "caption": str(sample_id), "masks": masks})
    log_mask_overlays(logger, "pseudo/overlays", items, names)
    if (out_dir / "panels.png").is_file():
        log_images(logger, "pseudo/panels", [np.asarray(Image.open(out_dir / "panels.png"))])
    log_artifact(logger, f"{cfg.run.name}-pseudo-masks", "dataset",
                 files=[out_dir / "manifest.json", out_dir / "thresholds.json"], references=[out_dir],
                 max_objects=3 * int(record.get("count", 0)) + 1000)


def _collect_rank_counts(directory: Path) -> dict[str, int]:
    """Images written by each predict process in this call (then the reports are removed)."""
    counts = {}
    for path in sorted(directory.glob("rank_*.json")):
        counts[path.stem] = int(read_json(path)["written"])
        path.unlink()
    if directory.is_dir():
        directory.rmdir()
    return counts


def pseudo_panel_grid(panels: list[dict[str, Any]], layers: list[str], class_names: list[str]) -> np.ndarray:
    """One row per (sample, present class): the image, that class's map at each layer and fused
    (the class named in each heatmap), then, on the sample's first row, the seeds, the calibrated
    and (after refinement) the refined masks over the image at 50 %, the final mask and the
    ground truth; a colour legend with the class names below. ``class_names`` includes
    background."""
    refined = any(item.get("calibrated") is not None for item in panels)
    rows = []
    for item in panels:
        image = item["display"]
        truth = colorize(item["mask"].numpy()) if item["mask"] is not None else annotate(blank_like(image), "none")
        steps = [item["seeds"]] + ([item["calibrated"]] if refined else []) + [item["pseudo"]]
        masks = [mask_overlay(image, step.numpy()) for step in steps] + [colorize(item["pseudo"].numpy()), truth]
        classes = item["classes"]
        for k, label in enumerate(classes or [None]):
            name = class_names[label] if label is not None else "no class"
            maps = [item["layers"][n][k] for n in layers] + [item["fused"][k]] if label is not None else []
            heat = [annotate(overlay(image, heatmap(m.numpy())), name) for m in maps] or \
                [annotate(blank_like(image), name)] * (len(layers) + 1)
            first = annotate(image, str(item["id"])) if k == 0 else blank_like(image)
            rows.append([first, *heat, *(masks if k == 0 else [blank_like(image)] * len(masks))])
    steps = ["seeds", "calibrated", "refined"] if refined else ["seeds", "pseudo"]
    grid = panel_grid(rows, ["image", *layers, "fused", *steps, "final mask", "ground truth"])
    palette = np.asarray(voc_palette(), np.uint8).reshape(256, 3)
    legend = color_legend([*class_names, "ignore"], palette[[*range(len(class_names)), 255]], grid.shape[1])
    return stack_rows(grid, legend)
