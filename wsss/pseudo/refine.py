"""Refinement of class score maps along the image's own structure, between the fused maps and
the label maps (``pseudo.refine``): ``none``, ``crf``, ``par`` or ``affinity``.

Every method takes and returns per-pixel class *distributions* ``(B, C, H, W)`` (background in
channel 0, one channel per class slot after it, each pixel summing to 1) and keeps them
distributions, so the label rule and the confidence-ignore rule apply after any of them:

- ``par``: pixel-adaptive refinement (AFA / ToCo). Affinities from colour and position to 8
  neighbours at several dilations, no training; scores are averaged over them a few times.
- ``affinity``: random walk (AffinityNet / IRN). Learned affinities between each pixel and its
  neighbours within a radius, at feature resolution, raised to a power ``beta`` and
  row-normalised into a transition matrix kept in sparse neighbour form; scores diffuse ``steps``
  times. ``affinity_labels`` gives the pair labels that train the affinities.
- ``crf``: fully connected CRF (Krähenbühl & Koltun, 2011) from the optional ``crf`` extra.

Pure torch (the CRF excepted: numpy on CPU, image by image), batched, on the inputs' device.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from wsss.pseudo.labels import IGNORE, _slot_thresholds

REFINE_METHODS = ("none", "crf", "par", "affinity")
CRF_MISSING = "dense CRF needs the optional extra: pip install -e '.[crf]' (pydensecrf2)"
PAR_DILATIONS = (1, 2, 4, 8, 12, 24)
_EIGHT = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def check_refine_method(method: str) -> str:
    """``method`` if it is one of REFINE_METHODS, else a ValueError listing the choices."""
    if method not in REFINE_METHODS:
        raise ValueError(f"unknown refinement {method!r}; choose one of {', '.join(REFINE_METHODS)}")
    return method


# ----------------------------------------------------------------------------------------------
# from slot maps to distributions and back


def slot_distribution(fused: Tensor, valid: Tensor, thresholds: Tensor | float,
                      background: float = 0.5) -> Tensor:
    """(B, 1+K, H, W) distribution over {background, slots} from fused slot maps.

    fused: (B, K, H, W) in [0, 1]; valid: (B, K) real slots; thresholds: scalar or (B, K) per-slot
    background thresholds, as for ``scores_to_labels``. Background scores ``background`` and slot
    k scores ``max(0, background + fused_k - threshold_k)`` (0 for padding slots), normalised per
    pixel. Its argmax is the label rule of ``scores_to_labels`` (ties go to background), so with
    refinement ``none`` the labels do not change; a slot's score grows with its margin.
    """
    if fused.dim() != 4 or valid.shape != fused.shape[:2]:
        raise ValueError(f"fused must be (B, K, H, W) and valid (B, K), got {tuple(fused.shape)} "
                         f"and {tuple(valid.shape)}")
    t = _slot_thresholds(thresholds, valid.shape, fused.device)
    slots = (background + fused.float() - t[:, :, None, None]).clamp_min(0)
    slots = torch.nan_to_num(slots, nan=0.0) * valid.to(fused.device, torch.float32)[:, :, None, None]
    scores = torch.cat([torch.full_like(slots[:, :1], background), slots], 1)
    return scores / scores.sum(1, keepdim=True)


def distribution_labels(probs: Tensor, classes: Tensor, valid: Tensor) -> Tensor:
    """(B, H, W) uint8 label map: the argmax of (B, 1+K, H, W) ``probs`` over background and the
    valid slots, channel k+1 mapped to mask value ``classes[:, k]``; ties go to the lower channel."""
    b, c = probs.shape[:2]
    if classes.shape != (b, c - 1) or valid.shape != (b, c - 1):
        raise ValueError(f"classes and valid must be (B, K) = {(b, c - 1)} for {c} channels, got "
                         f"{tuple(classes.shape)} and {tuple(valid.shape)}")
    keep = torch.cat([valid.new_ones(b, 1), valid], 1).to(probs.device, torch.bool)
    choice = probs.float().masked_fill(~keep[:, :, None, None], float("-inf")).argmax(1)
    lookup = torch.cat([classes.new_zeros(b, 1), classes], 1).to(probs.device, torch.long)
    return torch.gather(lookup, 1, choice.flatten(1)).view_as(choice).to(torch.uint8)


def top2_margin(probs: Tensor) -> Tensor:
    """(B, H, W) difference between the two largest channels of a (B, C, H, W) distribution
    (1 for a single channel): 0 where two classes tie, 1 where one takes everything."""
    if probs.shape[1] < 2:
        return probs.new_ones(probs.shape[:1] + probs.shape[2:])
    top = probs.float().topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def ignore_uncertain(labels: Tensor, probs: Tensor, margin: Optional[float] = None,
                     quantile: Optional[float] = None, pixel_mask: Optional[Tensor] = None) -> Tensor:
    """Labels with the uncertain pixels set to 255, chosen from the refined scores alone.

    A pixel is uncertain when the margin between its two best classes (``top2_margin`` of the
    refined distribution ``probs``) is below a band:
    - ``margin``: a fixed band in probability units (0.1 = the winner leads by under 10 points);
    - ``quantile``: per image, the band is that quantile of the image's own margins over
      ``pixel_mask`` (e.g. 0.1 ignores each image's least certain 10 %), so it adapts to how
      sharp each image's maps are;
    - both: the smaller of the two bands, so a confident image loses no more than ``margin``
      allows and an unsure one no more than ``quantile`` of its pixels.
    Neither: labels unchanged. Pixels already 255 stay 255; pixels outside ``pixel_mask``
    (B, H, W) are left as they are.
    """
    if margin is None and quantile is None:
        return labels
    if quantile is not None and not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if margin is not None and margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    gaps = top2_margin(probs)
    b = gaps.shape[0]
    inside = (torch.ones_like(gaps, dtype=torch.bool) if pixel_mask is None
              else pixel_mask.to(gaps.device, torch.bool).expand_as(gaps))
    band = gaps.new_full((b,), math.inf if margin is None else float(margin))
    if quantile is not None:
        for i in range(b):
            values = gaps[i][inside[i]]
            if values.numel():
                band[i] = torch.minimum(band[i], torch.quantile(values, quantile))
    uncertain = (gaps < band[:, None, None]) & inside
    return labels.masked_fill(uncertain.to(labels.device), IGNORE)


def pixel_mask(sizes: Optional[Tensor], height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, H, W) bool, True inside each image's true (h, w) at the top left of a padded canvas
    (``batch["size"]`` from ``pad_collate``); without sizes, (1, H, W) all True."""
    if sizes is None:
        return torch.ones(1, height, width, dtype=torch.bool, device=device)
    sizes = sizes.to(device, torch.long)
    rows = torch.arange(height, device=device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(width, device=device)[None, None, :] < sizes[:, 1, None, None]
    return rows & cols


def _as_pixel_mask(valid: Optional[Tensor], like: Tensor) -> Tensor:
    """(B, 1, H, W) float 0/1 from None, (H, W), (B, H, W) or (B, 1, H, W)."""
    b, _, h, w = like.shape
    if valid is None:
        return like.new_ones(b, 1, h, w, dtype=torch.float32)
    valid = valid.to(like.device)
    if valid.dim() == 2:
        valid = valid[None]
    if valid.dim() == 3:
        valid = valid[:, None]
    if valid.shape[-2:] != (h, w) or valid.shape[1] != 1 or valid.shape[0] not in (1, b):
        raise ValueError(f"valid must be (B, H, W) = {(b, h, w)}, got {tuple(valid.shape)}")
    return valid.float().expand(b, 1, h, w)


def _shifted(padded: Tensor, dy: int, dx: int, pad: int, height: int, width: int) -> Tensor:
    """The values at (y + dy, x + dx) for every (y, x), from a tensor zero-padded by ``pad``."""
    return padded[..., pad + dy:pad + dy + height, pad + dx:pad + dx + width]


def _check_scores(scores: Tensor, name: str = "scores") -> None:
    if scores.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(scores.shape)}")


# ----------------------------------------------------------------------------------------------
# PAR: pixel-adaptive refinement


def par_offsets(dilations: Sequence[int] = PAR_DILATIONS) -> list[tuple[int, int]]:
    """The 8 neighbours of a pixel at each dilation, as (dy, dx)."""
    if not dilations or min(dilations) < 1:
        raise ValueError(f"dilations must be positive integers, got {list(dilations)}")
    return [(dy * d, dx * d) for d in dilations for dy, dx in _EIGHT]


def par_affinity(images: Tensor, valid: Optional[Tensor] = None,
                 dilations: Sequence[int] = PAR_DILATIONS, colour_scale: float = 0.3,
                 position_weight: float = 0.01) -> Tensor:
    """(B, N, H, W) weights of each pixel's N = 8 * len(dilations) neighbours (``par_offsets``),
    summing to 1 over the valid ones (0 for neighbours outside the image or ``valid``).

    The colour term is a softmax over neighbours of ``-mean_c (|I_c(q) - I_c(p)| / (s_c(p) *
    colour_scale))^2`` where s_c(p) is the standard deviation of channel c over p's neighbours:
    differences count relative to the local contrast, so the weights do not change under a
    per-channel affine change of the image (normalised or 0..255 images give the same result).
    A position term, a softmax of ``-(distance / s_d / colour_scale)^2`` (s_d: the spread of the
    neighbour distances), weighted by ``position_weight``, prefers near neighbours.
    Pixels with no valid neighbour get all-zero weights.
    """
    _check_scores(images, "images")
    b, _, h, w = images.shape
    offsets = par_offsets(dilations)
    pad = max(dilations)
    mask = _as_pixel_mask(valid, images)
    img = _standardise(images.float(), mask) * mask  # the weights do not change; fewer rounding errors
    img_pad, mask_pad = F.pad(img, [pad] * 4), F.pad(mask, [pad] * 4)
    present = torch.cat([_shifted(mask_pad, dy, dx, pad, h, w) for dy, dx in offsets], 1) * mask
    # local colour spread over the valid neighbours (population standard deviation)
    total, total_sq = torch.zeros_like(img), torch.zeros_like(img)
    for dy, dx in offsets:
        neighbour = _shifted(img_pad, dy, dx, pad, h, w)  # 0 outside ``valid``
        total.add_(neighbour)
        total_sq.addcmul_(neighbour, neighbour)
    count = present.sum(1, keepdim=True)
    total, total_sq = total / count.clamp_min(1.0), total_sq / count.clamp_min(1.0)
    inverse = 1.0 / (((total_sq - total * total).clamp_min(0).sqrt() + 1e-8) * colour_scale)
    logits = torch.empty(b, len(offsets), h, w, device=img.device)
    for k, (dy, dx) in enumerate(offsets):
        diff = (_shifted(img_pad, dy, dx, pad, h, w) - img).mul_(inverse)
        logits[:, k] = diff.square_().mean(1).neg_()
    colour = torch.softmax(logits.masked_fill_(present == 0, float("-inf")), 1)
    distance = torch.tensor([math.hypot(dy, dx) for dy, dx in offsets], device=img.device)
    position = torch.softmax(-(distance / (distance.std() + 1e-8) / colour_scale) ** 2, 0)
    position = position[None, :, None, None] * present
    position = position / position.sum(1, keepdim=True).clamp_min(1e-12)
    colour = colour.masked_fill_(count == 0, 0.0)  # no valid neighbour: all 0 (softmax gave NaN)
    return (colour + position_weight * position) / (1.0 + position_weight)


def _standardise(images: Tensor, mask: Tensor) -> Tensor:
    """Each image's channels shifted and scaled to mean 0, std 1 over its ``mask`` pixels."""
    count = mask.sum((2, 3), keepdim=True).clamp_min(1.0)
    mean = (images * mask).sum((2, 3), keepdim=True) / count
    var = (((images - mean) * mask) ** 2).sum((2, 3), keepdim=True) / count
    return (images - mean) / (var.sqrt() + 1e-8)


def par(scores: Tensor, images: Tensor, valid: Optional[Tensor] = None,
        dilations: Sequence[int] = PAR_DILATIONS, iterations: int = 10, colour_scale: float = 0.3,
        position_weight: float = 0.01) -> Tensor:
    """Pixel-adaptive refinement: ``iterations`` times, each pixel's scores become the weighted
    mean of its neighbours' (weights from ``par_affinity``).

    scores: (B, C, H, W), background included, at the images' size; images: (B, 3 or 1, H, W),
    normalised or not (the weights are invariant to per-channel affine intensity changes);
    valid: optional (B, H, W) pixel mask of the true image inside a padded canvas: padding is
    never a neighbour and keeps its scores. Each output is a convex combination of inputs, so
    distributions stay distributions. float32 result on the inputs' device.
    """
    _check_scores(scores)
    _check_scores(images, "images")
    if scores.shape[0] != images.shape[0] or scores.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"scores {tuple(scores.shape)} and images {tuple(images.shape)} must share "
                         f"batch size and (H, W); resize the scores to the images first")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    weights = par_affinity(images, valid, dilations, colour_scale, position_weight)
    keep = 1.0 - weights.sum(1, keepdim=True)  # 1 where a pixel has no valid neighbour, else ~0
    offsets, pad = par_offsets(dilations), max(dilations)
    h, w = scores.shape[-2:]
    x = scores.float()
    for _ in range(iterations):
        padded = F.pad(x, [pad] * 4)
        out = x * keep
        for k, (dy, dx) in enumerate(offsets):
            out.addcmul_(weights[:, k:k + 1], _shifted(padded, dy, dx, pad, h, w))
        x = out
    return x


# ----------------------------------------------------------------------------------------------
# pixel pairs within a radius: affinity labels and the random walk


class Affinities(NamedTuple):
    """Predicted affinities in the half-plane neighbour layout of ``neighbour_offsets(radius)``:
    ``values[b, k, y, x]`` in [0, 1] is the affinity of feature cell (y, x) with
    (y + dy_k, x + dx_k); the feature grid is the image at 1/``stride`` (ceil)."""

    values: Tensor
    radius: int
    stride: int


@lru_cache(maxsize=None)
def neighbour_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """Each unordered pair of cells closer than ``radius`` once: (dy, dx) with
    ``0 < dy^2 + dx^2 < radius^2`` in the half plane dy > 0, or dy = 0 and dx > 0, row-major.
    radius 5 gives 34 offsets (68 neighbours), the AffinityNet / IRN setting."""
    if radius < 2:
        raise ValueError(f"radius must be >= 2 (radius 1 has no neighbour), got {radius}")
    return tuple((dy, dx) for dy in range(radius) for dx in range(-radius + 1, radius)
                 if (dy > 0 or dx > 0) and dy * dy + dx * dx < radius * radius)


def downsample_labels(labels: Tensor, stride: int) -> Tensor:
    """(B, H, W) label map -> (B, ceil(H/s), ceil(W/s)): each s x s block takes its label when
    all its pixels share it, else 255 (a block across an edge or the ignore band is uncertain)."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    if stride == 1:
        return labels.long()
    b, h, w = labels.shape
    hs, ws = -(-h // stride), -(-w // stride)
    padded = F.pad(labels.long(), (0, ws * stride - w, 0, hs * stride - h), value=IGNORE)
    blocks = padded.view(b, hs, stride, ws, stride).permute(0, 1, 3, 2, 4).flatten(3)
    low, high = blocks.min(-1).values, blocks.max(-1).values
    return torch.where(low == high, low, torch.full_like(low, IGNORE))


def affinity_labels(seeds: Tensor, radius: int, stride: int = 1) -> dict[str, Tensor]:
    """Pair labels from a seed label map, in the half-plane layout of ``neighbour_offsets``.

    seeds: (B, H, W), 0 = background, 255 = uncertain; taken to the feature grid first by
    ``downsample_labels(seeds, stride)``. Returns bool (B, K, h, w) tensors, for the pair of cell
    p = (y, x) and p + offset_k:
    - ``bg_pos``: both background;
    - ``fg_pos``: both the same foreground class;
    - ``neg``: two different labels.
    Pairs touching 255, or whose partner falls outside the map, are in none of them.
    """
    cells = downsample_labels(seeds, stride)
    h, w = cells.shape[-2:]
    offsets = neighbour_offsets(radius)
    pad = radius
    padded = F.pad(cells, [pad] * 4, value=IGNORE)
    partner = torch.stack([_shifted(padded, dy, dx, pad, h, w) for dy, dx in offsets], 1)
    here = cells[:, None].expand_as(partner)
    known = (here != IGNORE) & (partner != IGNORE)
    same = known & (here == partner)
    return {"bg_pos": same & (here == 0), "fg_pos": same & (here != 0), "neg": known & (here != partner)}


def pairwise_affinity(embeddings: Tensor, radius: int) -> Tensor:
    """(B, K, h, w) affinities ``exp(-mean_c |e_c(p) - e_c(q)|)`` between each cell p and
    p + offset_k (``neighbour_offsets(radius)``) of (B, D, h, w) embeddings (AffinityNet);
    0 where the partner is outside the map. Differentiable."""
    _check_scores(embeddings, "embeddings")
    h, w = embeddings.shape[-2:]
    pad = radius
    padded = F.pad(embeddings, [pad] * 4)
    inside = F.pad(embeddings.new_ones(1, 1, h, w), [pad] * 4)
    out = []
    for dy, dx in neighbour_offsets(radius):
        distance = (_shifted(padded, dy, dx, pad, h, w) - embeddings).abs().mean(1)
        out.append(torch.exp(-distance) * _shifted(inside, dy, dx, pad, h, w)[:, 0])
    return torch.stack(out, 1)


def walk_offsets(radius: int) -> tuple[tuple[int, int], ...]:
    """The neighbours a random-walk step reads, in the order of ``transition_weights``'s
    channels: the cell itself, then each ``neighbour_offsets(radius)`` offset, then each negated."""
    half = neighbour_offsets(radius)
    return ((0, 0),) + half + tuple((-dy, -dx) for dy, dx in half)


def transition_weights(affinity: Tensor, radius: int, beta: float = 8.0,
                       valid: Optional[Tensor] = None) -> Tensor:
    """(B, 2K+1, h, w) rows of the random walk's transition matrix in sparse neighbour form:
    channel j holds T[p, p + walk_offsets(radius)[j]] at cell p.

    affinity: (B, K, h, w) in the half-plane layout of ``neighbour_offsets(radius)``. Each pair's
    affinity, raised to ``beta``, links both ways (a symmetric matrix A); every cell links to
    itself with weight 1; rows are normalised, T = D^-1 A. Cells outside ``valid`` (B, h, w)
    neither link nor are linked (their row is the identity); nor are cells outside the grid.
    """
    _check_scores(affinity, "affinity")
    offsets = neighbour_offsets(radius)
    k, h, w = affinity.shape[1:]
    if k != len(offsets):
        raise ValueError(f"affinity has {k} channels; radius {radius} needs {len(offsets)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    mask = _as_pixel_mask(valid, affinity)
    pad = radius - 1
    mask_pad = F.pad(mask, [pad] * 4)
    partner = torch.cat([_shifted(mask_pad, dy, dx, pad, h, w) for dy, dx in offsets], 1)
    forward = affinity.float().clamp(0, 1) ** beta * mask * partner  # A(p, p + o)
    padded = F.pad(forward, [pad] * 4)
    backward = torch.stack([_shifted(padded[:, i], -dy, -dx, pad, h, w)  # A(p - o, p)
                            for i, (dy, dx) in enumerate(offsets)], 1)
    weights = torch.cat([torch.ones_like(mask), forward, backward], 1)
    return weights / weights.sum(1, keepdim=True)


def random_walk(scores: Tensor, affinity: Tensor, radius: int, beta: float = 8.0, steps: int = 256,
                valid: Optional[Tensor] = None) -> Tensor:
    """Diffuse (B, C, h, w) scores ``steps`` times with the transition matrix of
    ``transition_weights``: x <- T x, each cell's scores becoming the weighted mean of its own and
    its neighbours'. T's rows are distributions, so a distribution per cell stays one; identity
    affinities (all 0) change nothing. Memory O((C + 2K) h w), never (hw)^2; time O(steps K C h w).

    How far scores travel grows with sqrt(steps) cells, so ``steps`` scales with the square of
    the grid side: IRN's 256 suit a 128-cell grid (512 px at stride 4); a 28-cell grid (112 px)
    wants about 256 * (28/128)^2 = 12, and more steps there wash the maps out (measured).
    """
    _check_scores(scores)
    if scores.shape[0] != affinity.shape[0] or scores.shape[-2:] != affinity.shape[-2:]:
        raise ValueError(f"scores {tuple(scores.shape)} and affinity {tuple(affinity.shape)} must "
                         f"share batch size and grid (h, w)")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    weights = transition_weights(affinity, radius, beta, valid)
    offsets = walk_offsets(radius)
    h, w = scores.shape[-2:]
    pad = radius - 1
    x = scores.float()
    for _ in range(steps):
        padded = F.pad(x, [pad] * 4)
        out = x * weights[:, :1]
        for j in range(1, len(offsets)):
            dy, dx = offsets[j]
            out.addcmul_(weights[:, j:j + 1], _shifted(padded, dy, dx, pad, h, w))
        x = out
    return x


def random_walk_refine(scores: Tensor, affinities: Affinities, valid: Optional[Tensor] = None,
                       beta: float = 8.0, steps: int = 256) -> Tensor:
    """The random walk on image-resolution scores: (B, C, H, W) scores are averaged into the
    affinities' feature grid (over ``valid`` pixels only), walked, and upsampled back
    (bilinear). Pixels outside ``valid`` (B, H, W) keep their scores."""
    _check_scores(scores)
    height, width = scores.shape[-2:]
    stride, values = affinities.stride, affinities.values
    h, w = values.shape[-2:]
    if (h, w) != (-(-height // stride), -(-width // stride)):
        raise ValueError(f"affinity grid {(h, w)} does not match scores of size {(height, width)} "
                         f"at stride {stride} (expected ceil(H/stride), ceil(W/stride))")
    mask = _as_pixel_mask(valid, scores)
    pad = (0, w * stride - width, 0, h * stride - height)
    total = F.avg_pool2d(F.pad(scores.float() * mask, pad), stride)
    count = F.avg_pool2d(F.pad(mask, pad), stride)
    cells = total / count.clamp_min(1e-8)
    known = (count > 0).float()
    walked = random_walk(cells, values, affinities.radius, beta, steps, valid=known[:, 0] > 0)
    # upsampled as a normalised convolution, so cells outside ``valid`` do not bleed in
    size = (h * stride, w * stride)
    up = F.interpolate(walked * known, size=size, mode="bilinear", align_corners=False)
    weight = F.interpolate(known, size=size, mode="bilinear", align_corners=False)
    up = (up / weight.clamp_min(1e-8))[..., :height, :width]
    return torch.where(mask > 0, up, scores.float())


# ----------------------------------------------------------------------------------------------
# dense CRF (optional extra)


def crf_probabilities(image: np.ndarray, label_probs: np.ndarray, iterations: int = 5,
                      gaussian_sxy: float = 3, gaussian_compat: float = 3, bilateral_sxy: float = 50,
                      bilateral_srgb: float = 13, bilateral_compat: float = 10) -> np.ndarray:
    """Mean-field marginals (L, H, W) of a fully connected CRF (Krähenbühl & Koltun, 2011).

    image: HxWx3 uint8 colours (HxW or HxWx1 grey images are repeated to three channels);
    label_probs: (L, H, W) non-negative scores per label, normalised here. Needs the optional
    ``pydensecrf2`` package (imported as ``pydensecrf``).
    """
    try:
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
        raise ValueError(f"label_probs must be (L, H, W) with (H, W) = {image.shape[:2]}, "
                         f"got shape {probs.shape}")
    num_labels, height, width = probs.shape
    probs = np.clip(np.nan_to_num(probs, nan=0.0), 1e-5, None)
    probs = probs / probs.sum(0, keepdims=True)
    unary = np.ascontiguousarray(-np.log(probs).reshape(num_labels, -1), dtype=np.float32)
    model = dcrf.DenseCRF2D(width, height, num_labels)
    model.setUnaryEnergy(unary)
    model.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    model.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, compat=bilateral_compat,
                               rgbim=np.ascontiguousarray(image, dtype=np.uint8))
    return np.asarray(model.inference(iterations), dtype=np.float32).reshape(num_labels, height, width)


def dense_crf(image: np.ndarray, label_probs: np.ndarray, iterations: int = 5) -> np.ndarray:
    """(H, W) index of the most likely label after the CRF of ``crf_probabilities``."""
    return crf_probabilities(image, label_probs, iterations).argmax(0)


def crf(scores: Tensor, colours: Sequence[np.ndarray], iterations: int = 5, **pairwise: float) -> Tensor:
    """The dense CRF over a batch: (B, C, H, W) scores -> (B, C, H, W) marginals, on the scores'
    device. colours: B HxWx3 uint8 images, each of its image's true size (at the top left of a
    padded canvas); pixels outside them keep their scores. ``pairwise``: the keyword parameters
    of ``crf_probabilities``."""
    _check_scores(scores)
    out = scores.float().clone()
    for i, image in enumerate(colours):
        h, w = np.asarray(image).shape[:2]
        probs = scores[i, :, :h, :w].float().cpu().numpy()
        q = crf_probabilities(image, probs, iterations, **pairwise)
        out[i, :, :h, :w] = torch.from_numpy(q).to(out.device)
    return out


# ----------------------------------------------------------------------------------------------
# one entry point


def refine_scores(method: str, scores: Tensor, images: Optional[Tensor] = None, *,
                  valid: Optional[Tensor] = None, mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None, affinities: Optional[Affinities] = None,
                  **options: float) -> Tensor:
    """Refine (B, C, H, W) per-pixel distributions (background in channel 0) with ``method``.

    images: (B, 3 or 1, H, W) as the classifier saw them (normalised); ``mean`` / ``std`` undo
    the normalisation for ``crf``, which needs 0..255 colours (``par`` does not care).
    valid: (B, H, W) true-image pixels of a padded canvas. ``affinity`` needs ``affinities`` from
    ``AffinityModule.predict_affinity`` (and no images). ``options`` go to the method (``par``: dilations,
    iterations, colour_scale, position_weight; ``affinity``: beta, steps; ``crf``: iterations and
    the pairwise parameters). Returns float32 distributions of the same shape.
    """
    check_refine_method(method)
    _check_scores(scores)
    if method == "none":
        return scores.float()
    if method == "affinity":
        if affinities is None:
            raise ValueError("refinement 'affinity' needs affinities from AffinityModule.predict_affinity")
        return random_walk_refine(scores, affinities, valid=valid, **options)
    if images is None:
        raise ValueError(f"refinement {method!r} needs the images")
    if method == "par":
        return par(scores, images, valid=valid, **options)
    from wsss.viz import denormalise

    mask = _as_pixel_mask(valid, scores)[:, 0]
    colours = []
    for i in range(len(scores)):
        rows, cols = mask[i].any(1).nonzero(), mask[i].any(0).nonzero()
        h = int(rows.max()) + 1 if len(rows) else 0
        w = int(cols.max()) + 1 if len(cols) else 0
        colours.append(denormalise(images[i, :, :max(h, 1), :max(w, 1)].cpu(), mean, std))
    return crf(scores, colours, iterations=int(options.pop("iterations", 5)), **options)
