"""ClassifierModule: the multi-label image classifier whose attributions become pseudo-masks.

The network is any torchvision classification model (``wsss.models.backbones``) and keeps its
own module structure (``model.layer4``, ``model.features.denseblock3``, ...), so layer names for
``wsss.cam.RelevanceCAM`` match ``named_modules()``.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
from torch import Tensor, nn

from wsss.metrics import MultiLabelScores
from wsss.models.backbones import build_backbone, head_of
from wsss.models.common import check_finite_loss, optimizer_with_schedule
from wsss.models.vit_backbones import build_vit_backbone, is_vit_backbone


class ClassifierModule(L.LightningModule):
    """Multi-label BCE classifier; validation reports mAP and F1 at 0.5 over the classes present."""

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        pretrained: bool = False,
        output_stride: int = 32,
        in_channels: int = 3,
        lr: float = 0.01,
        backbone_lr_mult: float = 0.1,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        schedule: str = "poly",
        optimizer: str = "sgd",
        class_names: Optional[list[str]] = None,
        mean: Optional[list[float]] = None,
        std: Optional[list[float]] = None,
        token_pool: str = "token",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if is_vit_backbone(backbone):
            self.model = build_vit_backbone(
                backbone, num_classes, pretrained, token_pool, in_channels
            )
        else:
            self.model = build_backbone(
                backbone, num_classes, pretrained, output_stride, in_channels
            )
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.val_scores = MultiLabelScores(num_classes, threshold=0.5)

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
        self.val_scores.update(logits.sigmoid(), labels)

    def on_validation_epoch_end(self) -> None:
        """mAP / F1 over the classes present in the val split (synced over processes), and each
        present class's AP, as logged scalars: they reach ``trainer.callback_metrics`` whatever
        the strategy (spawned processes included)."""
        scores = self.val_scores.compute()
        self.val_scores.reset()
        names = self.hparams.class_names or [str(i) for i in range(self.hparams.num_classes)]
        self.log_dict({"val/mAP": scores["mAP"], "val/f1": scores["f1"]}, prog_bar=True)
        self.log_dict(
            {
                f"val/ap_{name}": ap
                for name, ap in zip(names, scores["per_class_ap"])
                if ap is not None
            }
        )

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        head = head_of(self.model)
        head_ids = {id(p) for p in head.parameters()}
        backbone = [p for p in self.model.parameters() if id(p) not in head_ids]
        groups = [
            {"params": backbone, "lr": hp.lr * hp.backbone_lr_mult},
            {"params": list(head.parameters()), "lr": hp.lr},
        ]
        return optimizer_with_schedule(self, groups)
