"""Writes segmenter predictions as palette PNGs (the VOC server's format), each process its
share; scoring reads the files afterwards (``wsss.stages.scoring``), so it needs no state from
the processes that wrote them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from wsss.data.masks import write_label_png


class SegmentationWriter(BasePredictionWriter):
    """``predict_step`` returns ``{"pred": (B,H,W)}``; each prediction is cropped to its image's
    size and written to ``out_dir/<id>.png``."""

    def __init__(self, out_dir: Path) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.written = 0

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: dict[str, torch.Tensor],
                           batch_indices: Optional[list[int]], batch: dict[str, Any], batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        preds = prediction["pred"]
        for i, sample_id in enumerate(batch["id"]):
            h, w = (int(v) for v in batch["size"][i])
            write_label_png(self.out_dir / f"{sample_id}.png", preds[i, :h, :w].to(torch.uint8).cpu().numpy())
            self.written += 1
