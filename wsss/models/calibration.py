"""Threshold calibration as Lightning predict, so it runs on the configured devices and
precision, sharded over processes like every other pass over the data.

``CalibrationModule.predict_step`` queries the classifier on each (image, present class) with the
region of its fused map above each grid threshold kept and deleted (``wsss.pseudo.calibrate``);
``ConfidenceCollector`` keeps this process's answers and writes them to a file when predict ends.
The stage merges every process's file and chooses the thresholds on one process: the choice
needs all pairs of a class at once (a median), and files survive spawned processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn

from wsss.io import atomic_path
from wsss.models.pseudo_labeler import PseudoMaskModule
from wsss.pseudo.calibrate import masked_confidences
from wsss.pseudo.fusion_weights import simplex_candidates, weighting_confidences

CONFIDENCE_KEYS = ("keep", "delete", "base", "class_index")


class CalibrationModule(PseudoMaskModule):
    """Fused maps of the present classes (as the pseudo-masks use them), then the classifier's
    confidence on masked copies. Run with ``Trainer(inference_mode=False)``.

    ``search_weights``: instead of the threshold grid, query each candidate layer weighting's
    top regions (``wsss.pseudo.fusion_weights``); ``keep`` / ``delete`` are then (S, W, Q)."""

    def __init__(
        self,
        model: nn.Module,
        grid: Sequence[float],
        min_confidence: float = 0.0,
        max_batch: int = 64,
        search_weights: bool = False,
        **pseudo_options: Any,
    ) -> None:
        super().__init__(model, **pseudo_options)
        self.search_weights = search_weights
        self.grid = [float(g) for g in grid]
        self.min_confidence = float(min_confidence)
        self.max_batch = max_batch

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """One row per valid (image, class) slot: ``keep`` / ``delete`` (S, T), ``base`` and
        ``class_index`` (S,). Slots under ``min_confidence`` keep NaN answers (no query)."""
        images = batch["image"]
        maps = self.fused_maps(images, batch["labels"], batch.get("size"))
        if self.search_weights:
            keep, delete, base = weighting_confidences(
                self.model,
                images,
                maps["layers"],
                maps["targets"],
                maps["valid"],
                simplex_candidates(len(maps["layers"])),
                max_batch=self.max_batch,
                min_confidence=self.min_confidence,
            )
            return self._rows(keep, delete, base, maps)
        keep, delete, base = masked_confidences(
            self.model,
            images,
            maps["fused"],
            maps["targets"],
            maps["valid"],
            self.grid,
            self.max_batch,
            self.min_confidence,
        )
        return self._rows(keep, delete, base, maps)

    @staticmethod
    def _rows(
        keep: Tensor, delete: Tensor, base: Tensor, maps: dict[str, Any]
    ) -> dict[str, Tensor]:
        valid = maps["valid"]
        return {
            "keep": keep[valid],
            "delete": delete[valid],
            "base": base[valid],
            "class_index": maps["targets"][valid],
        }


class ConfidenceCollector(BasePredictionWriter):
    """Collects ``CalibrationModule`` answers of this process; at the end of predict writes them
    to ``<directory>/rank_<global rank>.pt`` (atomically)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(write_interval="batch")
        self.directory = Path(directory)
        self.parts: dict[str, list[Tensor]] = {key: [] for key in CONFIDENCE_KEYS}

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: dict[str, Tensor],
        batch_indices: Optional[list[int]],
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for key in CONFIDENCE_KEYS:
            self.parts[key].append(
                prediction[key].detach().float().cpu()
                if key != "class_index"
                else prediction[key].detach().long().cpu()
            )

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        merged = {
            key: torch.cat(values) if values else torch.empty(0)
            for key, values in self.parts.items()
        }
        with atomic_path(self.directory / f"rank_{trainer.global_rank}.pt") as tmp:
            torch.save(merged, tmp)


def merge_confidences(directory: Path) -> dict[str, Tensor]:
    """Every process's answers from ``ConfidenceCollector`` files, concatenated."""
    parts = [
        torch.load(path, weights_only=True) for path in sorted(Path(directory).glob("rank_*.pt"))
    ]
    if not parts:
        raise FileNotFoundError(f"no calibration results in {directory}")
    merged = {}
    for key in CONFIDENCE_KEYS:
        tensors = [part[key] for part in parts if part[key].numel()]
        merged[key] = torch.cat(tensors) if tensors else parts[0][key]
    return merged
