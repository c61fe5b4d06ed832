"""The one logging path: a Lightning logger per stage, chosen by ``logger.kind``, and what each
stage records in it once it is done.

- ``wandb``: offline by default, under the run directory (``wandb sync <run dir>/wandb/offline-run-*``
  uploads later). Each stage is its own wandb run; the stages of one run directory share a group
  (``run.name`` plus a short id, kept in ``tracking.json`` beside the outputs) and each stage keeps
  its wandb run id there, so a resumed stage continues its own wandb run. A stage's summary holds
  its numbers, tables (thresholds, per-class scores), mask overlays with class labels, and
  artifacts (checkpoints, the pseudo-mask set, the report) referenced by path, not copied.
- ``csv``: the same scalars in ``logs/<stage>/metrics.csv``.
- ``none``: nothing.
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from wsss.config import Config
from wsss.distributed import is_global_zero
from wsss.io import read_json, write_json_atomic

# ``wandb`` itself is imported inside the functions that need it: it is heavy (seconds) and only
# used with logger.kind=wandb

TRACKING_FILE = "tracking.json"


def _identity(cfg: Config) -> dict[str, Any]:
    """The run directory's tracking identity: its wandb group and each stage's wandb run id."""
    path = cfg.run_dir / TRACKING_FILE
    if path.is_file():
        return read_json(path)
    return {"group": f"{cfg.run.name}-{secrets.token_hex(3)}", "runs": {}}


def _save_identity(cfg: Config, identity: dict[str, Any]) -> None:
    if is_global_zero():
        write_json_atomic(cfg.run_dir / TRACKING_FILE, identity)


def wandb_run_id(cfg: Config, stage: str) -> str:
    """The stage's wandb run id, made once and kept, so a resumed stage continues its run."""
    identity = _identity(cfg)
    run_id = identity["runs"].get(stage)
    if run_id is None:
        run_id = f"{cfg.run.name}-{stage}-{secrets.token_hex(4)}".replace("_", "-")
        identity["runs"][stage] = run_id
        _save_identity(cfg, identity)
    return run_id


def make_logger(cfg: Config, stage: str) -> Union[Logger, bool]:
    """WandbLogger, CSVLogger or False (no logger) for one stage."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.logger.kind == "wandb":
        import wandb  # heavy, and only needed when logger.kind=wandb

        run_id = wandb_run_id(cfg, stage)
        # silent: the console keeps one line per stage; report.md lists the run folders to sync
        return WandbLogger(
            name=f"{cfg.run.name}-{stage}",
            id=run_id,
            resume="allow",
            project=cfg.logger.project,
            save_dir=str(run_dir),
            mode=cfg.logger.wandb_mode,
            group=_identity(cfg)["group"],
            job_type=stage,
            config=cfg.to_dict(),
            settings=wandb.Settings(silent=True),
        )
    if cfg.logger.kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="logs", version=stage)
    return False


def close_logger(logger: Union[Logger, bool]) -> None:
    """Finish the wandb run of a stage so the next stage starts its own; flush CSV files."""
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish()
        logger._experiment = None
    elif isinstance(logger, CSVLogger):
        logger.save()


def lr_monitor(logger: Union[Logger, bool]) -> list:
    """A learning-rate curve per optimizer group, where there is a logger to draw it."""
    return [LearningRateMonitor(logging_interval="step")] if logger else []


def flat_scalars(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of a nested dict as ``a/b/c`` keys (lists of per-class values excluded)."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{name}/"))
        elif (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ):
            out[name] = float(value)
    return out


def log_summary(logger: Union[Logger, bool], values: dict[str, Any]) -> None:
    """A stage's numbers: the wandb run summary, or one row of the CSV log."""
    scalars = flat_scalars(values)
    if isinstance(logger, WandbLogger):
        logger.experiment.summary.update(scalars)
    elif isinstance(logger, CSVLogger) and scalars:
        logger.log_metrics(scalars)
        logger.save()


def log_table(
    logger: Union[Logger, bool], key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """A table (wandb only; its numbers also go through ``log_summary``)."""
    if isinstance(logger, WandbLogger) and rows:
        import wandb  # heavy, and only needed when logger.kind=wandb

        logger.experiment.log(
            {key: wandb.Table(columns=list(columns), data=[list(r) for r in rows])}
        )


def log_images(
    logger: Union[Logger, bool],
    key: str,
    images: list[Any],
    captions: list[str] | None = None,
    step: int | None = None,
) -> None:
    """Log image panels where the tracker supports images (wandb); a no-op otherwise."""
    if isinstance(logger, WandbLogger) and images:
        kwargs: dict[str, Any] = {"caption": captions} if captions else {}
        logger.log_image(key=key, images=images, step=step, **kwargs)


def log_mask_overlays(
    logger: Union[Logger, bool],
    key: str,
    items: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    step: Optional[int] = None,
) -> None:
    """Images with their label maps as wandb mask overlays (toggled per layer in the UI).

    items: ``{"image": HxWx3 uint8, "caption": str, "masks": {layer name: HxW label map}}``;
    label 255 shows as "ignore".
    """
    if not isinstance(logger, WandbLogger) or not items:
        return
    import wandb  # heavy, and only needed when logger.kind=wandb

    labels = {i: name for i, name in enumerate(class_names)}
    labels[255] = "ignore"
    images = [
        wandb.Image(
            item["image"],
            caption=item.get("caption"),
            masks={
                name: {"mask_data": np.asarray(mask, np.uint8), "class_labels": labels}
                for name, mask in item["masks"].items()
                if mask is not None
            },
        )
        for item in items
    ]
    payload: dict[str, Any] = {key: images}
    if step is not None:
        payload["trainer/global_step"] = step
    logger.experiment.log(payload)


def log_artifact(
    logger: Union[Logger, bool],
    name: str,
    kind: str,
    files: Sequence[Path] = (),
    references: Sequence[Path] = (),
    max_objects: Optional[int] = None,
) -> None:
    """A wandb artifact: small ``files`` copied in, large ones (checkpoints, mask folders) added
    as ``file://`` references, so nothing big is duplicated on disk."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb  # heavy, and only needed when logger.kind=wandb

    artifact = wandb.Artifact(name.replace("/", "-"), type=kind)
    for path in files:
        if Path(path).is_file():
            artifact.add_file(str(path))
    for path in references:
        if Path(path).exists():
            artifact.add_reference(Path(path).resolve().as_uri(), max_objects=max_objects)
    logger.experiment.log_artifact(artifact)


def run_paths(cfg: Config) -> dict[str, str]:
    """Each stage's local wandb run folders (``wandb sync`` takes them), newest last."""
    identity = _identity(cfg)
    root = cfg.run_dir / "wandb"
    return {
        stage: ", ".join(str(p) for p in sorted(root.glob(f"*-{run_id}")))
        for stage, run_id in identity.get("runs", {}).items()
        if root.is_dir()
    }
