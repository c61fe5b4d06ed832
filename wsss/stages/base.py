"""Stage bookkeeping shared by every stage: stage folders and their ``stage.json``, config
hashes (a stage's hash chains its inputs' hashes), skip / resume / refuse, the Lightning
``Trainer`` factory and the resumable fit.

Every stage owns a folder in the run directory with a ``stage.json`` that records the hash of
the config it depends on and, once finished, its results. A finished stage is skipped; a stage
whose folder was made with another config stops with a message instead of mixing outputs;
``run.overwrite=true`` redoes it. Training stages resume from ``last.ckpt``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from wsss.config import Config
from wsss.io import read_json, write_json_atomic, write_text_atomic
from wsss.tracking import close_logger, make_logger

if TYPE_CHECKING:
    import torch

STAGES = ("classifier", "pseudo_masks", "affinity", "segmenter", "evaluation")


class StageError(RuntimeError):
    """A stage cannot run as asked; the message says why and what to do."""


# keys a stage does not read: how it runs (workers, map batch size, panels), or what only a later
# stage uses (the test split and test-time augmentation are evaluation's)
NOT_READ = {"data": {"num_workers", "test_split"}, "cam": {"batch_size"}, "pseudo": {"num_panels"},
            "segmenter": {"eval_scales", "eval_flip", "eval_crf"}}


def config_hash(cfg: Config, *groups: str, extra: Any = None) -> str:
    """Hash of the config groups a stage depends on, without the keys it does not read."""
    payload: dict[str, Any] = {}
    for group in groups:
        values = dataclasses.asdict(getattr(cfg, group))
        payload[group] = {k: v for k, v in values.items() if k not in NOT_READ.get(group, ())}
    payload["extra"] = extra
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def stage_hashes(cfg: Config) -> dict[str, str]:
    """Each stage's hash holds what that stage reads and chains its inputs' hashes, so a change
    upstream invalidates downstream and nothing else does."""
    t = cfg.trainer
    # what changes a trained network: not the devices or strategy (the global batch is fixed)
    training = [cfg.run.seed, t.precision, t.deterministic, t.gradient_clip_val, t.accumulate_grad_batches]
    classifier = config_hash(cfg, "data", "classifier", extra=training)
    pseudo = config_hash(cfg, "cam", "pseudo", extra=classifier)
    affinity = config_hash(cfg, "affinity", extra=[pseudo, *training])
    refined = affinity if cfg.pseudo.refine == "affinity" else pseudo
    masks = refined if cfg.segmenter.masks == "pseudo" else cfg.segmenter.masks
    segmenter = config_hash(cfg, "data", "segmenter", extra=[masks, *training])
    s, d = cfg.segmenter, cfg.data
    evaluation = config_hash(cfg, extra=[segmenter, s.eval_scales, s.eval_flip, s.eval_crf, d.val_split, d.test_split])
    return {"classifier": classifier, "pseudo_masks": pseudo, "affinity": affinity, "segmenter": segmenter,
            "evaluation": evaluation}


def stage_dir(cfg: Config, stage: str) -> Path:
    return cfg.run_dir / stage


def read_stage(cfg: Config, stage: str) -> Optional[dict[str, Any]]:
    path = stage_dir(cfg, stage) / "stage.json"
    return read_json(path) if path.is_file() else None


# ------------------------------------------------------------------ processes
# Under ``trainer.strategy=ddp`` every process runs the whole command (Lightning relaunches it),
# so work outside a Trainer call is gated here: files are written by global rank zero only, and
# the processes meet at a barrier before anyone reads what rank zero wrote. Under ``ddp_spawn``
# only the main process runs this code (the spawned ones run inside Trainer calls), and the
# barrier is a no-op. The process group outlives each Trainer, so barriers work between stages.


def is_global_zero() -> bool:
    """True in the process that writes shared files: global rank zero, or the only process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    # a relaunched DDP process before its first Trainer call: the launcher's environment says
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def barrier() -> None:
    """Wait for every process of the run (no-op in a single process)."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def _has_outputs(directory: Path) -> bool:
    """Whether a stage folder holds anything but its stage.json."""
    return directory.is_dir() and any(p.name != "stage.json" for p in directory.iterdir())


def conflicting_record(cfg: Config, stage: str) -> Optional[str]:
    """Why the stage's folder cannot be used with this config, or None.

    A folder made with another config is refused once it holds outputs; a stage that failed
    before writing anything does not hold a new config back.
    """
    directory = stage_dir(cfg, stage)
    record = read_stage(cfg, stage)
    wanted = stage_hashes(cfg)[stage]
    if record is None or record.get("config_hash") == wanted or cfg.run.overwrite:
        return None
    if record.get("status") != "done" and not _has_outputs(directory):
        return None
    return (f"{directory} was made with a different config (hash {record.get('config_hash')}, now "
            f"{wanted}). Redo it with run.overwrite=true, or pick another run.name")


def check_stage_folders(cfg: Config, stages: Sequence[str]) -> None:
    """Refuse a command before any work (and before config.yaml is rewritten) when one of the
    stages it runs would refuse its folder."""
    for stage in stages:
        problem = conflicting_record(cfg, stage)
        if problem:
            raise StageError(problem)


SPLITS_READ = {"classifier": ("train", "val"), "pseudo_masks": ("train",), "affinity": ("train",),
               "segmenter": ("train", "val"), "evaluation": ("val", "test")}


def preflight_data(cfg: Config, stages: Sequence[str]) -> None:
    """Every file the unfinished ``stages`` will read exists, opens and fits its mask, checked
    from the headers before any work (``wsss.data.preflight``); global rank zero only."""
    from wsss.data.datamodule import build_source
    from wsss.data.preflight import preflight

    if not is_global_zero():
        return
    names = {"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split}
    splits: dict[str, None] = {}
    for stage in stages:
        record = read_stage(cfg, stage)
        if record is not None and record.get("status") == "done" and not cfg.run.overwrite:
            continue
        splits.update({names[role]: None for role in SPLITS_READ.get(stage, ()) if names[role]})
    if splits:
        preflight({split: build_source(cfg, split) for split in splits})


def begin_stage(cfg: Config, stage: str) -> Optional[dict[str, Any]]:
    """Return the finished record to skip, or prepare the folder and return None to run.

    Every process takes the same decision: rank zero prepares the folder, then all of them read
    the record after a barrier.
    """
    directory = stage_dir(cfg, stage)
    wanted = stage_hashes(cfg)[stage]
    if is_global_zero() and cfg.run.overwrite and directory.exists():
        shutil.rmtree(directory)
    barrier()
    problem = conflicting_record(cfg, stage)
    if problem:
        raise StageError(problem)
    record = read_stage(cfg, stage)
    if record is not None and record.get("config_hash") != wanted:
        record = None  # an attempt with another config that left nothing behind
    if record is not None and record.get("status") == "done":
        return record
    barrier()  # everyone has read the record before rank zero rewrites it
    if is_global_zero():
        directory.mkdir(parents=True, exist_ok=True)
        earlier = float((record or {}).get("seconds", 0.0))  # spent by interrupted attempts
        write_json_atomic(directory / "stage.json", {"stage": stage, "config_hash": wanted, "status": "running",
                                                     "seconds": round(earlier, 2)})
    barrier()
    return None


def finish_stage(cfg: Config, stage: str, results: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Mark the stage done with its results; ``seconds`` of this attempt add to earlier ones."""
    earlier = float((read_stage(cfg, stage) or {}).get("seconds", 0.0))
    record = {"stage": stage, "config_hash": stage_hashes(cfg)[stage], "status": "done",
              "seconds": round(earlier + seconds, 2), **results}
    barrier()  # everyone has read the earlier time
    if is_global_zero():
        write_json_atomic(stage_dir(cfg, stage) / "stage.json", record)
    barrier()
    return record


def _add_attempt_seconds(cfg: Config, stage: str, seconds: float) -> None:
    """An attempt that failed or was interrupted still counts in the stage's time."""
    record = read_stage(cfg, stage)
    if is_global_zero() and record is not None and record.get("status") == "running":
        record["seconds"] = round(float(record.get("seconds", 0.0)) + seconds, 2)
        write_json_atomic(stage_dir(cfg, stage) / "stage.json", record)


Recorder = Callable[[Any, dict[str, Any]], None]
KEY_FIGURES = {"classifier": ("metrics", "val/mAP"), "pseudo_masks": (None, "pseudo_miou"),
               "affinity": (None, "refined_miou"),
               "segmenter": ("metrics", "val/miou"), "evaluation": (None, "miou")}


def key_figure(stage: str, record: dict[str, Any]) -> str:
    """The one number that says how a stage went, for the console."""
    group, key = KEY_FIGURES.get(stage, (None, None))
    value = (record.get(group) or {}).get(key) if group else record.get(key)
    return f"{key.split('/')[-1]} {100 * value:.1f}%" if isinstance(value, (int, float)) else ""


def run_stage(cfg: Config, stage: str, body: Callable[[Any], dict[str, Any]],
              recorder: Optional[Recorder] = None) -> dict[str, Any]:
    """Skip a finished stage, or run ``body(logger)`` and record its results and time (over
    attempts). The stage's logger lives for the whole stage: ``body`` trains or predicts with
    it, then global rank zero logs the stage's numbers (``log_summary``) and whatever
    ``recorder(logger, record)`` adds (tables, overlays, artifacts) before it is closed."""
    from wsss.tracking import log_summary

    done = begin_stage(cfg, stage)
    if done is not None:
        echo(f"[wsss] {stage}: already done, skipped ({key_figure(stage, done)})")
        return {**done, "skipped": True}
    echo(f"[wsss] {stage}: started")
    logger = make_logger(cfg, stage)
    started = time.perf_counter()
    try:
        try:
            results = body(logger)
        except BaseException:
            _add_attempt_seconds(cfg, stage, time.perf_counter() - started)
            raise
        record = finish_stage(cfg, stage, results, time.perf_counter() - started)
        if is_global_zero():
            log_summary(logger, {key: value for key, value in record.items() if key != "config_hash"})
            if recorder is not None:
                recorder(logger, record)
    finally:
        close_logger(logger)
    echo(f"[wsss] {stage}: done in {record['seconds']} s ({key_figure(stage, record)})")
    return record


def echo(message: str) -> None:
    """One console line, from global rank zero only."""
    if is_global_zero():
        print(message, flush=True)


def save_config(cfg: Config) -> None:
    """The resolved config, always beside the run's outputs (written by global rank zero)."""
    if is_global_zero():
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cfg.run_dir / "config.yaml", cfg.to_yaml())


def _limit(value: Optional[float]) -> Optional[float | int]:
    if value is None:
        return None
    return int(value) if value > 1 else value


def make_trainer(cfg: Config, max_epochs: int, logger: Any = False, callbacks: Optional[list] = None,
                 **overrides: Any) -> L.Trainer:
    """One Lightning Trainer per stage, from the ``trainer`` config group."""
    import torch

    t = cfg.trainer
    on_gpu = t.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    options: dict[str, Any] = dict(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=t.precision, deterministic=t.deterministic,
        sync_batchnorm=t.sync_batchnorm and on_gpu,  # torch's SyncBatchNorm is GPU-only
        max_epochs=max_epochs, logger=logger, callbacks=callbacks or [],
        log_every_n_steps=t.log_every_n_steps, limit_train_batches=_limit(t.limit_train_batches),
        limit_val_batches=_limit(t.limit_val_batches), default_root_dir=str(cfg.run_dir),
        num_sanity_val_steps=0, enable_model_summary=False)
    options.update(overrides)
    return L.Trainer(**{k: v for k, v in options.items() if v is not None})


def fit_stage(cfg: Config, stage: str, module: L.LightningModule, datamodule: L.LightningDataModule,
              max_epochs: int, logger: Any = False, **overrides: Any) -> dict[str, Any]:
    """Fit with a last.ckpt written every epoch, resuming from it when present.

    The checkpoint also holds the RNG states, and the data order and augmentation depend on
    (seed, epoch) alone (``wsss.data.samplers``), so a resumed run ends bit-identical to an
    uninterrupted one on the CPU. Results come back through ``trainer.callback_metrics`` and the
    checkpoint file, which survive spawned processes.
    """
    import torch

    from wsss.models.common import RNGStateCallback
    from wsss.tracking import lr_monitor

    directory = stage_dir(cfg, stage)
    # one rolling checkpoint, overwritten every epoch: the resume point and the final weights
    checkpoint = ModelCheckpoint(dirpath=str(directory), filename="last", save_top_k=1, monitor=None,
                                 enable_version_counter=False)
    t = cfg.trainer
    # the data module's samplers shard each global batch themselves (use_distributed_sampler off)
    trainer = make_trainer(cfg, max_epochs, logger, [checkpoint, RNGStateCallback(), *lr_monitor(logger)],
                           use_distributed_sampler=False, gradient_clip_val=t.gradient_clip_val,
                           accumulate_grad_batches=t.accumulate_grad_batches, max_time=t.max_time, **overrides)
    last = directory / "last.ckpt"
    with warnings.catch_warnings():
        # the stage folder always holds stage.json beside the checkpoint: not a stale run
        warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
    if trainer.interrupted:
        raise StageError(f"{stage} training was interrupted; run the same command again to resume "
                         f"from {last}")
    barrier()
    saved = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
    metrics = {key: round(float(value), 6) for key, value in trainer.callback_metrics.items()
               if key.startswith("val/")}
    return {"epochs": int(saved["epoch"]) + 1, "steps": int(saved["global_step"]), "checkpoint": "last.ckpt",
            "metrics": metrics}


def log_checkpoint(cfg: Config, stage: str, logger: Any) -> None:
    """The stage's checkpoint as a wandb artifact (referenced, not copied)."""
    from wsss.tracking import log_artifact

    log_artifact(logger, f"{cfg.run.name}-{stage}", "model", references=[stage_dir(cfg, stage) / "last.ckpt"])


def load_trained(cfg: Config, stage: str, module_class, command: str):
    """The finished stage's LightningModule from its checkpoint, on the CPU."""
    record = read_stage(cfg, stage)
    if record is None or record.get("status") != "done":
        raise StageError(f"no trained {stage} in {stage_dir(cfg, stage)}; run `wsss {command}` "
                         f"(or `wsss run`) first")
    return module_class.load_from_checkpoint(stage_dir(cfg, stage) / record["checkpoint"], map_location="cpu")


def stage_device(cfg: Config) -> "torch.device":
    """The device for work done outside a Trainer (GPU when asked for and present)."""
    import torch

    wants_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")
