"""ClassifierModule: the multi-label image classifier whose attributions become pseudo-masks.

The network keeps torchvision's own module structure (``model.layer4``, ``model.fc``, ...), so
``wsss.cam.RelevanceCAM`` can walk it and layer names match ``named_modules()``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import lightning as L
import torch
import torchvision
from torch import Tensor, nn

from wsss.metrics import MultiLabelScores
from wsss.models.common import check_finite_loss, optimizer_with_schedule

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def _weights_enum(backbone: str):
    return torchvision.models.get_model_weights(backbone).DEFAULT


def build_backbone(backbone: str, num_classes: int, pretrained: bool = False, output_stride: int = 32,
                   in_channels: int = 3) -> nn.Module:
    """A torchvision classifier with a GAP + linear head over ``num_classes`` foreground classes.

    ResNets at output stride 16 dilate layer4 (``replace_stride_with_dilation=[F, F, T]``), the
    usual WSSS backbone. VGG16-BN gets global average pooling and one linear layer instead of its
    7x7 pooling and MLP. One input channel replaces the first conv (pretrained weights summed).
    """
    weights = _weights_enum(backbone) if pretrained else None
    kwargs: dict[str, Any] = {}
    basic_block = backbone in ("resnet18", "resnet34")
    if backbone in RESNETS and output_stride == 16 and not basic_block:
        kwargs["replace_stride_with_dilation"] = [False, False, True]
    try:
        model = torchvision.models.get_model(backbone, weights=weights, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load ImageNet weights for {backbone} ({exc}). torchvision looks for them in "
            f"{torch.hub.get_dir()}/checkpoints (set TORCH_HOME to move it) and downloads them when "
            f"online. Copy the file there, or run without: classifier.pretrained=false") from exc
    if basic_block and output_stride == 16:
        _dilate_basic_layer4(model)
    if backbone in RESNETS:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
        first = "conv1"
    elif backbone == "vgg16_bn":
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(512, num_classes)
        first = "features.0"
    else:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {RESNETS + ('vgg16_bn',)}")
    if in_channels != 3:
        _set_input_channels(model, first, in_channels)
    return model


def _dilate_basic_layer4(model: nn.Module) -> None:
    """Output stride 16 for BasicBlock ResNets, as torchvision does it for Bottleneck ones
    (which it refuses for BasicBlock): layer4 keeps stride 1 and its later blocks dilate by 2."""
    first, *rest = model.layer4
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for block in rest:
        for conv in (block.conv1, block.conv2):
            conv.dilation, conv.padding = (2, 2), (2, 2)


def _set_input_channels(model: nn.Module, path: str, in_channels: int) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old: nn.Conv2d = getattr(parent, name)
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, old.bias is not None)
    with torch.no_grad():
        new.weight.copy_(old.weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    setattr(parent, name, new)


def head_of(model: nn.Module) -> nn.Module:
    return model.fc if hasattr(model, "fc") else model.classifier


def lr_lambda(schedule: str, total_steps: int | Callable[[], int]):
    """Multiplier of the base learning rate at each optimizer step.

    ``total_steps`` may be a callable, resolved at the first step after step 0 (the multiplier
    at step 0 is 1 whatever the total). Modules pass ``trainer.estimated_stepping_batches`` that
    way: asking for it in ``configure_optimizers`` makes Lightning build the training iterator
    before a resumed fit has restored its epoch, so a loader with workers would replay epoch 0.
    """
    resolved: list[int] = []

    def total() -> int:
        if not resolved:
            resolved.append(max(1, int(total_steps() if callable(total_steps) else total_steps)))
        return resolved[0]

    if schedule == "poly":
        return lambda step: 1.0 if step == 0 else max(0.0, 1.0 - step / total()) ** 0.9
    if schedule == "cosine":
        return lambda step: 1.0 if step == 0 else 0.5 * (1.0 + math.cos(math.pi * min(step, total()) / total()))
    return lambda step: 1.0


def planned_steps(module: L.LightningModule) -> Callable[[], int]:
    """The optimizer steps of the whole fit, asked of the trainer only when first needed."""
    return lambda: int(module.trainer.estimated_stepping_batches) if module._trainer is not None else 1


class ClassifierModule(L.LightningModule):
    """Multi-label BCE classifier; validation reports mAP and F1 at 0.5 over the classes present."""

    def __init__(self, num_classes: int, backbone: str = "resnet18", pretrained: bool = False,
                 output_stride: int = 32, in_channels: int = 3, lr: float = 0.01,
                 backbone_lr_mult: float = 0.1, weight_decay: float = 1e-4, momentum: float = 0.9,
                 schedule: str = "poly", optimizer: str = "sgd", class_names: Optional[list[str]] = None,
                 mean: Optional[list[float]] = None, std: Optional[list[float]] = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_backbone(backbone, num_classes, pretrained, output_stride, in_channels)
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
        self.log_dict({f"val/ap_{name}": ap for name, ap in zip(names, scores["per_class_ap"]) if ap is not None})

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        head = head_of(self.model)
        head_ids = {id(p) for p in head.parameters()}
        backbone = [p for p in self.model.parameters() if id(p) not in head_ids]
        groups = [{"params": backbone, "lr": hp.lr * hp.backbone_lr_mult},
                  {"params": list(head.parameters()), "lr": hp.lr}]
        return optimizer_with_schedule(self, groups)
