"""Orchestration: the stages ``wsss.stages.registry`` lists, in its order, each skipped when
finished, then the report; or one stage alone. The stages themselves live in ``wsss.stages``,
one module each."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from wsss.config import Config
from wsss.distributed import is_global_zero
from wsss.stages import registry
from wsss.stages.records import check_stage_folders, preflight_data, save_config, stage_dir
from wsss.stages.registry import Stage
from wsss.stages.report import write_report


def run_all(cfg: Config, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """All stages in order, skipping finished ones, then report.json / report.md. A stage folder
    made with another config stops the run before any work (and before config.yaml changes)."""
    stages = registry.expand(cfg)
    _prepare(cfg, stages)
    for stage in stages:
        stage.run(cfg)  # each stage prints its own start and end lines
    report = write_report(cfg)
    if is_global_zero():  # the other DDP processes work in silence
        echo(f"[wsss] report: {cfg.run_dir / 'report.md'}")
    return report


def run_one(cfg: Config, stage: Stage, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """One stage (skipped when finished, with a hint how to redo it), then the report of what
    the run directory holds. The self-training rounds' command runs every round after the
    first, in order."""
    stages = registry.expand(cfg, [stage])
    _prepare(cfg, stages)
    result: dict[str, Any] = {"skipped": True, "not_used": True}
    for each in stages:
        result = each.run(cfg)
    if not stages:
        echo(f"[wsss] {stage.command}: nothing to do with segmenter.rounds={cfg.segmenter.rounds}")
    elif result.get("skipped"):
        where = stage_dir(cfg, stages[-1].name)
        echo(f"[wsss] {stage.command}: run.overwrite=true redoes it; outputs in {where}")
    write_report(cfg)
    return result


def _prepare(cfg: Config, stages: Sequence[Stage]) -> None:
    """Before any work: refuse folders made with another config, check the data files the
    unfinished stages read, and write the resolved config beside the outputs."""
    names = [stage.name for stage in stages]
    check_stage_folders(cfg, names)
    preflight_data(cfg, names)
    save_config(cfg)
