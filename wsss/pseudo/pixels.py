"""Plumbing the refinements share: which pixels of a padded canvas are the image, and the
neighbour at an offset of every pixel at once."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_scores(scores: Tensor, name: str = "scores") -> None:
    """A ValueError unless ``scores`` is (B, C, H, W)."""
    if scores.dim() != 4:
        raise ValueError(f"{name} must be (B, C, H, W), got shape {tuple(scores.shape)}")


def pixel_mask(
    sizes: Optional[Tensor], height: int, width: int, device: torch.device | str = "cpu"
) -> Tensor:
    """(B, H, W) bool, True inside each image's true (h, w) at the top left of a padded canvas
    (``batch["size"]`` from ``pad_collate``); without sizes, (1, H, W) all True."""
    if sizes is None:
        return torch.ones(1, height, width, dtype=torch.bool, device=device)
    sizes = sizes.to(device, torch.long)
    rows = torch.arange(height, device=device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(width, device=device)[None, None, :] < sizes[:, 1, None, None]
    return rows & cols


def as_pixel_mask(valid: Optional[Tensor], like: Tensor) -> Tensor:
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


def shifted(padded: Tensor, dy: int, dx: int, pad: int, height: int, width: int) -> Tensor:
    """The values at (y + dy, x + dx) for every (y, x), from a tensor zero-padded by ``pad``."""
    return padded[..., pad + dy : pad + dy + height, pad + dx : pad + dx + width]
