"""The stages, each resumable: train-classifier -> make-pseudo-masks -> train-segmenter ->
evaluate, and ``run`` (all of them plus the report).

Every stage owns a folder in the run directory with a ``stage.json`` that records the hash of
the config it depends on and, once finished, its results. A finished stage is skipped; a stage
whose folder was made with another config stops with a message instead of mixing outputs;
``run.overwrite=true`` redoes it. Training stages resume from ``last.ckpt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import ModelCheckpoint

from wsss.config import Config
from wsss.data.datamodule import StageDataModule, build_source, make_loader
from wsss.data.imageio import DataError
from wsss.io import read_json, write_json_atomic, write_text_atomic
from wsss.tracking import close_logger, make_logger

STAGES = ("classifier", "pseudo_masks", "segmenter", "evaluation")
# keys that change how a stage runs, never what it produces (cam.batch_size: maps are per image)
VOLATILE_KEYS = ("num_workers", "num_panels")


class StageError(RuntimeError):
    """A stage cannot run as asked; the message says why and what to do."""


# ------------------------------------------------------------------ bookkeeping


def config_hash(cfg: Config, *groups: str, extra: Any = None) -> str:
    """Hash of the config groups a stage depends on (worker counts and panels excluded)."""
    payload: dict[str, Any] = {}
    for group in groups:
        values = dataclasses.asdict(getattr(cfg, group))
        volatile = VOLATILE_KEYS + (("batch_size",) if group == "cam" else ())
        payload[group] = {k: v for k, v in values.items() if k not in volatile}
    payload["extra"] = extra
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def stage_hashes(cfg: Config) -> dict[str, str]:
    """Each stage's hash chains its inputs' hashes, so a change upstream invalidates downstream."""
    classifier = config_hash(cfg, "data", "classifier", extra=[cfg.run.seed, cfg.trainer.precision])
    pseudo = config_hash(cfg, "cam", "pseudo", extra=classifier)
    masks = pseudo if cfg.segmenter.masks == "pseudo" else cfg.segmenter.masks
    segmenter = config_hash(cfg, "data", "segmenter", extra=[masks, cfg.run.seed, cfg.trainer.precision])
    return {"classifier": classifier, "pseudo_masks": pseudo, "segmenter": segmenter,
            "evaluation": config_hash(cfg, "segmenter", extra=[segmenter, cfg.data.test_split])}


def stage_dir(cfg: Config, stage: str) -> Path:
    return cfg.run_dir / stage


def read_stage(cfg: Config, stage: str) -> Optional[dict[str, Any]]:
    path = stage_dir(cfg, stage) / "stage.json"
    return read_json(path) if path.is_file() else None


def begin_stage(cfg: Config, stage: str) -> Optional[dict[str, Any]]:
    """Return the finished record to skip, or prepare the folder and return None to run."""
    directory = stage_dir(cfg, stage)
    wanted = stage_hashes(cfg)[stage]
    if cfg.run.overwrite and directory.exists():
        shutil.rmtree(directory)
    record = read_stage(cfg, stage)
    if record is not None and record.get("config_hash") != wanted:
        raise StageError(
            f"{directory} was made with a different config (hash {record.get('config_hash')}, now "
            f"{wanted}). Redo it with run.overwrite=true, or pick another run.name")
    if record is not None and record.get("status") == "done":
        return record
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / "stage.json", {"stage": stage, "config_hash": wanted, "status": "running"})
    return None


def finish_stage(cfg: Config, stage: str, results: dict[str, Any], seconds: float) -> dict[str, Any]:
    record = {"stage": stage, "config_hash": stage_hashes(cfg)[stage], "status": "done",
              "seconds": round(seconds, 2), **results}
    write_json_atomic(stage_dir(cfg, stage) / "stage.json", record)
    return record


def save_config(cfg: Config) -> None:
    """The resolved config, always beside the run's outputs."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cfg.run_dir / "config.yaml", cfg.to_yaml())


def _limit(value: Optional[float]) -> Optional[float | int]:
    if value is None:
        return None
    return int(value) if value > 1 else value


def make_trainer(cfg: Config, max_epochs: int, logger: Any = False, callbacks: Optional[list] = None,
                 **overrides: Any) -> L.Trainer:
    """One Lightning Trainer per stage, from the ``trainer`` config group."""
    t = cfg.trainer
    options: dict[str, Any] = dict(
        accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, precision=t.precision,
        max_epochs=max_epochs, logger=logger, callbacks=callbacks or [],
        log_every_n_steps=t.log_every_n_steps, limit_train_batches=_limit(t.limit_train_batches),
        limit_val_batches=_limit(t.limit_val_batches), default_root_dir=str(cfg.run_dir),
        num_sanity_val_steps=0, enable_model_summary=False)
    options.update(overrides)
    return L.Trainer(**{k: v for k, v in options.items() if v is not None})


def _fit(cfg: Config, stage: str, module: L.LightningModule, datamodule: L.LightningDataModule,
         max_epochs: int) -> dict[str, Any]:
    """Fit with a last.ckpt written every epoch, resuming from it when present."""
    directory = stage_dir(cfg, stage)
    # one rolling checkpoint, overwritten every epoch: the resume point and the final weights
    checkpoint = ModelCheckpoint(dirpath=str(directory), filename="last", save_top_k=1, monitor=None,
                                 enable_version_counter=False)
    logger = make_logger(cfg, stage)
    trainer = make_trainer(cfg, max_epochs, logger, [checkpoint])
    last = directory / "last.ckpt"
    try:
        with warnings.catch_warnings():
            # the stage folder always holds stage.json beside the checkpoint: not a stale run
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
    finally:
        close_logger(logger)
    if trainer.interrupted:
        raise StageError(f"{stage} training was interrupted; run the same command again to resume "
                         f"from {last}")
    return {"epochs": trainer.current_epoch, "checkpoint": "last.ckpt",
            "metrics": dict(getattr(module, "last_val_scores", {}))}


# ------------------------------------------------------------------ stages


def train_classifier(cfg: Config) -> dict[str, Any]:
    """Stage 1: the multi-label classifier on image-level labels."""
    from wsss.models.classifier import ClassifierModule

    done = begin_stage(cfg, "classifier")
    if done is not None:
        return {**done, "skipped": True}
    started = time.perf_counter()
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    datamodule = StageDataModule(cfg, "classifier")
    c = cfg.classifier
    module = ClassifierModule(
        num_classes=datamodule.num_foreground, backbone=c.backbone, pretrained=c.pretrained,
        output_stride=c.output_stride, in_channels=cfg.data.channels, lr=c.lr,
        backbone_lr_mult=c.backbone_lr_mult, weight_decay=c.weight_decay, momentum=c.momentum,
        schedule=c.schedule, optimizer=c.optimizer, class_names=datamodule.train_set.class_names,
        mean=datamodule.mean, std=datamodule.std)
    results = _fit(cfg, "classifier", module, datamodule, c.max_epochs)
    return finish_stage(cfg, "classifier", results, time.perf_counter() - started)


def load_trained(cfg: Config, stage: str, module_class, command: str):
    """The finished stage's LightningModule from its checkpoint, on the CPU."""
    record = read_stage(cfg, stage)
    if record is None or record.get("status") != "done":
        raise StageError(f"no trained {stage} in {stage_dir(cfg, stage)}; run `wsss {command}` "
                         f"(or `wsss run`) first")
    return module_class.load_from_checkpoint(stage_dir(cfg, stage) / record["checkpoint"], map_location="cpu")


def load_classifier(cfg: Config):
    from wsss.models.classifier import ClassifierModule

    return load_trained(cfg, "classifier", ClassifierModule, "train-classifier")


def make_pseudo_masks(cfg: Config) -> dict[str, Any]:
    """Stage 2: Relevance-CAM pseudo-masks for the training split (see models/pseudo_labeler)."""
    done = begin_stage(cfg, "pseudo_masks")
    if done is not None:
        return {**done, "skipped": True}
    started = time.perf_counter()
    results = run_pseudo_stage(cfg, load_classifier(cfg), stage_dir(cfg, "pseudo_masks"))
    return finish_stage(cfg, "pseudo_masks", results, time.perf_counter() - started)


def _device(cfg: Config) -> "torch.device":
    import torch

    wants_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


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
    device = _device(cfg)
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


def segmenter_masks(cfg: Config) -> Optional[Path]:
    """The training-mask directory that ``segmenter.masks`` names (None: the data set's own)."""
    choice = cfg.segmenter.masks
    if choice == "ground_truth":
        return None
    if choice == "pseudo":
        record = read_stage(cfg, "pseudo_masks")
        if record is None or record.get("status") != "done":
            raise StageError(f"segmenter.masks=pseudo but {stage_dir(cfg, 'pseudo_masks')} is not "
                             f"complete; run `wsss make-pseudo-masks` first, or train on "
                             f"segmenter.masks=ground_truth")
        return stage_dir(cfg, "pseudo_masks")
    path = Path(choice)
    if not path.is_dir():
        raise StageError(f"segmenter.masks: {path} is not a directory; use pseudo, ground_truth "
                         f"or a directory of palette PNGs named <id>.png")
    return path


def check_mask_dir(source, directory: Path, limit: int = 20) -> None:
    """Stop before training when masks are missing, of the wrong size or out of range."""
    from tqdm.auto import tqdm

    problems = []
    missing = [i for i in source.ids if not (directory / f"{i}.png").is_file()]
    problems += [f"{i}: {directory / (i + '.png')} is missing" for i in missing]
    missing_set = set(missing)
    for index, sample_id in enumerate(tqdm(source.ids, desc=f"checking masks in {directory}",
                                           leave=False)):
        if sample_id in missing_set:
            continue
        try:
            source.load(index)
        except DataError as exc:
            problems.append(f"{sample_id}: {exc}")
    if problems:
        shown = "\n  ".join(problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        raise DataError(f"mask directory {directory}: {len(problems)} bad or missing mask(s) out of "
                        f"{len(source)}:\n  {shown}{more}")


def train_segmenter(cfg: Config) -> dict[str, Any]:
    """Stage 3: the segmentation network on the masks that ``segmenter.masks`` names."""
    from wsss.models.segmenter import SegmenterModule

    masks = segmenter_masks(cfg)
    done = begin_stage(cfg, "segmenter")
    if done is not None:
        return {**done, "skipped": True}
    started = time.perf_counter()
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    datamodule = StageDataModule(cfg, "segmenter", train_masks=masks)
    if masks is not None:
        plain = build_source(cfg, cfg.data.train_split, mean=datamodule.mean, std=datamodule.std)
        plain.use_masks_from(masks)
        check_mask_dir(plain, masks)
    s = cfg.segmenter
    module = SegmenterModule(
        num_classes=datamodule.num_foreground + 1, arch=s.arch, encoder=s.encoder,
        pretrained=s.pretrained, in_channels=cfg.data.channels, lr=s.lr, weight_decay=s.weight_decay,
        eval_scales=s.eval_scales, eval_flip=s.eval_flip,
        class_names=datamodule.train_set.all_class_names, mean=datamodule.mean, std=datamodule.std,
        num_panels=cfg.logger.num_panels)
    results = _fit(cfg, "segmenter", module, datamodule, s.max_epochs)
    results["masks"] = str(masks) if masks is not None else "ground_truth"
    return finish_stage(cfg, "segmenter", results, time.perf_counter() - started)


def load_segmenter(cfg: Config):
    from wsss.models.segmenter import SegmenterModule

    return load_trained(cfg, "segmenter", SegmenterModule, "train-segmenter")


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


# ------------------------------------------------------------------ report


def _named(values: Optional[list[float]], names: list[str]) -> Optional[dict[str, float]]:
    if values is None:
        return None
    return {name: round(float(v), 4) for name, v in zip(names, values)}


def build_report(cfg: Config) -> dict[str, Any]:
    """report.json: the headline numbers of every finished stage (DESIGN.md contract)."""
    records = {stage: read_stage(cfg, stage) or {} for stage in STAGES}
    pseudo, evaluation = records["pseudo_masks"], records["evaluation"]
    names = evaluation.get("class_names") or pseudo.get("class_names") or []
    return {
        "run": cfg.run.name,
        "data": cfg.data.name,
        "cam_method": cfg.cam.method,
        "seed_miou": pseudo.get("seed_miou"),
        "pseudo_miou": pseudo.get("pseudo_miou"),
        "seg_miou": evaluation.get("miou"),
        "per_class_iou": _named(evaluation.get("per_class_iou"), names),
        "pseudo_per_class_iou": _named(pseudo.get("pseudo_per_class_iou"), names),
        "seed_per_class_iou": _named(pseudo.get("seed_per_class_iou"), names),
        "thresholds": pseudo.get("thresholds"),
        "ignore_fraction": pseudo.get("ignore_fraction"),
        "classifier": records["classifier"].get("metrics"),
        "stage_seconds": {stage: records[stage].get("seconds") for stage in STAGES},
        "segmenter_masks": records["segmenter"].get("masks"),
    }


def report_markdown(report: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return "n/a" if value is None else (f"{100 * value:.1f}" if isinstance(value, float) else str(value))

    lines = [f"# wsss report: {report['run']}", "",
             f"data `{report['data']}`, CAM method `{report['cam_method']}`, segmenter trained on "
             f"`{report['segmenter_masks']}` masks.", "",
             "| stage | mIoU (%) |", "|---|---|",
             f"| seeds (fixed threshold, train split) | {fmt(report['seed_miou'])} |",
             f"| pseudo-masks (calibrated, train split) | {fmt(report['pseudo_miou'])} |",
             f"| segmenter (val split) | {fmt(report['seg_miou'])} |", ""]
    tables = [("seeds", report["seed_per_class_iou"]), ("pseudo-masks", report["pseudo_per_class_iou"]),
              ("segmenter", report["per_class_iou"])]
    names = next((list(t) for _, t in tables if t), [])
    if names:
        lines += ["## Per-class IoU (%)", "", "| class | " + " | ".join(n for n, _ in tables) + " |",
                  "|---|" + "---|" * len(tables)]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(fmt((t or {}).get(name)) for _, t in tables) + " |")
        lines.append("")
    thresholds = report.get("thresholds") or {}
    if thresholds:
        lines += ["## Thresholds", "", f"method `{thresholds.get('method')}`, objective "
                  f"`{thresholds.get('objective')}`, global {thresholds.get('global')}", ""]
        per_class = thresholds.get("per_class") or {}
        pairs = thresholds.get("pairs") or {}
        if per_class:
            lines += ["| class | threshold | calibration pairs |", "|---|---|---|"]
            lines += [f"| {k} | {v:.3f} | {pairs.get(k, 'n/a')} |" for k, v in per_class.items()]
            if thresholds.get("low_confidence_pairs"):
                lines.append(f"\n{thresholds['low_confidence_pairs']} (image, class) pairs left out: the "
                             f"classifier scored them under pseudo.min_confidence on the whole image.")
            lines.append("")
    lines += ["## Stage times", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v if v is not None else 'n/a'} |" for k, v in report["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


def write_report(cfg: Config) -> dict[str, Any]:
    report = build_report(cfg)
    write_json_atomic(cfg.run_dir / "report.json", report)
    write_text_atomic(cfg.run_dir / "report.md", report_markdown(report))
    return report


STAGE_FUNCTIONS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "classifier": train_classifier, "pseudo_masks": make_pseudo_masks,
    "segmenter": train_segmenter, "evaluation": evaluate,
}


def run_all(cfg: Config, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """All stages in order, skipping finished ones, then report.json / report.md."""
    save_config(cfg)
    for stage, function in STAGE_FUNCTIONS.items():
        result = function(cfg)
        echo(f"[wsss] {stage}: {'skipped (already done)' if result.get('skipped') else 'done'} "
             f"in {result.get('seconds')} s")
    report = write_report(cfg)
    echo(f"[wsss] report: {cfg.run_dir / 'report.json'}")
    return report
