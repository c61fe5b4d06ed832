"""Orchestration: every stage in order (train-classifier -> make-pseudo-masks ->
train-affinity (when pseudo.refine=affinity) -> train-segmenter -> evaluate), each skipped when finished, then the report. The stages
themselves live in ``wsss.stages``, one module each."""

from __future__ import annotations

from typing import Any, Callable

from wsss.config import Config
from wsss.stages.base import check_stage_folders, is_global_zero, preflight_data
from wsss.stages import (evaluate, make_pseudo_masks, save_config, train_affinity, train_classifier,
                         train_segmenter, write_report)

STAGE_FUNCTIONS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "classifier": train_classifier, "pseudo_masks": make_pseudo_masks, "affinity": train_affinity,
    "segmenter": train_segmenter, "evaluation": evaluate,
}


def run_all(cfg: Config, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """All stages in order, skipping finished ones, then report.json / report.md. A stage folder
    made with another config stops the run before any work (and before config.yaml changes)."""
    check_stage_folders(cfg, list(STAGE_FUNCTIONS))
    preflight_data(cfg, list(STAGE_FUNCTIONS))
    save_config(cfg)
    for function in STAGE_FUNCTIONS.values():
        function(cfg)  # each stage prints its own start and end lines
    report = write_report(cfg)
    if is_global_zero():  # the other DDP processes work in silence
        echo(f"[wsss] report: {cfg.run_dir / 'report.md'}")
    return report
