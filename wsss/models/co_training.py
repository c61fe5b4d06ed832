"""Co-training with a twin segmenter, BECO-style: the pixels whose pseudo-mask is uncertain are
learnt from the other network's prediction instead of from the mask (docs/ALGORITHMS.md, the
co-trained twin)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.label_maps import IGNORE_INDEX

MaskLoss = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


def split_by_confidence(mask: Tensor, confidence: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """(the mask with its uncertain pixels set to 255, the boolean map of those pixels). Per
    class of the batch, the uncertain pixels are those of its labelled pixels whose confidence
    lies below the class's ``fraction`` quantile: ranked within each class, because the margin
    of a foreground pixel runs far below that of a background one."""
    level = confidence.to(torch.float32)
    uncertain = torch.zeros_like(mask, dtype=torch.bool)
    if fraction > 0:
        for label in mask.unique().tolist():
            if label == IGNORE_INDEX:
                continue
            members = mask == label
            cut = torch.quantile(level[members], fraction)
            uncertain |= members & (level < cut)
    return mask.masked_fill(uncertain, IGNORE_INDEX), uncertain


def peer_cross_entropy(logits: Tensor, peer_logits: Tensor, uncertain: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` against the peer's argmax over the uncertain pixels (no
    gradient into the peer); zero when there is none."""
    if not bool(uncertain.any()):
        return logits.sum() * 0.0
    target = peer_logits.detach().argmax(1).masked_fill(~uncertain, IGNORE_INDEX)
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)


def co_training_loss(
    mask_loss: MaskLoss,
    logits: Tensor,
    twin_logits: Tensor,
    mask: Tensor,
    confidence: Tensor,
    fraction: float,
) -> Tensor:
    """L_A + L_B: each network's ``mask_loss`` on the certain pixels plus its cross-entropy
    against the other's prediction on the uncertain ones."""
    certain_mask, uncertain = split_by_confidence(mask, confidence, fraction)
    total = logits.sum() * 0.0
    for own, peer in ((logits, twin_logits), (twin_logits, logits)):
        if bool((certain_mask != IGNORE_INDEX).any()):
            total = total + mask_loss(own, certain_mask, confidence)
        total = total + peer_cross_entropy(own, peer, uncertain)
    return total
