"""SegmenterModule: a segmentation-models-pytorch network trained with cross-entropy (255 =
ignore), scored with mIoU over the whole validation split, with optional multi-scale + flip
inference."""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional, Sequence

import lightning as L
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss import tracking
from wsss.images import PIXEL_RANGE, denormalise
from wsss.label_maps import IGNORE_INDEX
from wsss.metrics import SegmentationScores
from wsss.models.co_training import co_training_loss
from wsss.models.common import check_finite_loss, optimizer_with_schedule
from wsss.pseudo.pixels import pixel_mask
from wsss.pseudo.refine import refine_scores

STRIDE = 32  # smp encoders downsample by 32: inputs are padded to a multiple of it


def build_network(
    arch: str, encoder: str, num_classes: int, in_channels: int = 3, pretrained: bool = False
) -> nn.Module:
    try:
        return smp.create_model(
            arch,
            encoder_name=encoder,
            encoder_weights="imagenet" if pretrained else None,
            in_channels=in_channels,
            classes=num_classes,
        )
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load ImageNet weights for the {encoder} encoder ({exc}). They are "
            f"downloaded when online into the Hugging Face cache (HF_HOME, default "
            f"~/.cache/huggingface); pre-populate the cache, or run without: "
            f"segmenter.pretrained=false"
        ) from exc


def confidence_weighted_cross_entropy(
    logits: Tensor, mask: Tensor, confidence: Tensor, power: float
) -> Tensor:
    """Cross-entropy in which each pixel counts by its mask's confidence: weight c^power with
    c = confidence / 255, averaged as sum(w * ce) / sum(w) over the pixels not labelled 255.
    Power 0 gives every labelled pixel weight 1: plain cross-entropy. A batch whose weights are
    all zero contributes zero, not a NaN."""
    per_pixel = F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX, reduction="none")
    weight = (confidence.to(per_pixel.dtype) / 255.0).pow(power) * (mask != IGNORE_INDEX)
    return (weight * per_pixel).sum() / weight.sum().clamp_min(1e-12)


class SegmenterLoss(nn.Module):
    """Cross-entropy, plus (``ce_dice``) smp's multiclass soft Dice; pixels labelled 255 count in
    neither. Dice weighs every class present in the batch equally, whatever its pixel share,
    so thin and small classes are learnt in the first epochs rather than after the large ones.
    With ``confidence_power`` > 0 and a confidence map, the cross-entropy weighs each pixel by
    its pseudo-mask's confidence (``confidence_weighted_cross_entropy``); Dice stays unweighted."""

    def __init__(self, kind: str = "ce", confidence_power: float = 0.0) -> None:
        super().__init__()
        if kind not in ("ce", "ce_dice"):
            raise ValueError(f"segmenter loss {kind!r}: expected ce or ce_dice")
        if confidence_power < 0:
            raise ValueError(f"confidence_power must be >= 0, got {confidence_power}")
        self.confidence_power = float(confidence_power)
        self.cross_entropy = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
        self.dice = (
            smp.losses.DiceLoss("multiclass", ignore_index=IGNORE_INDEX)
            if kind == "ce_dice"
            else None
        )

    def forward(self, logits: Tensor, mask: Tensor, confidence: Optional[Tensor] = None) -> Tensor:
        if self.confidence_power > 0 and confidence is None:
            raise ValueError(
                "the confidence-weighted loss needs each mask's confidence map "
                "(batch['confidence']); train on pseudo-masks or set segmenter.confidence_power=0"
            )
        if self.confidence_power > 0:
            loss = confidence_weighted_cross_entropy(
                logits, mask, confidence, self.confidence_power
            )
        else:
            loss = self.cross_entropy(logits, mask)
        return loss if self.dice is None else loss + self.dice(logits, mask)


class SegmenterModule(L.LightningModule):
    """smp network + CE (or CE + Dice), 255 ignored, SGD or AdamW with a per-step schedule;
    validation mIoU and per-class IoU."""

    def __init__(
        self,
        num_classes: int,
        arch: str = "DeepLabV3Plus",
        encoder: str = "resnet18",
        pretrained: bool = False,
        in_channels: int = 3,
        lr: float = 0.01,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        schedule: str = "poly",
        loss: str = "ce",
        confidence_power: float = 0.0,
        co_training: bool = False,
        co_uncertain_fraction: float = 0.3,
        eval_scales: Sequence[float] = (1.0,),
        eval_flip: bool = False,
        class_names: Optional[list[str]] = None,
        mean: Optional[list[float]] = None,
        std: Optional[list[float]] = None,
        num_panels: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_network(arch, encoder, num_classes, in_channels, pretrained)
        # the co-trained twin: the same architecture from other random weights, kept for training
        self.twin = (
            build_network(arch, encoder, num_classes, in_channels, pretrained)
            if co_training
            else None
        )
        self.loss_fn = SegmenterLoss(loss, confidence_power)
        self.val_scores = SegmentationScores(num_classes)
        self._panels: list[tuple[Tensor, Tensor, Tensor]] = []

    def forward(self, images: Tensor) -> Tensor:
        """Logits at the input size; any H, W (padded to a multiple of 32, then cropped back)."""
        return self._padded(self.net, images)

    @staticmethod
    def _padded(net: nn.Module, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        pad_h, pad_w = (-h) % STRIDE, (-w) % STRIDE
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        return net(images)[..., :h, :w]

    @torch.no_grad()
    def predict_probs(self, images: Tensor) -> Tensor:
        """Softmax averaged over ``eval_scales`` and (optionally) horizontal flip, at input size."""
        size = images.shape[-2:]
        total = None
        for scale in self.hparams.eval_scales:
            scaled = (
                images
                if scale == 1.0
                else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
            )
            variants = [(scaled, False)] + (
                [(scaled.flip(-1), True)] if self.hparams.eval_flip else []
            )
            for inputs, flipped in variants:
                logits = self(inputs)
                logits = logits.flip(-1) if flipped else logits
                probs = F.interpolate(
                    logits.float(), size=size, mode="bilinear", align_corners=False
                ).softmax(1)
                total = probs if total is None else total + probs
        return total / total.sum(1, keepdim=True)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        mask = batch["mask"]
        if self.twin is not None and bool((mask != IGNORE_INDEX).any()):
            loss = co_training_loss(
                self.loss_fn,
                logits.float(),
                self._padded(self.twin, batch["image"]).float(),
                mask,
                batch["confidence"],
                self.hparams.co_uncertain_fraction,
            )
        elif bool((mask != IGNORE_INDEX).any()):
            loss = self.loss_fn(logits.float(), mask, batch.get("confidence"))
        else:  # an all-void batch (e.g. a crop inside an ignore band): nothing to learn, not a NaN
            loss = logits.float().sum() * 0.0
        check_finite_loss(self, loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_scores.reset()
        self._panels = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if "mask" not in batch:
            return
        preds = self.predict_probs(batch["image"]).argmax(1)
        self.val_scores.update(preds, batch["mask"])
        for i in range(len(preds)):
            if len(self._panels) < self.hparams.num_panels:
                h, w = (int(v) for v in batch["size"][i]) if "size" in batch else preds.shape[-2:]
                self._panels.append(
                    (
                        batch["image"][i, :, :h, :w].cpu(),
                        preds[i, :h, :w].cpu(),
                        batch["mask"][i, :h, :w].cpu(),
                    )
                )

    def on_validation_epoch_end(self) -> None:
        """mIoU, Dice and per-class IoU over the whole val split (synced over processes), as
        logged scalars: they reach ``trainer.callback_metrics`` whatever the strategy."""
        self._log_panels()
        with warnings.catch_warnings():  # a split without masks updates nothing: a valid state here
            warnings.filterwarnings("ignore", message=".*called before the ``update`` method.*")
            scores = (
                self.val_scores.compute()
            )  # synced across processes: every rank takes the same branch
        self.val_scores.reset()
        if math.isnan(scores["miou"]):  # no ground-truth pixel in the whole split: nothing to score
            return
        names = self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]
        self.log_dict({"val/miou": scores["miou"]}, prog_bar=True)
        self.log_dict(
            {
                f"val/{key}": scores[key]
                for key in ("pixel_accuracy", "mean_class_accuracy", "dice")
                if not math.isnan(scores[key])
            }
        )
        self.log_dict(
            {
                f"val/iou_{name}": iou
                for name, iou in zip(names, scores["per_class_iou"])
                if iou is not None
            }
        )

    def _log_panels(self) -> None:
        """The first validation images with prediction and ground truth as wandb mask overlays."""
        if not self._panels or not self.trainer.is_global_zero:
            return
        names = self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]
        items = [
            {
                "image": denormalise(img, self.hparams.mean, self.hparams.std, PIXEL_RANGE),
                "caption": f"val image {i}",
                "masks": {"prediction": pred.numpy(), "ground_truth": gt.numpy()},
            }
            for i, (img, pred, gt) in enumerate(self._panels)
        ]
        tracking.log_mask_overlays(self.logger, "val/overlays", items, names, step=self.global_step)

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """``pred``: the argmax of the (multi-scale, flip) probabilities; with ``eval_crf`` set
        (by the evaluation stage) also ``pred_crf``: the same probabilities after a dense CRF
        on the image, as VOC papers report it."""
        probs = self.predict_probs(batch["image"])
        out = {"pred": probs.argmax(1)}
        if getattr(self, "eval_crf", False):
            inside = pixel_mask(batch.get("size"), *probs.shape[-2:], device=probs.device)
            out["pred_crf"] = refine_scores(
                "crf",
                probs,
                batch["image"],
                valid=inside,
                mean=self.hparams.mean,
                std=self.hparams.std,
            ).argmax(1)
        return out

    def configure_optimizers(self) -> dict[str, Any]:
        return optimizer_with_schedule(
            self, [{"params": list(self.parameters()), "lr": self.hparams.lr}]
        )
