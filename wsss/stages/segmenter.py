"""Stage 3: the segmentation network (smp), trained on the masks ``segmenter.masks`` names:
the pseudo-masks, the data set's ground truth, or a directory of palette PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
from tqdm.auto import tqdm

from wsss.config import Config
from wsss.data.datamodule import StageDataModule, build_source
from wsss.data.imageio import DataError
from wsss.models.segmenter import SegmenterModule
from wsss.stages import registry
from wsss.stages.affinity import affinity_masks
from wsss.stages.records import StageError, read_stage, run_stage, stage_dir
from wsss.stages.registry import final_segmenter, training_masks_stage
from wsss.stages.trainer import fit_stage, load_trained, log_checkpoint


def segmenter_masks(cfg: Config) -> Optional[Path]:
    """The training-mask directory that ``segmenter.masks`` names (None: the data set's own)."""
    source = training_masks_stage(cfg)
    if source == "affinity":
        return affinity_masks(cfg)
    if source in ("pseudo_masks", "decoupled_pseudo_masks"):
        record = read_stage(cfg, source)
        if record is None or record.get("status") != "done":
            raise StageError(
                f"segmenter.masks=pseudo but {stage_dir(cfg, source)} is not "
                f"complete; run `wsss {registry.stage_named(source).command}` first, or train "
                f"on segmenter.masks=ground_truth"
            )
        return stage_dir(cfg, source)
    if cfg.segmenter.masks == "ground_truth":
        return None
    path = Path(cfg.segmenter.masks)
    if not path.is_dir():
        raise StageError(
            f"segmenter.masks: {path} is not a directory; use pseudo, ground_truth "
            f"or a directory of palette PNGs named <id>.png"
        )
    return path


def check_mask_dir(source, directory: Path, limit: int = 20) -> None:
    """Stop before training when masks are missing, of the wrong size or out of range."""
    problems = []
    missing = [i for i in source.ids if not (directory / f"{i}.png").is_file()]
    problems += [f"{i}: {directory / (i + '.png')} is missing" for i in missing]
    missing_set = set(missing)
    for index, sample_id in enumerate(
        tqdm(source.ids, desc=f"checking masks in {directory}", leave=False)
    ):
        if sample_id in missing_set:
            continue
        try:
            source.load(index)
        except DataError as exc:
            problems.append(f"{sample_id}: {exc}")
    if problems:
        shown = "\n  ".join(problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        raise DataError(
            f"mask directory {directory}: {len(problems)} bad or missing mask(s) out of "
            f"{len(source)}:\n  {shown}{more}"
        )


def train_segmenter(cfg: Config) -> dict[str, Any]:
    """Stage 3: the segmentation network on the masks that ``segmenter.masks`` names."""
    masks = segmenter_masks(cfg)
    return run_stage(
        cfg,
        "segmenter",
        lambda logger: train_on_masks(cfg, masks, logger),
        recorder=lambda logger, record: log_checkpoint(cfg, "segmenter", logger),
    )


def train_on_masks(
    cfg: Config, masks: Optional[Path], logger: Any, stage: str = "segmenter"
) -> dict[str, Any]:
    """A fresh segmenter trained on ``masks`` (None: the data set's own) into ``stage``'s
    folder, resumable from its last.ckpt: the segmenter stage and every self-training round."""
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    s = cfg.segmenter
    weighted = s.confidence_power > 0 or s.co_training
    if weighted and masks is None:
        key = "segmenter.co_training" if s.co_training else "segmenter.confidence_power"
        raise StageError(
            f"{key} reads each pseudo-mask's confidence, but segmenter.masks=ground_truth "
            f"has none; train on pseudo-masks or set {key}={'false' if s.co_training else 0}"
        )
    datamodule = StageDataModule(cfg, "segmenter", train_masks=masks, confidence=weighted)
    if masks is not None:
        plain = build_source(cfg, cfg.data.train_split, mean=datamodule.mean, std=datamodule.std)
        plain.use_masks_from(masks, confidence=weighted)
        check_mask_dir(plain, masks)
    module = SegmenterModule(
        num_classes=datamodule.num_foreground + 1,
        arch=s.arch,
        encoder=s.encoder,
        pretrained=s.pretrained,
        in_channels=cfg.data.channels,
        lr=s.lr,
        weight_decay=s.weight_decay,
        momentum=s.momentum,
        optimizer=s.optimizer,
        schedule=s.schedule,
        loss=s.loss,
        confidence_power=s.confidence_power,
        co_training=s.co_training,
        co_uncertain_fraction=s.co_uncertain_fraction,
        eval_scales=s.eval_scales,
        eval_flip=s.eval_flip,
        class_names=datamodule.train_set.all_class_names,
        mean=datamodule.mean,
        std=datamodule.std,
        num_panels=cfg.logger.num_panels,
    )
    results = fit_stage(cfg, stage, module, datamodule, s.max_epochs, logger)
    results["masks"] = str(masks) if masks is not None else "ground_truth"
    return results


def load_segmenter(cfg: Config, stage: Optional[str] = None) -> SegmenterModule:
    """The trained segmenter of the run (of its last self-training round, or of ``stage``), on
    the CPU, predicting with the config's test-time augmentation: evaluation's choice, not part
    of the trained segmenter."""
    module = load_trained(cfg, stage or final_segmenter(cfg), SegmenterModule)
    module.hparams.eval_scales = cfg.segmenter.eval_scales
    module.hparams.eval_flip = cfg.segmenter.eval_flip
    return module
