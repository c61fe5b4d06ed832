"""Image tensors back in display units: the one de-normalisation, used by the overlays and by
the dense CRF (which reads colours). Pure numpy and torch, so every layer may import it."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch


def denormalise(
    image: torch.Tensor, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
) -> np.ndarray:
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
