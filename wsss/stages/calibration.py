"""The pseudo-mask stage's calibration: per-class thresholds chosen Libra-style on training images,
without pixel labels, and (cam.method=libra) the reference library the maps are made with.

The classifier is queried on masked copies through ``Trainer.predict`` (models/calibration), on
the configured devices and sharded over processes; every process's answers are merged from files
and the thresholds chosen once, by global rank zero. Calibration scores the maps the stage writes,
so both build their module from the same options (``pseudo_module_options``).
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import Subset

from wsss.cam.expansion import MapExpansion
from wsss.cam.libra import LibrarySettings, ReferenceLibrary, library_for, model_fingerprint
from wsss.config import Config
from wsss.data.datamodule import build_source, make_loader
from wsss.data.negatives import with_negatives
from wsss.distributed import barrier, is_global_zero
from wsss.io import atomic_path, read_json, write_json_atomic
from wsss.models.calibration import CalibrationModule, ConfidenceCollector, merge_confidences
from wsss.models.pseudo_labeler import IMAGE_REFINEMENTS
from wsss.pseudo.calibrate import ThresholdCalibrator
from wsss.pseudo.fusion_weights import choose_weights, simplex_candidates, weighting_scores
from wsss.stages.records import StageError
from wsss.stages.trainer import make_trainer, stage_device

CALIBRATION_DIR = ".calibration"
LIBRARY_FILE = "libra_library.pt"
WEIGHTS_FILE = "layer_weights.json"


def pseudo_module_options(cfg: Config, classifier, library=None) -> dict[str, Any]:
    """The PseudoMaskModule keywords the config and the classifier define (thresholds aside);
    ``library``: the Libra-CAM reference library (``reference_library``) when cam.method=libra."""
    c, p = cfg.cam, cfg.pseudo
    refine = (
        p.refine if p.refine in IMAGE_REFINEMENTS else "none"
    )  # the affinity walk is a stage of its own
    affinity_labels = (
        p.affinity_labels if p.refine == "affinity" and p.affinity_labels != "calibrated" else None
    )
    uses_par = "par" in (refine, affinity_labels)
    options = {"iterations": p.par_iterations} if uses_par else {}
    return dict(
        method=c.method,
        layers=c.layers,
        preset=c.preset,
        layer_weights=c.layer_weights,
        scales=c.scales,
        flip=c.flip,
        normalize=c.normalize,
        seed_threshold=p.threshold,
        ignore_band=p.ignore_band,
        refine=refine,
        refine_options=options,
        affinity_labels=affinity_labels,
        mean=classifier.hparams.mean,
        std=classifier.hparams.std,
        library=library,
        expansion=MapExpansion(
            fine_layer=c.fine_layer,
            fine_power=c.fine_power,
            fine_smooth=c.fine_smooth,
            erase_steps=c.erase_steps,
            erase_score_floor=c.erase_score_floor,
            erase_threshold=c.erase_threshold,
        ),
    )


def library_settings(cfg: Config) -> LibrarySettings:
    """The Libra-CAM library settings the config defines (cam.layers, cam.libra_*)."""
    return LibrarySettings(
        layers=tuple(cfg.cam.layers),
        references=cfg.cam.libra_references,
        bound=cfg.cam.libra_bound,
        bound_mode=cfg.cam.libra_bound_mode,
        negative_quantile=cfg.cam.libra_negative_quantile,
    )


def training_images(cfg: Config, classifier):
    """The training split the Libra library is drawn from, followed by the ``data.negatives``
    images (all-zero labels: a reference candidate for every class), without augmentation."""
    split = build_source(
        cfg, cfg.data.train_split, mean=classifier.hparams.mean, std=classifier.hparams.std
    )
    return with_negatives(split, cfg.data.negatives)


def reference_library(cfg: Config, classifier, out_dir: Path) -> Optional[ReferenceLibrary]:
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
        dataset = training_images(cfg, classifier)
        library, built = library_for(
            model,
            lambda: make_loader(dataset, cfg, cfg.cam.batch_size),
            library_settings(cfg),
            model_fingerprint(classifier.export()),
            stored,
            progress=True,
        )
        library = library.to("cpu")
        if built:
            with atomic_path(path) as tmp:
                torch.save(library.state_dict(), tmp)
    barrier()  # every process checks the same library, so none is left waiting when it is unusable
    if library is None:
        library = ReferenceLibrary.from_state_dict(
            torch.load(path, map_location="cpu", weights_only=True)
        )
    empty = [
        name
        for name, count in zip(classifier.hparams.class_names, library.counts.tolist())
        if count == 0
    ]
    if empty:
        raise StageError(_no_references_message(cfg, empty))
    return library


def _no_references_message(cfg: Config, empty: list[str]) -> str:
    """Why the classes ``empty`` got no Libra references, and what to change."""
    if cfg.cam.libra_bound_mode == "absolute":
        return (
            f"cam.method=libra: no training image scored below cam.libra_bound="
            f"{cfg.cam.libra_bound} for {empty}, so these classes have no references; "
            "raise cam.libra_bound or train the classifier longer"
        )
    return (
        f"cam.method=libra: no training image is labelled without {empty}, so these classes "
        "have no references (Libra-CAM needs negative images of every class); add images "
        "without them to the training split or choose another cam.method"
    )


def calibration_subset(cfg: Config, dataset) -> Subset:
    """The ``pseudo.calibration_images`` training images calibration looks at (seeded choice)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.run.seed))
    return Subset(dataset, order[: min(cfg.pseudo.calibration_images, len(dataset))].tolist())


def thresholds_from_confidences(
    cfg: Config, names: list[str], confidences: dict[str, torch.Tensor], images: int
) -> dict[str, Any]:
    """Per-class thresholds (thresholds.json) from every process's masked-query answers."""
    p = cfg.pseudo
    calibrator = ThresholdCalibrator(
        p.grid,
        p.objective,
        p.rho,
        len(names),
        p.threshold,
        min_confidence=p.min_confidence,
        delta=p.delta,
        fallback=p.fallback,
        shrinkage=p.shrinkage,
    )
    if confidences["base"].numel():
        base = confidences["base"][:, None]  # one slot per row: (S, 1)
        calibrator.update_from_confidences(
            confidences["keep"][:, None],
            confidences["delete"][:, None],
            base,
            confidences["class_index"][:, None],
            torch.ones_like(base, dtype=torch.bool),
        )
    per_class = calibrator.compute()
    return {
        "method": "libra",
        "objective": p.objective,
        "global": round(calibrator.global_threshold(), 4),
        "per_class": {n: round(float(t), 4) for n, t in zip(names, per_class)},
        "images": images,
        "pairs": dict(zip(names, calibrator.pairs_per_class())),
        "sources": dict(zip(names, calibrator.sources())),
        "fallback": p.fallback,
        "low_confidence_pairs": calibrator.skipped,
    }


def _query_subset(
    cfg: Config, classifier, out_dir: Path, library, **module_options: Any
) -> Optional[dict[str, torch.Tensor]]:
    """The calibration subset's masked-query answers, merged from every process (global rank
    zero; None elsewhere). module_options override ``pseudo_module_options``."""
    p = cfg.pseudo
    dataset = build_source(
        cfg, cfg.data.train_split, mean=classifier.hparams.mean, std=classifier.hparams.std
    )
    subset = calibration_subset(cfg, dataset)
    shards = out_dir / CALIBRATION_DIR
    options = {**pseudo_module_options(cfg, classifier, library), **module_options}
    module = CalibrationModule(
        classifier.export(), grid=p.grid, min_confidence=p.min_confidence, **options
    )
    trainer = make_trainer(cfg, 1, False, [ConfidenceCollector(shards)], inference_mode=False)
    trainer.predict(
        module, dataloaders=make_loader(subset, cfg, cfg.cam.batch_size), return_predictions=False
    )
    barrier()
    merged = None
    if is_global_zero():
        merged = merge_confidences(shards)
        merged["images"] = torch.tensor(len(subset))
        shutil.rmtree(shards)
    barrier()
    return merged


def calibrate_layer_weights(cfg: Config, classifier, out_dir: Path, library=None) -> dict[str, Any]:
    """pseudo.fusion_weights=calibrated: the layer weights chosen by masked queries on the
    calibration images (``wsss.pseudo.fusion_weights``), with every candidate's score; stored
    as ``layer_weights.json`` so every process reads the same choice."""
    path = out_dir / WEIGHTS_FILE
    if not path.is_file():
        started = time.perf_counter()
        answers = _query_subset(cfg, classifier, out_dir, library, search_weights=True)
        if is_global_zero():
            candidates = simplex_candidates(len(cfg.cam.layers))
            scores = (
                weighting_scores(answers["keep"], answers["delete"], answers["base"])
                if answers["base"].numel()
                else torch.full((len(candidates),), float("nan"))
            )
            write_json_atomic(
                path,
                {
                    "layer_weights": choose_weights(scores, candidates),
                    "layers": list(cfg.cam.layers),
                    "candidates": candidates,
                    "scores": [round(float(v), 4) for v in scores],
                    "seconds": round(time.perf_counter() - started, 1),
                },
            )
        barrier()
    return read_json(path)


def calibrate_thresholds(
    cfg: Config, classifier, out_dir: Path, library: Optional[ReferenceLibrary] = None
) -> dict[str, Any]:
    """thresholds.json: reused when an earlier attempt wrote it, otherwise calibrated (or fixed),
    on the maps fused with the calibrated layer weights when pseudo.fusion_weights=calibrated
    (then recorded as ``layer_weights``; the stage fuses its maps with them)."""
    path = out_dir / "thresholds.json"
    if path.is_file():  # calibrated before an interruption: reuse, don't redo
        return read_json(path)
    names = list(classifier.hparams.class_names)
    p = cfg.pseudo
    fusion: dict[str, Any] = {}
    if p.fusion_weights == "calibrated":
        searched = calibrate_layer_weights(cfg, classifier, out_dir, library)
        fusion = {"layer_weights": searched["layer_weights"]}
    if p.calibration == "fixed":
        thresholds = {
            "method": "fixed",
            "objective": None,
            "global": p.threshold,
            "per_class": {n: p.threshold for n in names},
            "images": 0,
            **fusion,
        }
        if is_global_zero():
            write_json_atomic(path, thresholds)
        barrier()
        return thresholds
    started = time.perf_counter()
    answers = _query_subset(cfg, classifier, out_dir, library, **fusion)
    if is_global_zero():
        images = int(answers.pop("images"))
        thresholds = thresholds_from_confidences(cfg, names, answers, images)
        thresholds["seconds"] = round(time.perf_counter() - started, 1)
        write_json_atomic(path, {**thresholds, **fusion})
    barrier()
    return read_json(path)
