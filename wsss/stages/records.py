"""Stage bookkeeping shared by every stage: stage folders and their ``stage.json``, config hashes
(a stage's hash chains its inputs' hashes), skip / resume / refuse, and the run of one stage.

Every stage owns a folder in the run directory with a ``stage.json`` that records the hash of
the config it depends on and, once finished, its results. A finished stage is skipped; a stage
whose folder was made with another config stops with a message instead of mixing outputs;
``run.overwrite=true`` redoes it. What each stage reads comes from ``wsss.stages.registry``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from wsss.config import Config
from wsss.data.datamodule import build_source
from wsss.data.imageio import DataError
from wsss.data.negatives import check_negatives
from wsss.data.preflight import preflight
from wsss.distributed import barrier, echo, is_global_zero
from wsss.io import read_json, write_json_atomic, write_text_atomic
from wsss.stages import registry
from wsss.tracking import close_logger, log_summary, make_logger


class StageError(RuntimeError):
    """A stage cannot run as asked; the message says why and what to do."""


# Keys added after run directories were first recorded, at the value that does what the code did
# before they existed: there they stay out of the hash, so those runs keep their stages.
ADDED_AT_NEUTRAL = {
    "segmenter.confidence_power": 0.0,
    "pseudo.affinity_labels": "calibrated",
    "affinity.boundary_power": 0.0,
    "classifier.token_pool": "token",
    # the co-trained twin segmenter
    "segmenter.co_training": False,
    "segmenter.co_uncertain_fraction": 0.3,
    # self-training rounds: one round is the segmenter stage alone
    "segmenter.rounds": 1,
    # background-only negatives
    "data.negatives": None,
    # fine-scale gate and erasing-style expansion
    "cam.fine_layer": None,
    "cam.fine_power": 1.0,
    "cam.fine_smooth": 1,
    "cam.erase_steps": 0,
    "cam.erase_score_floor": 0.5,
    "cam.erase_threshold": 0.5,
    # context decoupling (copy-paste classifier round)
    "classifier.context_decoupling": False,
    "classifier.paste_probability": 0.5,
    "classifier.paste_min_scale": 0.5,
    # label-free layer fusion weights
    "pseudo.fusion_weights": "fixed",
}
# The stages that read data.negatives (the classifier's training set, the Libra library).
NEGATIVES_READ_BY = ("classifier", "pseudo_masks")
# Keys added later that only one CAM method reads: out of the hash under every other method.
ADDED_FOR_METHOD = {"cam.libra_bound_mode": "libra", "cam.libra_negative_quantile": "libra"}


def _hashed(cfg: Config, key: str, value: Any) -> bool:
    if key in ADDED_AT_NEUTRAL and value == ADDED_AT_NEUTRAL[key]:
        return False
    return key not in ADDED_FOR_METHOD or cfg.cam.method == ADDED_FOR_METHOD[key]


def config_hash(
    cfg: Config, groups: Sequence[str], unread: Sequence[str] = (), extra: Any = None
) -> str:
    """Hash of the config ``groups`` a stage depends on, less the ``unread`` keys and the later
    keys that change nothing where they stand (``ADDED_AT_NEUTRAL``, ``ADDED_FOR_METHOD``), and
    ``extra``."""
    payload: dict[str, Any] = {}
    for group in groups:
        values = dataclasses.asdict(getattr(cfg, group))
        payload[group] = {
            k: v
            for k, v in values.items()
            if f"{group}.{k}" not in unread and _hashed(cfg, f"{group}.{k}", v)
        }
    payload["extra"] = extra
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _value(cfg: Config, key: str) -> Any:
    group, _, name = key.partition(".")
    return getattr(getattr(cfg, group), name)


def stage_hashes(cfg: Config) -> dict[str, str]:
    """Each stage's hash holds what that stage reads and chains its inputs' hashes, so a change
    upstream invalidates downstream and nothing else does. A stage with one input hashes it
    as itself, one with several as their list."""
    hashes: dict[str, str] = {}
    for stage in registry.expand(cfg):
        parts = [
            _value(cfg, item) if "." in item else hashes[item] for item in stage.inputs_for(cfg)
        ]
        extra = parts[0] if len(parts) == 1 else parts
        hashes[stage.name] = config_hash(cfg, stage.groups, stage.unread, extra)
    return hashes


def stage_dir(cfg: Config, stage: str) -> Path:
    return cfg.run_dir / registry.stage_named(stage).folder


def read_stage(cfg: Config, stage: str) -> Optional[dict[str, Any]]:
    path = stage_dir(cfg, stage) / "stage.json"
    return read_json(path) if path.is_file() else None


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
    return (
        f"{directory} was made with a different config (hash {record.get('config_hash')}, now "
        f"{wanted}). Redo it with run.overwrite=true, or pick another run.name"
    )


def check_stage_folders(cfg: Config, stages: Sequence[str]) -> None:
    """Refuse a command before any work (and before config.yaml is rewritten) when one of the
    stages it runs would refuse its folder."""
    for stage in stages:
        problem = conflicting_record(cfg, stage)
        if problem:
            raise StageError(problem)


def preflight_data(cfg: Config, stages: Sequence[str]) -> None:
    """Every file the unfinished ``stages`` will read exists, opens and fits its mask, checked
    from the headers before any work (``wsss.data.preflight``); global rank zero only. The
    ``data.negatives`` images are checked too where the classifier or the pseudo-masks (the Libra
    library) are still to be made."""
    if not is_global_zero():
        return
    names = {"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split}
    splits: dict[str, None] = {}
    unfinished = []
    for stage in stages:
        record = read_stage(cfg, stage)
        if record is not None and record.get("status") == "done" and not cfg.run.overwrite:
            continue
        unfinished.append(stage)
        splits.update(
            {names[role]: None for role in registry.stage_named(stage).splits if names[role]}
        )
    if splits:
        preflight({split: build_source(cfg, split) for split in splits})
    if cfg.data.negatives and set(unfinished) & set(NEGATIVES_READ_BY):
        problems = check_negatives(cfg.data.negatives, build_source(cfg, cfg.data.train_split))
        if problems:
            raise DataError("before any work:\n  " + "\n  ".join(problems))


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
        write_json_atomic(
            directory / "stage.json",
            {
                "stage": stage,
                "config_hash": wanted,
                "status": "running",
                "seconds": round(earlier, 2),
            },
        )
    barrier()
    return None


def finish_stage(
    cfg: Config, stage: str, results: dict[str, Any], seconds: float
) -> dict[str, Any]:
    """Mark the stage done with its results; ``seconds`` of this attempt add to earlier ones."""
    earlier = float((read_stage(cfg, stage) or {}).get("seconds", 0.0))
    record = {
        "stage": stage,
        "config_hash": stage_hashes(cfg)[stage],
        "status": "done",
        "seconds": round(earlier + seconds, 2),
        **results,
    }
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


def key_figure(stage: str, record: dict[str, Any]) -> str:
    """The one number that says how a stage went, for the console."""
    group, key = registry.stage_named(stage).key_figure
    value = (record.get(group) or {}).get(key) if group else record.get(key)
    return f"{key.split('/')[-1]} {100 * value:.1f}%" if isinstance(value, (int, float)) else ""


def run_stage(
    cfg: Config,
    stage: str,
    body: Callable[[Any], dict[str, Any]],
    recorder: Optional[Recorder] = None,
) -> dict[str, Any]:
    """Skip a finished stage, or run ``body(logger)`` and record its results and time (over
    attempts). The stage's logger lives for the whole stage: ``body`` trains or predicts with
    it, then global rank zero logs the stage's numbers (``log_summary``) and whatever
    ``recorder(logger, record)`` adds (tables, overlays, artifacts) before it is closed."""
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
            log_summary(
                logger, {key: value for key, value in record.items() if key != "config_hash"}
            )
            if recorder is not None:
                recorder(logger, record)
    finally:
        close_logger(logger)
    echo(f"[wsss] {stage}: done in {record['seconds']} s ({key_figure(stage, record)})")
    return record


def save_config(cfg: Config) -> None:
    """The resolved config, always beside the run's outputs (written by global rank zero)."""
    if is_global_zero():
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cfg.run_dir / "config.yaml", cfg.to_yaml())
