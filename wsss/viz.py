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


def mask_overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Label colours (VOC palette) blended over the image at ``alpha`` where the label is not
    background (0); background pixels show the plain image."""
    from wsss.data.masks import colorize

    label_map = np.asarray(label_map)
    blended = overlay(image, colorize(label_map), alpha)
    return np.where((label_map != 0)[..., None], blended, image)


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


def annotate(tile: np.ndarray, text: str) -> np.ndarray:
    """The tile with ``text`` on a white box in its top-left corner (e.g. which class a heatmap
    shows)."""
    img = Image.fromarray(tile)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((1, 0), text)
    draw.rectangle((0, 0, box[2] + 1, box[3] + 1), fill=(255, 255, 255))
    draw.text((1, 0), text, fill=(0, 0, 0))
    return np.asarray(img)


def blank_like(tile: np.ndarray) -> np.ndarray:
    """A white tile of the same size."""
    return np.full_like(tile, 255)


def color_legend(names: Sequence[str], colors: np.ndarray, width: int, swatch: int = 10) -> np.ndarray:
    """A white strip, ``width`` pixels wide, with one colour swatch and its name per entry,
    wrapped over as many lines as needed."""
    entries = [(name, tuple(int(c) for c in color)) for name, color in zip(names, colors)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line, used = [], [], 0
    for name, color in entries:
        need = swatch + 4 + int(measure.textlength(name)) + 10
        if line and used + need > width:
            lines.append(line)
            line, used = [], 0
        line.append((name, color))
        used += need
    lines.append(line)
    height = 14
    canvas = Image.new("RGB", (width, height * len(lines) + 2), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, items in enumerate(lines):
        x, y = 2, 2 + row * height
        for name, color in items:
            draw.rectangle((x, y + 1, x + swatch, y + 1 + swatch), fill=color, outline=(0, 0, 0))
            draw.text((x + swatch + 4, y), name, fill=(0, 0, 0))
            x += swatch + 4 + int(draw.textlength(name)) + 10
    return np.asarray(canvas)


def stack_rows(*images: np.ndarray, gap: int = 2) -> np.ndarray:
    """Images of any widths one below the other on white (left-aligned)."""
    width = max(image.shape[1] for image in images)
    height = sum(image.shape[0] for image in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    y = 0
    for image in images:
        canvas[y:y + image.shape[0], :image.shape[1]] = image
        y += image.shape[0] + gap
    return canvas


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Write an RGB uint8 array as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
