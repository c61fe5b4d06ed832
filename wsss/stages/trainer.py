"""Training and predicting inside a stage: the one Lightning ``Trainer`` factory, the resumable
fit, and loading a finished stage's module back from its checkpoint."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from wsss.config import Config
from wsss.distributed import barrier
from wsss.models.common import RNGStateCallback
from wsss.stages import registry
from wsss.stages.records import StageError, read_stage, stage_dir
from wsss.tracking import log_artifact, lr_monitor


def _limit(value: Optional[float]) -> Optional[float | int]:
    if value is None:
        return None
    return int(value) if value > 1 else value


def make_trainer(
    cfg: Config,
    max_epochs: int,
    logger: Any = False,
    callbacks: Optional[list] = None,
    **overrides: Any,
) -> L.Trainer:
    """One Lightning Trainer per stage, from the ``trainer`` config group."""
    t = cfg.trainer
    on_gpu = t.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    options: dict[str, Any] = dict(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        deterministic=t.deterministic,
        sync_batchnorm=t.sync_batchnorm and on_gpu,  # torch's SyncBatchNorm is GPU-only
        max_epochs=max_epochs,
        logger=logger,
        callbacks=callbacks or [],
        log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=_limit(t.limit_train_batches),
        limit_val_batches=_limit(t.limit_val_batches),
        default_root_dir=str(cfg.run_dir),
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    options.update(overrides)
    return L.Trainer(**{k: v for k, v in options.items() if v is not None})


def fit_stage(
    cfg: Config,
    stage: str,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    max_epochs: int,
    logger: Any = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Fit with a last.ckpt written every epoch, resuming from it when present.

    The checkpoint also holds the RNG states, and the data order and augmentation depend on
    (seed, epoch) alone (``wsss.data.samplers``), so a resumed run ends bit-identical to an
    uninterrupted one on the CPU. Results come back through ``trainer.callback_metrics`` and the
    checkpoint file, which survive spawned processes.
    """
    directory = stage_dir(cfg, stage)
    # one rolling checkpoint, overwritten every epoch: the resume point and the final weights
    checkpoint = ModelCheckpoint(
        dirpath=str(directory),
        filename="last",
        save_top_k=1,
        monitor=None,
        enable_version_counter=False,
    )
    t = cfg.trainer
    # the data module's samplers shard each global batch themselves (use_distributed_sampler off)
    trainer = make_trainer(
        cfg,
        max_epochs,
        logger,
        [checkpoint, RNGStateCallback(), *lr_monitor(logger)],
        use_distributed_sampler=False,
        gradient_clip_val=t.gradient_clip_val,
        accumulate_grad_batches=t.accumulate_grad_batches,
        max_time=t.max_time,
        **overrides,
    )
    last = directory / "last.ckpt"
    with warnings.catch_warnings():
        # the stage folder always holds stage.json beside the checkpoint: not a stale run
        warnings.filterwarnings(
            "ignore", message=r"Checkpoint directory .* exists and is not empty"
        )
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
    if trainer.interrupted:
        raise StageError(
            f"{stage} training was interrupted; run the same command again to resume from {last}"
        )
    if not last.is_file():
        # a max_time that runs out inside the first epoch stops before the epoch-end checkpoint;
        # the stage still counts as done, so its weights are saved here (every rank takes part)
        trainer.save_checkpoint(str(last))
    barrier()
    saved = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    metrics = {
        key: round(float(value), 6)
        for key, value in trainer.callback_metrics.items()
        if key.startswith("val/")
    }
    return {
        "epochs": int(saved["epoch"]) + 1,
        "steps": int(saved["global_step"]),
        "checkpoint": "last.ckpt",
        "metrics": metrics,
    }


def log_checkpoint(cfg: Config, stage: str, logger: Any) -> None:
    """The stage's checkpoint as a wandb artifact (referenced, not copied)."""
    log_artifact(
        logger, f"{cfg.run.name}-{stage}", "model", references=[stage_dir(cfg, stage) / "last.ckpt"]
    )


def load_trained(
    cfg: Config, stage: str, module_class: type[L.LightningModule]
) -> L.LightningModule:
    """The finished stage's LightningModule from its checkpoint, on the CPU."""
    record = read_stage(cfg, stage)
    if record is None or record.get("status") != "done":
        raise StageError(
            f"no trained {stage} in {stage_dir(cfg, stage)}; run "
            f"`wsss {registry.stage_named(stage).command}` (or `wsss run`) first"
        )
    return module_class.load_from_checkpoint(
        stage_dir(cfg, stage) / record["checkpoint"], map_location="cpu"
    )


def stage_device(cfg: Config) -> torch.device:
    """The device for work done outside a Trainer (GPU when asked for and present)."""
    wants_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")
