"""AffinityModule: inter-pixel affinity learned from confident seeds (AffinityNet / IRN).

The classifier's backbone gives features at several levels; a small head maps each to a common
width, upsamples them to the feature grid (1/``stride`` of the image, ceil) and fuses them into a
per-cell embedding e. Transformer levels, (B, N, C) tokens (or Swin's channels-last grids), are
reshaped to their patch grid first (``wsss.cam.tokens``), so a ViT classifier's blocks serve as
levels like a CNN's stages. The affinity of two cells within ``radius`` is ``exp(-mean |e_p - e_q|)``
(``wsss.pseudo.affinity_pairs.pairwise_affinity``). Training pairs come from the seed masks alone
(``affinity_labels``): same label -> 1, different -> 0, pairs touching the 255 band ignored; the
loss balances background pairs, foreground pairs and negative pairs as AffinityNet does.
``predict_affinity`` gives what the random walk (``propagate``) needs.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence, Union

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.feature_extraction import create_feature_extractor

from wsss.cam.tokens import to_grid, token_layout
from wsss.models.common import check_finite_loss, optimizer_with_schedule
from wsss.models.vit_backbones import GridPositionEmbedding
from wsss.pseudo.affinity_pairs import Affinities, affinity_labels, pairwise_affinity
from wsss.pseudo.walk import random_walk_refine

DEFAULT_LAYERS = ("layer1", "layer2", "layer3", "layer4")
EPS = 1e-5


def affinity_loss(affinity: Tensor, labels: dict[str, Tensor]) -> dict[str, Tensor]:
    """AffinityNet's balanced loss on (B, K, h, w) affinities in [0, 1] and the bool pair labels
    of ``affinity_labels``: ``bg/4 + fg/4 + neg/2`` where bg and fg are the mean of
    ``-log(a)`` over background / foreground positive pairs and neg the mean of ``-log(1 - a)``
    over negative pairs. A kind with no pair in the batch contributes 0. Also returns each part."""
    a = affinity.float()
    parts = {}
    for name, target in (("bg", "bg_pos"), ("fg", "fg_pos"), ("neg", "neg")):
        pairs = labels[target]
        values = -torch.log(a[pairs] + EPS) if name != "neg" else -torch.log(1.0 + EPS - a[pairs])
        parts[name] = values.mean() if values.numel() else a.sum() * 0.0
    parts["loss"] = parts["bg"] / 4 + parts["fg"] / 4 + parts["neg"] / 2
    return parts


def pair_accuracy(affinity: Tensor, labels: dict[str, Tensor]) -> Tensor:
    """Balanced accuracy of ``affinity > 0.5`` on the labelled pairs: the mean of the accuracy on
    positive pairs (bg and fg together) and on negative pairs (NaN if either kind is absent)."""
    positive = labels["bg_pos"] | labels["fg_pos"]
    pos = (affinity[positive] > 0.5).float().mean()
    neg = (affinity[labels["neg"]] <= 0.5).float().mean()
    return (pos + neg) / 2


def _first_conv(model: nn.Module) -> nn.Conv2d:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise ValueError("the backbone has no nn.Conv2d")


class AffinityNetwork(nn.Module):
    """Backbone levels -> per-level 1x1 conv + GroupNorm + ReLU -> upsampled to the feature grid
    -> concatenated -> 1x1 conv -> (B, embed_dim, ceil(H/stride), ceil(W/stride)) embedding.
    Token levels are put on their patch grid, prefix tokens dropped, before the branches."""

    def __init__(
        self,
        backbone: nn.Module,
        layers: Sequence[str] = DEFAULT_LAYERS,
        stride: int = 4,
        hidden: int = 64,
        embed_dim: int = 64,
        freeze_backbone: bool = True,
    ) -> None:
        super().__init__()
        names = dict(backbone.named_modules())
        missing = [name for name in layers if name not in names]
        if missing:
            raise ValueError(
                f"backbone has no layer(s) {missing}; its top-level layers are "
                f"{[n for n, _ in backbone.named_children()]}"
            )
        self.layers = list(layers)
        self.stride = stride
        self.freeze_backbone = freeze_backbone
        self.tokens = token_layout(backbone)
        self.features = create_feature_extractor(
            copy.deepcopy(backbone).eval(),
            return_nodes={name: name for name in self.layers},
            # reads the image's patch grid as Python ints: one node, run as it is
            tracer_kwargs={"leaf_modules": [GridPositionEmbedding]},
        )
        in_channels = _first_conv(backbone).in_channels
        with torch.no_grad():
            probe = self.levels(torch.zeros(1, in_channels, 64, 64))
        widths = [probe[name].shape[1] for name in self.layers]
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, hidden, 1, bias=False),
                nn.GroupNorm(max(1, hidden // 16), hidden),
                nn.ReLU(inplace=True),
            )
            for width in widths
        )
        self.fuse = nn.Conv2d(hidden * len(widths), embed_dim, 1)
        if freeze_backbone:
            self.features.requires_grad_(False)

    def train(self, mode: bool = True) -> "AffinityNetwork":
        super().train(mode)
        self.features.eval()  # BatchNorm statistics of the classifier stay as they are
        return self

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return -(-height // self.stride), -(-width // self.stride)

    def levels(self, images: Tensor) -> dict[str, Tensor]:
        """The backbone's outputs at ``layers``, each as a (B, C, h, w) map."""
        feats = self.features(images)
        hw = tuple(images.shape[-2:])
        return {name: to_grid(feats[name], hw, self.tokens) for name in self.layers}

    def forward(self, images: Tensor) -> Tensor:
        size = self.grid_size(*images.shape[-2:])
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            feats = self.levels(images)
        levels = [
            F.interpolate(
                branch(feats[name].float()), size=size, mode="bilinear", align_corners=False
            )
            for name, branch in zip(self.layers, self.branches)
        ]
        return self.fuse(torch.cat(levels, 1))


class AffinityModule(L.LightningModule):
    """Learns inter-pixel affinities from seed masks (``batch["image"]``, ``batch["mask"]`` with
    255 = uncertain); ``predict_affinity(images)`` feeds the random walk.

    backbone: the classifier network (``ClassifierModule.export()``); it is copied, so the
    caller's model never changes. ``layers`` name its modules (``named_modules()``) whose outputs
    are the feature levels. ``freeze_backbone`` trains the head only (IRN); otherwise (the
    default, measured better: scripts/benchmark_refine.py --quality) the backbone is fine-tuned
    at ``lr * backbone_lr_mult`` (AffinityNet), its BatchNorm statistics kept as they are.
    Load a checkpoint with ``AffinityModule.load_from_checkpoint(path, backbone=...)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        layers: Sequence[str] = DEFAULT_LAYERS,
        stride: int = 4,
        radius: int = 5,
        hidden: int = 64,
        embed_dim: int = 64,
        freeze_backbone: bool = False,
        lr: float = 1e-3,
        backbone_lr_mult: float = 0.1,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        optimizer: str = "adamw",
        schedule: str = "poly",
        beta: float = 8.0,
        steps: int = 256,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of adamw, sgd")
        self.save_hyperparameters(ignore=["backbone"])
        self.net = AffinityNetwork(backbone, layers, stride, hidden, embed_dim, freeze_backbone)

    def forward(self, images: Tensor) -> Tensor:
        """(B, embed_dim, h, w) embeddings on the feature grid."""
        return self.net(images)

    def affinities(self, images: Tensor) -> Tensor:
        """(B, K, h, w) affinities in the layout of ``neighbour_offsets(radius)``, differentiable."""
        return pairwise_affinity(self(images), self.hparams.radius)

    def _step(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor]]:
        affinity = self.affinities(batch["image"])
        labels = affinity_labels(batch["mask"], self.hparams.radius, self.hparams.stride)
        if labels["neg"].shape[-2:] != affinity.shape[-2:]:
            raise ValueError(
                f"mask {tuple(batch['mask'].shape)} and image {tuple(batch['image'].shape)} "
                f"must have the same size"
            )
        return affinity_loss(affinity, labels), affinity, labels

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        parts, _, _ = self._step(batch)
        check_finite_loss(self, parts["loss"])
        size = len(batch["image"])
        self.log("train/loss", parts["loss"], prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": parts[k] for k in ("bg", "fg", "neg")}, batch_size=size)
        return parts["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        parts, affinity, labels = self._step(batch)
        size = len(batch["image"])
        self.log("val/loss", parts["loss"], prog_bar=True, batch_size=size, sync_dist=True)
        accuracy = pair_accuracy(affinity, labels)
        if not torch.isnan(accuracy):
            self.log("val/pair_acc", accuracy, batch_size=size, sync_dist=True)

    @torch.no_grad()
    def predict_affinity(self, images: Tensor) -> Affinities:
        """Affinities of (B, C, H, W) images, normalised as for the classifier, on the feature grid
        ceil(H/stride) x ceil(W/stride); no gradient whatever the caller's grad mode."""
        return Affinities(self.affinities(images).float(), self.hparams.radius, self.hparams.stride)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        head = [p for n, p in self.net.named_parameters() if not n.startswith("features.")]
        groups = [{"params": head, "lr": hp.lr}]
        if not hp.freeze_backbone:
            groups.append(
                {"params": list(self.net.features.parameters()), "lr": hp.lr * hp.backbone_lr_mult}
            )
        return optimizer_with_schedule(self, groups)


def propagate(
    module_or_affinities: Union[AffinityModule, Affinities],
    scores: Tensor,
    images: Optional[Tensor] = None,
    valid: Optional[Tensor] = None,
    beta: Optional[float] = None,
    steps: Optional[int] = None,
    boundary_power: float = 0.0,
) -> Tensor:
    """Random-walk refinement of (B, C, H, W) image-resolution distributions (background
    included) with the affinities of ``images`` (computed here by the module) or given ones.
    beta / steps default to the module's hyperparameters (8 and 256 without a module);
    ``boundary_power`` > 0 makes the walk boundary-aware (``wsss.pseudo.boundary``)."""
    if isinstance(module_or_affinities, AffinityModule):
        if images is None:
            raise ValueError("propagate with an AffinityModule needs the images")
        hp = module_or_affinities.hparams
        beta = hp.beta if beta is None else beta
        steps = hp.steps if steps is None else steps
        affinities = module_or_affinities.predict_affinity(images)
    else:
        affinities = module_or_affinities
    return random_walk_refine(
        scores,
        affinities,
        valid=valid,
        beta=8.0 if beta is None else beta,
        steps=256 if steps is None else steps,
        boundary_power=boundary_power,
    )
