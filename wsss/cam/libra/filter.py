"""Libra-CAM's filter: the classifier queried on masked copies of the image, the official keep
rule over the score changes, and the per-image percentile calibration."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = ("sigmoid", "softmax")
CALIBRATION_CUTS = tuple(round(0.1 * i, 1) for i in range(10))


def check_activation(activation: str) -> None:
    """Refuse a score activation other than sigmoid or softmax."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def probabilities(logits: Tensor, activation: str) -> Tensor:
    """Class scores from logits: sigmoid (multi-label) or softmax, in float32."""
    logits = logits.float()
    return logits.sigmoid() if activation == "sigmoid" else logits.softmax(1)


def keep_references(delta: Tensor, valid: Tensor | None = None) -> Tensor:
    """The official keep rule on score changes Δ (..., R); returns a bool mask (..., R).

    If some valid Δ_r > 0: keep the positive ones with Δ_r >= mean_P − std_P (population std over
    the positive set P). Otherwise keep those with Δ_r > mean + std over all valid references,
    and all valid references if none qualify. Invalid slots are never kept.
    """
    valid = torch.ones_like(delta, dtype=torch.bool) if valid is None else valid.bool()
    delta = delta.float()

    def mean_std(selected: Tensor) -> tuple[Tensor, Tensor]:
        count = selected.sum(-1, keepdim=True).clamp(min=1)
        mean = torch.where(selected, delta, 0.0).sum(-1, keepdim=True) / count
        var = torch.where(selected, (delta - mean) ** 2, 0.0).sum(-1, keepdim=True) / count
        return mean, var.sqrt()

    positive = valid & (delta > 0)
    mean_p, std_p = mean_std(positive)
    keep_positive = positive & (delta >= mean_p - std_p)
    mean_a, std_a = mean_std(valid)
    above = valid & (delta > mean_a + std_a)
    keep_other = torch.where(above.any(-1, keepdim=True), above, valid)
    return torch.where(positive.any(-1, keepdim=True), keep_positive, keep_other)


@torch.no_grad()
def masked_score_changes(
    model: nn.Module,
    images: Tensor,
    masks: Tensor,
    targets: Tensor,
    base: Tensor,
    valid: Tensor | None = None,
    activation: str = "sigmoid",
    chunk: int = 64,
) -> Tensor:
    """Δ[b, k, n] = s_t(images[b] ⊙ masks[b, k, n]) − base[b, k] for t = targets[b, k].

    images: (B, ch, H, W), already normalised (masking fades to the mean colour); masks
    (B, K, N, h, w) in [0, 1], upsampled bilinearly to H×W chunk by chunk; base (B, K) the scores
    of the plain images. Invalid (b, k, n) (``valid`` (B, K, N)) cost no forward and get Δ = 0.
    At most `chunk` masked images go through the model at once.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, k, n = masks.shape[:3]
    valid = torch.ones(b, k, n, dtype=torch.bool, device=masks.device) if valid is None else valid
    delta = torch.zeros(b, k, n, device=images.device)
    rows = valid.nonzero()  # (P, 3): image, slot, candidate
    for start in range(0, rows.shape[0], chunk):
        bi, ki, ni = rows[start : start + chunk].unbind(1)
        mask = masks[bi, ki, ni].unsqueeze(1).float()
        if mask.shape[-2:] != images.shape[-2:]:
            mask = F.interpolate(mask, size=images.shape[-2:], mode="bilinear", align_corners=False)
        probs = probabilities(model(images[bi] * mask.to(images.dtype)), activation)
        score = probs.gather(1, targets[bi, ki].unsqueeze(1)).squeeze(1)
        delta[bi, ki, ni] = score - base[bi, ki].float()
    return delta


def filter_and_average(
    model: nn.Module,
    images: Tensor,
    candidates: Tensor,
    targets: Tensor,
    base: Tensor,
    valid: Tensor | None = None,
    activation: str = "sigmoid",
    chunk: int = 64,
) -> tuple[Tensor, Tensor, Tensor]:
    """Libra's filter on any candidate maps: (B, K, N, h, w) in [0, 1] -> (mean of the kept maps
    (B, K, h, w), keep (B, K, N), Δ (B, K, N)). Used on the references' base maps, and usable on
    other candidates (e.g. several layers' maps, to choose among them by the classifier's own scores)."""
    delta = masked_score_changes(model, images, candidates, targets, base, valid, activation, chunk)
    keep = keep_references(delta, valid)
    weights = keep.float()[..., None, None]
    mean = (candidates.float() * weights).sum(2) / weights.sum(2).clamp(min=1)
    return mean, keep, delta


@torch.no_grad()
def calibrate_percentile(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    base: Tensor,
    valid: Tensor | None = None,
    activation: str = "sigmoid",
    chunk: int = 64,
    cuts: Sequence[float] = CALIBRATION_CUTS,
) -> Tensor:
    """Libra's per-image calibration with the off-by-one fixed: for each cut q, the lowest
    ⌊q·N⌋ pixels of the map (upsampled to the input) are zeroed, the rest keep their soft values;
    the cut with the largest max(0, s_t(x ⊙ M_q) − s_t(x)) (the first on ties) is returned.
    maps (B, K, h, w) -> (B, K, H, W)."""
    size = images.shape[-2:]
    maps = maps.float()
    if maps.shape[-2:] != size:
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    b, k = maps.shape[:2]
    pixels = size[0] * size[1]
    order = maps.flatten(-2).argsort(dim=-1, stable=True)  # ascending
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(pixels, device=order.device).expand_as(order)
    )
    rank = rank.view(b, k, *size)
    cut_maps = torch.stack(
        [maps * (rank >= math.floor(q * pixels + 1e-9)) for q in cuts], 2
    )  # (B, K, Q, H, W)
    slot_valid = None if valid is None else valid[..., None].expand(b, k, len(cuts))
    delta = masked_score_changes(
        model, images, cut_maps, targets, base, slot_valid, activation, chunk
    )
    best = delta.clamp(min=0).argmax(-1)  # first maximum
    return cut_maps.gather(2, best[:, :, None, None, None].expand(b, k, 1, *size)).squeeze(2)
