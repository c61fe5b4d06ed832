"""Display images: de-normalised inputs, heatmaps, and maps or label colours blended over an
image."""

from __future__ import annotations

import numpy as np

from wsss.data.masks import colorize


def heatmap(values: np.ndarray) -> np.ndarray:
    """HxW map in [0, 1] -> HxWx3 uint8 through the 'jet' colour map."""
    from matplotlib import colormaps  # heavy, and only drawing a heatmap needs it

    rgba = colormaps["jet"](np.clip(np.asarray(values, np.float32), 0.0, 1.0))
    return (rgba[..., :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, layer: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an RGB layer over an RGB image (both HxWx3 uint8)."""
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * layer.astype(np.float32)
    return blended.astype(np.uint8)


def mask_overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Label colours (VOC palette) blended over the image at ``alpha`` where the label is not
    background (0); background pixels show the plain image."""
    label_map = np.asarray(label_map)
    blended = overlay(image, colorize(label_map), alpha)
    return np.where((label_map != 0)[..., None], blended, image)
