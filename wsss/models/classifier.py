"""ClassifierModule: the multi-label image classifier whose attributions become pseudo-masks.

The network is any torchvision classification model (``wsss.models.backbones``) and keeps its
own module structure (``model.layer4``, ``model.features.denseblock3``, ...), so layer names for
``wsss.cam.RelevanceCAM`` match ``named_modules()``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score

from wsss.models.backbones import build_backbone, head_of
from wsss.models.common import check_finite_loss

def lr_lambda(schedule: str, total_steps: int):
    """Multiplier of the base learning rate at each optimizer step."""
    total = max(1, total_steps)
    if schedule == "poly":
        return lambda step: max(0.0, 1.0 - step / total) ** 0.9
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    return lambda step: 1.0


class ClassifierModule(L.LightningModule):
    """Multi-label BCE classifier; validation reports macro mAP and F1 at 0.5."""

    def __init__(self, num_classes: int, backbone: str = "resnet18", pretrained: bool = False,
                 output_stride: int = 32, in_channels: int = 3, lr: float = 0.01,
                 backbone_lr_mult: float = 0.1, weight_decay: float = 1e-4, momentum: float = 0.9,
                 schedule: str = "poly", optimizer: str = "sgd", class_names: Optional[list[str]] = None,
                 mean: Optional[list[float]] = None, std: Optional[list[float]] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_backbone(backbone, num_classes, pretrained, output_stride, in_channels)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.val_map = MultilabelAveragePrecision(num_labels=num_classes, average="macro")
        self.val_f1 = MultilabelF1Score(num_labels=num_classes, average="macro", threshold=0.5)
        self.last_val_scores: dict[str, float] = {}

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def export(self) -> nn.Module:
        """The plain torchvision network (backbone + head), in eval mode, for the CAM code."""
        return self.model.eval()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self(batch["image"])
        loss = self.loss_fn(logits.float(), batch["labels"])
        check_finite_loss(self, loss)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        logits = self(batch["image"]).float()
        labels = batch["labels"]
        self.log("val/loss", self.loss_fn(logits, labels), batch_size=len(logits), sync_dist=True)
        self.val_map.update(logits.sigmoid(), labels.long())
        self.val_f1.update(logits.sigmoid(), labels.long())

    def on_validation_epoch_end(self) -> None:
        scores = {"val/mAP": float(self.val_map.compute()), "val/f1": float(self.val_f1.compute())}
        self.val_map.reset()
        self.val_f1.reset()
        self.log_dict(scores, prog_bar=True)
        self.last_val_scores = scores

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        head = head_of(self.model)
        head_ids = {id(p) for p in head.parameters()}
        backbone = [p for p in self.model.parameters() if id(p) not in head_ids]
        groups = [{"params": backbone, "lr": hp.lr * hp.backbone_lr_mult},
                  {"params": list(head.parameters()), "lr": hp.lr}]
        if hp.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(hp.schedule, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
