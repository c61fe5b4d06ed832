"""The one logging path: a Lightning logger per stage, chosen by ``logger.kind``.

wandb runs offline by default and land under the run directory (``wandb sync`` uploads them
later); each stage is its own wandb run, grouped by ``run.name``, with the resolved config.
"""

from __future__ import annotations

from typing import Any, Union

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from wsss.config import Config


def make_logger(cfg: Config, stage: str) -> Union[Logger, bool]:
    """WandbLogger, CSVLogger or False (no logger) for one stage."""
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.logger.kind == "wandb":
        return WandbLogger(name=f"{cfg.run.name}-{stage}", project=cfg.logger.project,
                           save_dir=str(run_dir), mode=cfg.logger.wandb_mode, group=cfg.run.name,
                           job_type=stage, config=cfg.to_dict())
    if cfg.logger.kind == "csv":
        return CSVLogger(save_dir=str(run_dir), name="logs", version=stage)
    return False


def close_logger(logger: Union[Logger, bool]) -> None:
    """Finish the wandb run of a stage so the next stage starts its own."""
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish()


def log_images(logger: Union[Logger, bool], key: str, images: list[Any], captions: list[str] | None = None,
               step: int | None = None) -> None:
    """Log image panels where the tracker supports images (wandb); a no-op otherwise."""
    if isinstance(logger, WandbLogger) and images:
        kwargs: dict[str, Any] = {"caption": captions} if captions else {}
        logger.log_image(key=key, images=images, step=step, **kwargs)
