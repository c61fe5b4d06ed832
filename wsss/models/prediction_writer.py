"""Writes segmenter predictions as palette PNGs (the VOC server's format), each process its
share; scoring reads the files afterwards (``wsss.stages.scoring``), so it needs no state from
the processes that wrote them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from wsss.data.masks import write_confidence_png, write_label_png
from wsss.data.resize import restore_size


class SegmentationWriter(BasePredictionWriter):
    """``predict_step`` returns ``{"pred": (B,H,W)}``; each prediction is cropped to its image's
    size, brought back to the size of its file (``batch["orig_size"]``) and written to
    ``out_dir/<id>.png``; other keys named in ``extra`` go to their own
    folders (e.g. ``{"pred_crf": out_dir_crf}``). With ``confidence_dir``, the (B,H,W) uint8
    ``confidence`` goes there as grayscale PNGs, before the label maps whose presence marks an
    image as done."""

    def __init__(
        self,
        out_dir: Path,
        extra: Optional[dict[str, Path]] = None,
        confidence_dir: Optional[Path] = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.folders = {"pred": Path(out_dir), **{k: Path(v) for k, v in (extra or {}).items()}}
        self.confidence_dir = Path(confidence_dir) if confidence_dir is not None else None
        self.written = 0

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: dict[str, torch.Tensor],
        batch_indices: Optional[list[int]],
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for i, sample_id in enumerate(batch["id"]):
            h, w = (int(v) for v in batch["size"][i])
            original = batch["orig_size"][i] if "orig_size" in batch else (h, w)
            if self.confidence_dir is not None:
                levels = restore_size(prediction["confidence"][i, :h, :w].cpu(), original)
                write_confidence_png(self.confidence_dir / f"{sample_id}.png", levels.numpy())
            for key, folder in self.folders.items():
                if key in prediction:
                    label_map = restore_size(
                        prediction[key][i, :h, :w].to(torch.uint8).cpu(), original
                    )
                    write_label_png(folder / f"{sample_id}.png", label_map.numpy())
            self.written += 1
