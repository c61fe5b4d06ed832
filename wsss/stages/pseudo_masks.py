"""Stage 2: pseudo-masks.

1. Thresholds are calibrated Libra-style on training images, without pixel labels: the
   classifier is queried on masked copies through ``Trainer.predict`` (models/calibration), on
   the configured devices and sharded over processes; every process's answers are merged from
   files and the thresholds chosen once (``stages/calibration.py``).
2. Relevance-CAM maps become label PNGs through ``Trainer.predict`` and a writer callback
   (models/pseudo_labeler), resuming past finished images; each image is written once.
3. On global rank zero: seeds and pseudo-masks are scored from the written files wherever
   ground truth exists, the panel grid (``wsss.viz.pseudo_panel_grid``) is drawn and the
   manifest written.

Every process meets the others at a barrier after each predict and before reading what rank
zero wrote, so ``ddp`` (every process runs this code) and ``ddp_spawn`` (only the main one does)
both work.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Subset

from wsss.config import Config
from wsss.data.datamodule import build_source, make_loader
from wsss.data.imageio import DataError, read_mask
from wsss.distributed import barrier, is_global_zero
from wsss.io import read_json, write_json_atomic
from wsss.models.pseudo_labeler import IMAGE_REFINEMENTS, PseudoMaskModule
from wsss.models.pseudo_writer import (
    AFFINITY_LABEL_DIR,
    CALIBRATED_DIR,
    PANEL_DIR,
    RANK_DIR,
    SEED_DIR,
    PseudoMaskWriter,
)
from wsss.stages.calibration import (  # noqa: F401 (LIBRARY_FILE re-exported beside the stage)
    LIBRARY_FILE,
    calibrate_thresholds,
    pseudo_module_options,
    reference_library,
)
from wsss.stages.classifier import load_classifier
from wsss.stages.records import StageError, run_stage, stage_dir, stage_hashes
from wsss.stages.scoring import score_mask_dir
from wsss.stages.trainer import make_trainer
from wsss.tracking import log_artifact, log_images, log_mask_overlays, log_table
from wsss.viz import pseudo_panel_grid, save_png


def make_pseudo_masks(cfg: Config) -> dict[str, Any]:
    """Stage 2: calibrated Relevance-CAM pseudo-masks for the training split."""
    return run_stage(
        cfg,
        "pseudo_masks",
        lambda logger: run_pseudo_stage(
            cfg, load_classifier(cfg), stage_dir(cfg, "pseudo_masks"), logger
        ),
        recorder=lambda logger, record: record_pseudo_stage(cfg, logger, record),
    )


def mask_steps(cfg: Config, out_dir: Path) -> dict[str, Path]:
    """Where the pseudo-mask stage writes each scored step: seeds, calibrated masks ("pseudo")
    and, after in-image refinement, the refined masks the segmenter trains on; with
    ``pseudo.affinity_labels`` set, the refined masks the affinity stage learns from."""
    if cfg.pseudo.refine in IMAGE_REFINEMENTS:
        return {"seed": out_dir / SEED_DIR, "pseudo": out_dir / CALIBRATED_DIR, "refined": out_dir}
    steps = {"seed": out_dir / SEED_DIR, "pseudo": out_dir}
    if (labels_dir := affinity_labels_dir(cfg, out_dir)) is not None:
        steps["affinity_labels"] = labels_dir
    return steps


def affinity_labels_dir(cfg: Config, out_dir: Path) -> Optional[Path]:
    """The folder of the refined masks the affinity stage learns from; None where it learns from
    the calibrated masks themselves (or the run has no affinity stage)."""
    p = cfg.pseudo
    if p.refine != "affinity" or p.affinity_labels == "calibrated":
        return None
    return out_dir / AFFINITY_LABEL_DIR


def pseudo_module(
    cfg: Config,
    classifier,
    thresholds: Optional[torch.Tensor] = None,
    library=None,
    layer_weights: Optional[list[float]] = None,
):
    """The pseudo-mask LightningModule around the trained classifier's network; layer_weights
    (calibrated ones) replace cam.layer_weights when given."""
    options = pseudo_module_options(cfg, classifier, library)
    if layer_weights is not None:
        options["layer_weights"] = layer_weights
    return PseudoMaskModule(classifier.export(), thresholds=thresholds, **options)


def done_ids(directories: list[Path], ids: list[str]) -> set[str]:
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


def run_pseudo_stage(
    cfg: Config, classifier, out_dir: Path, logger: Any = False, stage: str = "pseudo_masks"
) -> dict[str, Any]:
    """Calibrate, predict (resuming past finished images), then score, panel and manifest;
    ``stage``: whose hash the manifest records (this stage, or the context-decoupling round)."""
    library = reference_library(cfg, classifier, out_dir)
    thresholds = calibrate_thresholds(cfg, classifier, out_dir, library)
    names = list(classifier.hparams.class_names)
    per_class = torch.tensor([thresholds["per_class"][n] for n in names])
    module = pseudo_module(cfg, classifier, per_class, library, thresholds.get("layer_weights"))

    dataset = build_source(
        cfg, cfg.data.train_split, mean=classifier.hparams.mean, std=classifier.hparams.std
    )
    steps = mask_steps(cfg, out_dir)
    done = done_ids(list(steps.values()), dataset.ids)
    todo = [i for i, sample_id in enumerate(dataset.ids) if sample_id not in done]
    shown = panel_ids(dataset.ids, cfg.pseudo.num_panels)
    # the affinity stage walks the saved maps
    save_maps = cfg.pseudo.save_maps or cfg.pseudo.refine == "affinity"
    writer = PseudoMaskWriter(out_dir, save_maps=save_maps, panel_ids=shown)
    barrier()  # everyone has listed what is done before anyone writes more
    started = time.perf_counter()
    if todo:
        trainer = make_trainer(cfg, 1, logger, [writer], inference_mode=False)
        trainer.predict(
            module,
            dataloaders=make_loader(Subset(dataset, todo), cfg, cfg.cam.batch_size),
            return_predictions=False,
        )
        if trainer.interrupted:
            raise StageError(
                "pseudo-mask stage interrupted; run the same command again to "
                "finish the remaining images"
            )
    barrier()
    seconds = time.perf_counter() - started
    if not is_global_zero():
        return {}
    results: dict[str, Any] = {
        "count": len(dataset),
        "written_now": len(todo),
        "images_per_second": round(len(todo) / max(seconds, 1e-9), 2),
        "thresholds": thresholds,
        "class_names": ["background", *names],
        "rank_counts": _collect_rank_counts(out_dir / RANK_DIR),
    }
    for step, directory in steps.items():
        results.update(_step_scores(step, score_mask_dir(dataset, directory)))
    final = "refined" if "refined" in steps else "pseudo"
    results["ignore_fraction"] = results[f"{final}_ignore_fraction"]
    if cfg.pseudo.score_split and cfg.pseudo.score_split != cfg.data.train_split:
        results["scored_on"] = _scores_on_split(cfg, dataset, out_dir, cfg.pseudo.score_split)
    panels = [
        torch.load(out_dir / PANEL_DIR / f"{i}.pt", weights_only=False)
        for i in shown
        if (out_dir / PANEL_DIR / f"{i}.pt").is_file()
    ]
    results["panel_ids"] = [item["id"] for item in panels]
    if panels:
        grid = pseudo_panel_grid(panels, cfg.cam.layers, ["background", *names])
        save_png(out_dir / "panels.png", grid)
    write_json_atomic(
        out_dir / "manifest.json",
        {
            "config_hash": stage_hashes(cfg)[stage],
            "count": len(dataset),
            "thresholds": thresholds,
            "complete": True,
        },
    )
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


def record_pseudo_stage(
    cfg: Config, logger: Any, record: dict[str, Any], stage: str = "pseudo_masks"
) -> None:
    """Thresholds and per-class scores as tables, the panel samples as mask overlays, the panel
    grid, and the pseudo-mask set (with manifest and thresholds) as an artifact; ``stage``:
    this stage, or the context-decoupling round."""
    out_dir = stage_dir(cfg, stage)
    names = record.get("class_names") or []
    thresholds = record.get("thresholds") or {}
    pairs = thresholds.get("pairs") or {}
    sources = thresholds.get("sources") or {}
    log_table(
        logger,
        "pseudo/thresholds",
        ["class", "threshold", "calibration pairs", "source"],
        [
            [name, value, pairs.get(name), sources.get(name, thresholds.get("method"))]
            for name, value in (thresholds.get("per_class") or {}).items()
        ],
    )
    steps = [step for step in ("seed", "pseudo", "refined") if record.get(f"{step}_per_class_iou")]
    log_table(
        logger,
        "pseudo/per_class_iou",
        ["class", *steps],
        [
            [name, *[record[f"{step}_per_class_iou"][c] for step in steps]]
            for c, name in enumerate(names)
        ],
    )
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
    log_artifact(
        logger,
        f"{cfg.run.name}-{stage.replace('_', '-')}",
        "dataset",
        files=[out_dir / "manifest.json", out_dir / "thresholds.json"],
        references=[out_dir],
        max_objects=3 * int(record.get("count", 0)) + 1000,
    )


def _collect_rank_counts(directory: Path) -> dict[str, int]:
    """Images written by each predict process in this call (then the reports are removed)."""
    counts = {}
    for path in sorted(directory.glob("rank_*.json")):
        counts[path.stem] = int(read_json(path)["written"])
        path.unlink()
    if directory.is_dir():
        directory.rmdir()
    return counts
