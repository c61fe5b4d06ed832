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


def split_by_confidence(
    mask: Tensor, confidence: Tensor, threshold: float
) -> tuple[Tensor, Tensor]:
    """(the mask with its uncertain pixels set to 255, the boolean map of those pixels):
    uncertain means labelled (not 255) with confidence / 255 below ``threshold``."""
    uncertain = (mask != IGNORE_INDEX) & (confidence.to(torch.float32) / 255.0 < threshold)
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
    threshold: float,
) -> Tensor:
    """L_A + L_B: each network's ``mask_loss`` on the certain pixels plus its cross-entropy
    against the other's prediction on the uncertain ones."""
    certain_mask, uncertain = split_by_confidence(mask, confidence, threshold)
    total = logits.sum() * 0.0
    for own, peer in ((logits, twin_logits), (twin_logits, logits)):
        if bool((certain_mask != IGNORE_INDEX).any()):
            total = total + mask_loss(own, certain_mask, confidence)
        total = total + peer_cross_entropy(own, peer, uncertain)
    return total
