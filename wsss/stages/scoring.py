"""Scoring written label PNGs against a split's ground truth: the one scoring path for seeds,
pseudo-masks and segmenter predictions. It reads files, so it gives the same figures however
many processes wrote them, and runs on one process (global rank zero)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from wsss.data.imageio import read_mask
from wsss.metrics import SegmentationScores


def score_mask_dir(source, directory: Path) -> dict[str, Any]:
    """Scores of ``directory/<id>.png`` for every item of ``source``, and their ignored share.

    Returns ``ignore_fraction`` and, where the source has ground truth, the keys of
    ``wsss.metrics.scores_from_confusion`` (mIoU, Dice, accuracies, per class). Ignored pixels
    (255) of a pseudo-mask count as background, as IRN scores its labels.
    """
    scores = SegmentationScores(source.num_classes, sync_on_compute=False)
    ignored = total = 0
    for index in tqdm(range(len(source)), desc=f"scoring {directory.name}", leave=False):
        raw = source.load_raw(index)
        pred = read_mask(directory / f"{raw.id}.png")
        ignored += int((pred == 255).sum())
        total += pred.size
        if raw.mask is not None:
            scored = np.where(pred == 255, 0, pred)
            scores.update(
                torch.from_numpy(scored).long()[None], torch.from_numpy(raw.mask).long()[None]
            )
    result: dict[str, Any] = {"ignore_fraction": round(ignored / max(1, total), 4)}
    if source.has_masks:
        result.update(scores.compute())
    return result
