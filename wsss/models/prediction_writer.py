"""Writes segmenter predictions as palette PNGs (the VOC server's format) and measures mIoU
on the fly where ground truth exists, so evaluation streams over a split of any size."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from wsss.data.masks import write_label_png
from wsss.metrics import IoUMeter


class SegmentationWriter(BasePredictionWriter):
    """``predict_step`` returns ``{"pred": (B,H,W)}``; each prediction is cropped to its image's
    size, written to ``out_dir/<id>.png`` and scored against ``batch["mask"]`` if present."""

    def __init__(self, out_dir: Path, num_classes: int) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.meter = IoUMeter(num_classes)
        self.scored = 0
        self.written = 0

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: dict[str, torch.Tensor],
                           batch_indices: Optional[list[int]], batch: dict[str, Any], batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        preds = prediction["pred"]
        for i, sample_id in enumerate(batch["id"]):
            h, w = (int(v) for v in batch["size"][i])
            pred = preds[i, :h, :w]
            write_label_png(self.out_dir / f"{sample_id}.png", pred.to(torch.uint8).cpu().numpy())
            self.written += 1
            if "mask" in batch:
                self.meter.update(pred[None].long().cpu(), batch["mask"][i, :h, :w][None].long().cpu())
                self.scored += 1

    def scores(self) -> Optional[dict[str, Any]]:
        return self.meter.compute() if self.scored else None
