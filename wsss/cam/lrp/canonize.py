"""Graph passes that rewrite what the rules see before the relevance plan is built, like zennit's
canonizers: today, BatchNorm folded into the convolution before it.

A fold is decided once per graph (``batchnorm_folds``); the conv's op rule then receives the
folded weights (``BatchNormFold.fold_into``) and reads its output after the BatchNorm, so op code
never asks which composite it runs under. Weights are read at every sweep, so a plan stays valid
while the model trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_affine(bn: nn.Module, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """BatchNorm in eval mode as y = scale·x + shift (per channel)."""
    mean = bn.running_mean.detach().to(dtype) if bn.running_mean is not None else 0.0
    var = bn.running_var.detach().to(dtype) if bn.running_var is not None else 1.0
    scale = torch.rsqrt(torch.as_tensor(var + bn.eps, dtype=dtype))
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(dtype)
    return scale, shift


@dataclass(frozen=True)
class BatchNormFold:
    """A BatchNorm module folded into the conv before it, and the BatchNorm's graph node (whose
    value is the folded layer's output)."""

    batchnorm: nn.Module
    node: fx.Node

    def fold_into(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """The conv's (weight, bias) with the BatchNorm's affine map applied after it."""
        scale, shift = batchnorm_affine(self.batchnorm, weight.dtype)
        weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
        return weight, shift if bias is None else bias * scale + shift


def batchnorm_folds(
    nodes: list[fx.Node], modules: dict[str, nn.Module]
) -> dict[fx.Node, BatchNormFold]:
    """conv node -> its fold, for every conv (a module, or F.conv*d as in timm's weight-
    standardised and "same"-padded convs) whose only user is a BatchNorm module (timm's
    BatchNormAct2d included: its BatchNorm is folded, its activation passes relevance through
    like any element-wise activation)."""
    folds = {}
    for n in nodes:
        is_conv = (n.op == "call_module" and isinstance(modules[n.target], CONVS)) or (
            n.op == "call_function" and n.target in (F.conv1d, F.conv2d, F.conv3d)
        )
        if not is_conv:
            continue
        users = list(n.users)
        if (
            len(users) == 1
            and users[0].op == "call_module"
            and isinstance(modules[users[0].target], BATCHNORMS)
            and users[0].args[0] is n
        ):
            folds[n] = BatchNormFold(modules[users[0].target], users[0])
    return folds
