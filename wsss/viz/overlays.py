"""Display images: de-normalised inputs, heatmaps, and maps or label colours blended over an
image."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from wsss.data.masks import colorize


def denormalise(image: torch.Tensor, mean: Optional[Sequence[float]],
                std: Optional[Sequence[float]]) -> np.ndarray:
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
