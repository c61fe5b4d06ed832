"""Self-training round masks as Lightning predict: a trained segmenter's class distribution on
each training image (its test-time augmentation), kept to the classes the image-level labels
name, refined in the image (``pseudo.refine``), labelled, and its uncertain pixels set to 255,
as the pseudo-mask stage does with the CAM distribution. ``SegmentationWriter`` writes the
masks and their confidence."""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor

from wsss.models.segmenter import SegmenterModule
from wsss.pseudo.distribution import confidence_levels, distribution_labels, ignore_uncertain
from wsss.pseudo.pixels import pixel_mask
from wsss.pseudo.refine import check_refine_method, refine_scores


def present_distribution(probs: Tensor, labels: Tensor) -> Tensor:
    """(B, 1+C, H, W) distribution with the classes the (B, C) multi-hot ``labels`` leave out
    set to zero and each pixel renormalised over background and the present classes. A pixel
    whose kept mass is zero (every kept probability underflowed) becomes background."""
    b, channels = probs.shape[:2]
    if labels.shape != (b, channels - 1):
        raise ValueError(
            f"labels must be (B, C) = ({b}, {channels - 1}) for {channels} channels, got "
            f"{tuple(labels.shape)}"
        )
    keep = torch.cat([labels.new_ones(b, 1), labels], 1) > 0.5
    kept = probs.float() * keep.to(probs.device, torch.float32)[:, :, None, None]
    total = kept.sum(1, keepdim=True)
    background = torch.zeros_like(kept)
    background[:, 0] = 1.0
    return torch.where(total > 0, kept / total.clamp_min(1e-30), background)


class RoundMaskModule(L.LightningModule):
    """predict_step: ``pred`` (B, H, W) uint8 masks and ``confidence`` (B, H, W) uint8, the
    top-two margin of the refined distribution, from a trained segmenter."""

    def __init__(
        self,
        segmenter: SegmenterModule,
        refine: str = "none",
        refine_options: Optional[dict[str, Any]] = None,
        ignore_band: float = 0.0,
    ) -> None:
        super().__init__()
        self.segmenter = segmenter.eval()
        self.refine = check_refine_method(refine)
        if self.refine == "affinity":
            raise ValueError(
                "round masks refine in the image (par, crf or none); the learned affinity walk "
                "refines CAM maps in a stage of its own"
            )
        self.refine_options = dict(refine_options or {})
        self.ignore_band = ignore_band

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        images, labels = batch["image"], batch["labels"]
        probs = present_distribution(self.segmenter.predict_probs(images), labels)
        inside = pixel_mask(batch.get("size"), *probs.shape[-2:], device=probs.device)
        refined = refine_scores(
            self.refine,
            probs,
            images,
            valid=inside,
            mean=self.segmenter.hparams.mean,
            std=self.segmenter.hparams.std,
            **self.refine_options,
        )
        b, channels = refined.shape[:2]
        classes = torch.arange(1, channels, device=refined.device).expand(b, -1)
        masks = distribution_labels(refined, classes, labels > 0.5)
        band = self.ignore_band if self.ignore_band > 0 else None
        masks = ignore_uncertain(masks, refined, margin=band, pixel_mask=inside)
        return {"pred": masks, "confidence": confidence_levels(refined)}
