"""From fused class maps to a label map: per-class background thresholds, argmax over
{background, present classes}, an ignore band of uncertain pixels, and optional dense CRF."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

IGNORE = 255


def scores_to_labels(scores: Tensor, classes: Tensor, valid: Tensor, thresholds: Tensor | float,
                     ignore_band: float = 0.0) -> Tensor:
    """Label maps (B, H, W) uint8 from per-slot scores.

    scores: (B, K, H, W) in [0, 1], one slot per present class; classes: (B, K) mask values of the
    slots (1..C); valid: (B, K), False for padding slots; thresholds: scalar or (B, K) background
    threshold per slot. A pixel takes the slot with the largest margin ``score - threshold`` if
    that margin is positive, else background 0; pixels whose best margin lies within
    ``ignore_band`` of zero are uncertain and become 255.
    """
    if not torch.is_tensor(thresholds):
        thresholds = torch.full(classes.shape, float(thresholds), device=scores.device)
    margins = scores.float() - thresholds.to(scores.device).float()[:, :, None, None]
    margins = margins.masked_fill(~valid.to(scores.device)[:, :, None, None], float("-inf"))
    best, slot = margins.max(dim=1)
    labels = torch.gather(classes.to(scores.device), 1, slot.flatten(1)).view_as(slot)
    labels = torch.where(best > 0, labels, torch.zeros_like(labels))
    if ignore_band > 0:
        labels = torch.where(best.abs() < ignore_band, torch.full_like(labels, IGNORE), labels)
    return labels.to(torch.uint8)


def dense_crf(image: np.ndarray, label_probs: np.ndarray, iterations: int = 5) -> np.ndarray:
    """Refine (L, H, W) label probabilities on an HxWx3 uint8 image with a fully connected CRF
    (Krähenbühl & Koltun), returning the (H, W) index of the most likely label."""
    try:
        import pydensecrf.densecrf as dcrf
        from pydensecrf.utils import unary_from_softmax
    except ImportError as exc:
        raise ImportError("dense CRF (pseudo.crf=true) needs the optional extra: "
                          "pip install -e '.[crf]' (pydensecrf2)") from exc
    num_labels, height, width = label_probs.shape
    probs = np.clip(label_probs.astype(np.float32), 1e-5, None)
    probs /= probs.sum(0, keepdims=True)
    crf = dcrf.DenseCRF2D(width, height, num_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=50, srgb=13, rgbim=np.ascontiguousarray(image.astype(np.uint8)), compat=10)
    inference = np.array(crf.inference(iterations)).reshape(num_labels, height, width)
    return inference.argmax(0)
