"""The fully connected CRF (Krähenbühl & Koltun, 2011) from the optional ``crf`` extra: numpy on
the CPU, image by image."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from wsss.images import PIXEL_RANGE, denormalise
from wsss.pseudo.pixels import as_pixel_mask, check_scores

CRF_MISSING = "dense CRF needs the optional extra: pip install -e '.[crf]' (pydensecrf2)"


def crf_probabilities(
    image: np.ndarray,
    label_probs: np.ndarray,
    iterations: int = 5,
    gaussian_sxy: float = 3,
    gaussian_compat: float = 3,
    bilateral_sxy: float = 50,
    bilateral_srgb: float = 13,
    bilateral_compat: float = 10,
) -> np.ndarray:
    """Mean-field marginals (L, H, W) of a fully connected CRF (Krähenbühl & Koltun, 2011).

    image: HxWx3 uint8 colours (HxW or HxWx1 grey images are repeated to three channels);
    label_probs: (L, H, W) non-negative scores per label, normalised here. Needs the optional
    ``pydensecrf2`` package (imported as ``pydensecrf``).
    """
    try:  # optional extra, imported where it is used so the package works without it
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:
        raise ImportError(CRF_MISSING) from exc
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be HxWx3, got shape {image.shape}")
    image = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    probs = np.asarray(label_probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"label_probs must be (L, H, W) with (H, W) = {image.shape[:2]}, "
            f"got shape {probs.shape}"
        )
    num_labels, height, width = probs.shape
    probs = np.clip(np.nan_to_num(probs, nan=0.0), 1e-5, None)
    probs = probs / probs.sum(0, keepdims=True)
    unary = np.ascontiguousarray(-np.log(probs).reshape(num_labels, -1), dtype=np.float32)
    model = dcrf.DenseCRF2D(width, height, num_labels)
    model.setUnaryEnergy(unary)
    model.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    model.addPairwiseBilateral(
        sxy=bilateral_sxy,
        srgb=bilateral_srgb,
        compat=bilateral_compat,
        rgbim=np.ascontiguousarray(image, dtype=np.uint8),
    )
    return np.asarray(model.inference(iterations), dtype=np.float32).reshape(
        num_labels, height, width
    )


def dense_crf(image: np.ndarray, label_probs: np.ndarray, iterations: int = 5) -> np.ndarray:
    """(H, W) index of the most likely label after the CRF of ``crf_probabilities``."""
    return crf_probabilities(image, label_probs, iterations).argmax(0)


def crf(
    scores: Tensor, colours: Sequence[np.ndarray], iterations: int = 5, **pairwise: float
) -> Tensor:
    """The dense CRF over a batch: (B, C, H, W) scores -> (B, C, H, W) marginals, on the scores'
    device. colours: B HxWx3 uint8 images, each of its image's true size (at the top left of a
    padded canvas); pixels outside them keep their scores. ``pairwise``: the keyword parameters
    of ``crf_probabilities``."""
    check_scores(scores)
    out = scores.float().clone()
    for i, image in enumerate(colours):
        h, w = np.asarray(image).shape[:2]
        probs = scores[i, :, :h, :w].float().cpu().numpy()
        q = crf_probabilities(image, probs, iterations, **pairwise)
        out[i, :, :h, :w] = torch.from_numpy(q).to(out.device)
    return out


def crf_refine(
    scores: Tensor,
    images: Tensor,
    valid: Optional[Tensor] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    **options: float,
) -> Tensor:
    """The dense CRF on normalised (B, C, H, W) images: each image's true part (the bounding box of
    its ``valid`` pixels) is de-normalised with ``mean`` / ``std`` to the 0..255 colours the CRF's
    bilateral term reads. ``options``: ``iterations`` and the pairwise parameters of ``crf``."""
    mask = as_pixel_mask(valid, scores)[:, 0]
    colours = []
    for i in range(len(scores)):
        rows, cols = mask[i].any(1).nonzero(), mask[i].any(0).nonzero()
        h = int(rows.max()) + 1 if len(rows) else 0
        w = int(cols.max()) + 1 if len(cols) else 0
        colours.append(
            denormalise(images[i, :, : max(h, 1), : max(w, 1)].cpu(), mean, std, PIXEL_RANGE)
        )
    return crf(scores, colours, iterations=int(options.pop("iterations", 5)), **options)
