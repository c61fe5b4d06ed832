"""Pictures people would rather look at than read: de-normalised inputs, heatmaps, overlays and
panel grids, saved atomically as PNG and logged to wandb."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from wsss.io import atomic_path


def denormalise(image: torch.Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]) -> np.ndarray:
    """(C, H, W) normalised tensor -> HxWx3 uint8 for display.

    One channel is repeated to three (more than three: the first three are shown). Raw values
    outside 0..255 (16-bit data, or an image that could not be de-normalised because mean/std
    are None) are stretched to 0..255 by the image's own min and max.
    """
    if image.dim() != 3:
        raise ValueError(f"denormalise expects one (C, H, W) image, got shape {tuple(image.shape)}")
    array = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    if mean is not None and std is not None:
        array = array * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    if array.shape[2] < 3:
        array = np.repeat(array[:, :, :1], 3, axis=2)
    array = array[:, :, :3]
    if array.size and (array.max() > 255.5 or array.min() < -0.5):  # tolerate rounding
        low, high = float(array.min()), float(array.max())
        array = (array - low) / max(high - low, 1e-6) * 255.0
    return np.clip(array, 0, 255).astype(np.uint8)


def heatmap(values: np.ndarray) -> np.ndarray:
    """HxW map in [0, 1] -> HxWx3 uint8 through the 'jet' colour map."""
    from matplotlib import colormaps

    rgba = colormaps["jet"](np.clip(np.asarray(values, np.float32), 0.0, 1.0))
    return (rgba[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, layer: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an RGB layer over an RGB image (both HxWx3 uint8)."""
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * layer.astype(np.float32)
    return blended.astype(np.uint8)


def panel_grid(rows: list[list[np.ndarray]], column_titles: Optional[list[str]] = None, gap: int = 2) -> np.ndarray:
    """Tile rows of HxWx3 uint8 images (resized to the first tile) with optional column titles."""
    tile_h, tile_w = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    title_h = 14 if column_titles else 0
    canvas = Image.new("RGB", (columns * (tile_w + gap) - gap, title_h + len(rows) * (tile_h + gap) - gap),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(column_titles or []):
        draw.text((c * (tile_w + gap) + 2, 1), title[: max(4, tile_w // 6)], fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            img = Image.fromarray(tile)
            if img.size != (tile_w, tile_h):
                img = img.resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(img, (c * (tile_w + gap), title_h + r * (tile_h + gap)))
    return np.asarray(canvas)


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Write an RGB uint8 array as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
