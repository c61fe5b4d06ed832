"""Refinement of class score maps along the image's own structure, between the fused maps and
the label maps (``pseudo.refine``): ``none``, ``crf``, ``par`` or ``affinity``.

Every method takes and returns per-pixel class *distributions* ``(B, C, H, W)`` (background in
channel 0, one channel per class slot after it, each pixel summing to 1) and keeps them
distributions, so the label rule and the confidence-ignore rule apply after any of them:

- ``par``: pixel-adaptive refinement, ``par.py``;
- ``affinity``: the random walk with learned affinities, ``walk.py`` (the pair labels that train
  the affinities are in ``affinity_pairs.py``);
- ``crf``: the fully connected CRF from the optional ``crf`` extra, ``crf.py``.
From slot maps to distributions and back to labels: ``distribution.py``.

Pure torch (the CRF excepted: numpy on CPU, image by image), batched, on the inputs' device.
This module is the one entry point, ``refine_scores``; it re-exports the methods' names, so
``from wsss.pseudo.refine import ...`` reaches all of them.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from wsss.pseudo.affinity_pairs import (
    Affinities,
    affinity_labels,
    downsample_labels,
    neighbour_offsets,
    pairwise_affinity,
)
from wsss.pseudo.crf import CRF_MISSING, crf, crf_probabilities, crf_refine, dense_crf
from wsss.pseudo.distribution import (
    distribution_labels,
    ignore_uncertain,
    slot_distribution,
    top2_margin,
)
from wsss.pseudo.par import PAR_DILATIONS, par, par_affinity, par_offsets
from wsss.pseudo.pixels import check_scores, pixel_mask
from wsss.pseudo.walk import random_walk, random_walk_refine, transition_weights, walk_offsets

REFINE_METHODS = ("none", "crf", "par", "affinity")
"""The ``pseudo.refine`` choices, in the order the config lists them."""

__all__ = [
    "CRF_MISSING",
    "PAR_DILATIONS",
    "REFINE_METHODS",
    "Affinities",
    "affinity_labels",
    "check_refine_method",
    "crf",
    "crf_probabilities",
    "crf_refine",
    "dense_crf",
    "distribution_labels",
    "downsample_labels",
    "ignore_uncertain",
    "neighbour_offsets",
    "pairwise_affinity",
    "par",
    "par_affinity",
    "par_offsets",
    "pixel_mask",
    "random_walk",
    "random_walk_refine",
    "refine_scores",
    "slot_distribution",
    "top2_margin",
    "transition_weights",
    "walk_offsets",
]


def check_refine_method(method: str) -> str:
    """``method`` if it is one of REFINE_METHODS, else a ValueError listing the choices."""
    if method not in REFINE_METHODS:
        raise ValueError(
            f"unknown refinement {method!r}; choose one of {', '.join(REFINE_METHODS)}"
        )
    return method


def refine_scores(
    method: str,
    scores: Tensor,
    images: Optional[Tensor] = None,
    *,
    valid: Optional[Tensor] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    affinities: Optional[Affinities] = None,
    **options: float,
) -> Tensor:
    """Refine (B, C, H, W) per-pixel distributions (background in channel 0) with ``method``.

    images: (B, 3 or 1, H, W) as the classifier saw them (normalised); ``mean`` / ``std`` undo
    the normalisation for ``crf``, which needs 0..255 colours (``par`` does not care).
    valid: (B, H, W) true-image pixels of a padded canvas. ``affinity`` needs ``affinities`` from
    ``AffinityModule.predict_affinity`` (and no images). ``options`` go to the method (``par``: dilations,
    iterations, colour_scale, position_weight; ``affinity``: beta, steps; ``crf``: iterations and
    the pairwise parameters). Returns float32 distributions of the same shape.
    """
    check_refine_method(method)
    check_scores(scores)
    if method == "none":
        return scores.float()
    if method == "affinity":
        if affinities is None:
            raise ValueError(
                "refinement 'affinity' needs affinities from AffinityModule.predict_affinity"
            )
        return random_walk_refine(scores, affinities, valid=valid, **options)
    if images is None:
        raise ValueError(f"refinement {method!r} needs the images")
    if method == "par":
        return par(scores, images, valid=valid, **options)
    return crf_refine(scores, images, valid=valid, mean=mean, std=std, **options)
