"""Graph passes that rewrite what the rules see before the relevance plan is built, like zennit's
canonizers: today, BatchNorm folded into the convolution before it.

A fold is decided once per graph (``batchnorm_folds``); the conv's op rule then receives the
folded weights (``BatchNormFold.fold_into``) and reads its output after the BatchNorm, so op code
never asks which composite it runs under. Weights are read at every sweep, so a plan stays valid
while the model trains.
"""

from __future__ import annotations

import re
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


def _reads_metadata(node: fx.Node) -> bool:
    """x.ndim, x.shape, x.size(), x.dim(): reads no values (timm asserts ranks this way)."""
    if node.op == "call_function" and node.target is getattr:
        return True
    return node.op == "call_method" and node.target in ("size", "dim")


def _batchnorm_of(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The BatchNorm module a node applies: a BatchNorm module node, or F.batch_norm called
    inside a BatchNorm subclass that torch.fx traced through (timm's BatchNormAct2d)."""
    if node.op == "call_module":
        module = modules[node.target]
        return module if isinstance(module, BATCHNORMS) else None
    if node.op == "call_function" and node.target is F.batch_norm:
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path = re.sub(r"@\d+$", "", list(stack)[-1])
            module = modules.get(path)
            return module if isinstance(module, BATCHNORMS) else None
    return None


def batchnorm_folds(
    nodes: list[fx.Node], modules: dict[str, nn.Module]
) -> dict[fx.Node, BatchNormFold]:
    """conv node -> its fold, for every conv (a module, or F.conv*d as in timm's weight-
    standardised and "same"-padded convs) whose only user is a BatchNorm (a module, or the
    F.batch_norm inside timm's BatchNormAct2d, whose activation stays a node of its own)."""
    folds = {}
    for n in nodes:
        is_conv = (n.op == "call_module" and isinstance(modules[n.target], CONVS)) or (
            n.op == "call_function" and n.target in (F.conv1d, F.conv2d, F.conv3d)
        )
        users = [u for u in n.users if not _reads_metadata(u)]
        if not is_conv or len(users) != 1 or users[0].args[0] is not n:
            continue
        batchnorm = _batchnorm_of(users[0], modules)
        if batchnorm is not None:
            folds[n] = BatchNormFold(batchnorm, users[0])
    return folds
