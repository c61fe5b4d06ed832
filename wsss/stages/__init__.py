"""The pipeline's stages, one module each, in the order ``registry`` lists them (their names,
subcommands, hashes and folders are described there), plus ``records`` (stage folders, hashes,
skip / resume / refuse), ``trainer`` (the Trainer factory and the resumable fit), ``scoring`` and
``report``.

The names below load with their module on first use: the CLI reads ``wsss.stages.registry`` to
build its parser, and importing this package must not import torch and Lightning for that.
"""

from __future__ import annotations

import importlib
from typing import Any

from wsss.stages.registry import STAGES

# public name -> the module of this package that defines it
_EXPORTS = {
    "StageError": "records",
    "check_stage_folders": "records",
    "preflight_data": "records",
    "read_stage": "records",
    "save_config": "records",
    "stage_dir": "records",
    "load_classifier": "classifier",
    "train_classifier": "classifier",
    "make_pseudo_masks": "pseudo_masks",
    "train_affinity": "affinity",
    "load_segmenter": "segmenter",
    "train_segmenter": "segmenter",
    "train_rounds": "rounds",
    "train_round": "rounds",
    "evaluate": "evaluation",
    "build_report": "report",
    "write_report": "report",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = ["STAGES", *_EXPORTS]
