"""``PseudoMaskWriter``: the pseudo-mask stage's one writer of masks, seeds, confidences, maps and
panel samples, and the folder names it writes them under."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from wsss.data.masks import CONFIDENCE_DIR, write_confidence_png, write_label_png
from wsss.data.resize import restore_size
from wsss.images import PIXEL_RANGE, denormalise
from wsss.io import atomic_path, write_json_atomic

SEED_DIR = "seeds"
CALIBRATED_DIR = "calibrated"  # the calibrated masks before in-image refinement (par / crf)
MAP_DIR = "maps"
AFFINITY_LABEL_DIR = "affinity_labels"  # refined masks the affinity stage learns from
RANK_DIR = ".ranks"
PANEL_DIR = ".panels"


class PseudoMaskWriter(BasePredictionWriter):
    """Writes ``<out>/<id>.png`` (pseudo-mask), ``<out>/seeds/<id>.png``,
    ``<out>/confidence/<id>.png`` (the mask's per-pixel confidence, 0..255) and optionally
    ``<out>/maps/<id>.npz`` (fused float16 maps + class indices), each atomically and at the size
    of the image file (``batch["orig_size"]``: data.image_size may have resized it). Each DDP
    process writes its own share and, when predict ends, how many it wrote
    (``<out>/.ranks/rank_<r>.json``). The samples named in ``panel_ids`` are saved for the panel
    grid as ``<out>/.panels/<id>.pt`` by whichever process meets them, and kept: files, so the
    grid shows the same images whether the stage was resumed, spawned or sharded."""

    def __init__(
        self, out_dir: Path, save_maps: bool = False, panel_ids: Sequence[str] = ()
    ) -> None:
        super().__init__(write_interval="batch")
        self.out_dir = Path(out_dir)
        self.save_maps = save_maps
        self.panel_ids = set(panel_ids)
        self.written = 0

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: dict[str, Any],
        batch_indices: Optional[list[int]],
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for i, sample_id in enumerate(batch["id"]):
            h, w = (int(v) for v in batch["size"][i])
            original = batch["orig_size"][i] if "orig_size" in batch else (h, w)

            def file_size(values: Tensor) -> np.ndarray:
                """Cropped to the image, at the size of its file (data.image_size resizes)."""
                return restore_size(values[..., :h, :w].cpu(), original).numpy()

            write_label_png(
                self.out_dir / SEED_DIR / f"{sample_id}.png", file_size(prediction["seeds"][i])
            )
            if "calibrated" in prediction:
                write_label_png(
                    self.out_dir / CALIBRATED_DIR / f"{sample_id}.png",
                    file_size(prediction["calibrated"][i]),
                )
            if self.save_maps:
                keep = prediction["valid"][i].cpu()
                with atomic_path(self.out_dir / MAP_DIR / f"{sample_id}.npz") as tmp:
                    with open(tmp, "wb") as handle:
                        np.savez_compressed(
                            handle,
                            maps=file_size(prediction["fused"][i, keep].float()).astype(np.float16),
                            classes=(prediction["targets"][i, keep] + 1).cpu().numpy(),
                        )
            if sample_id in self.panel_ids:
                with atomic_path(self.out_dir / PANEL_DIR / f"{sample_id}.pt") as tmp:
                    torch.save(
                        self._panel_item(batch, prediction, i, h, w, pl_module.mean, pl_module.std),
                        tmp,
                    )
            if "affinity_labels" in prediction:
                write_label_png(
                    self.out_dir / AFFINITY_LABEL_DIR / f"{sample_id}.png",
                    file_size(prediction["affinity_labels"][i]),
                )
            write_confidence_png(
                self.out_dir / CONFIDENCE_DIR / f"{sample_id}.png",
                file_size(prediction["confidence"][i]),
            )
            # the pseudo-mask goes last: its presence marks the image as done
            write_label_png(self.out_dir / f"{sample_id}.png", file_size(prediction["pseudo"][i]))
            self.written += 1

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        """Each rank reports how many images it wrote (the stage checks the shares add up)."""
        write_json_atomic(
            self.out_dir / RANK_DIR / f"rank_{trainer.global_rank}.json",
            {"rank": trainer.global_rank, "written": self.written},
        )

    @staticmethod
    def _panel_item(
        batch: dict[str, Any],
        prediction: dict[str, Any],
        i: int,
        h: int,
        w: int,
        mean: Optional[Sequence[float]],
        std: Optional[Sequence[float]],
    ) -> dict[str, Any]:
        """What the panel grid shows of one sample: the image (as displayed, uint8), every present
        class's map per layer and fused, the seed and pseudo-mask, and the ground truth if any."""
        valid = prediction["valid"][i].cpu()
        return {
            "id": batch["id"][i],
            "display": denormalise(batch["image"][i, :, :h, :w], mean, std, PIXEL_RANGE),
            "classes": (prediction["targets"][i].cpu()[valid] + 1).tolist(),
            "layers": {k: v[i, valid, :h, :w].cpu() for k, v in prediction["layers"].items()},
            "fused": prediction["fused"][i, valid, :h, :w].cpu(),
            "seeds": prediction["seeds"][i, :h, :w].cpu(),
            "calibrated": prediction["calibrated"][i, :h, :w].cpu()
            if "calibrated" in prediction
            else None,
            "pseudo": prediction["pseudo"][i, :h, :w].cpu(),
            "mask": batch["mask"][i, :h, :w].cpu() if "mask" in batch else None,
        }
