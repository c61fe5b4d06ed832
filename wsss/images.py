"""Image tensors back in display units: the one de-normalisation, used by the overlays and by
the dense CRF (which reads colours). Pure numpy and torch, so every layer may import it.

Units: ``mean`` and ``std`` are given in the units of ``value_range``, the range pixels had before
normalisation. The default is 0-1 (torchvision's ``ToTensor`` + ``Normalize(mean=[0.485, ...])``,
and ``wsss.cam.box_rule``'s). The pipeline's data sets normalise from 0-255 pixel values (raw
units for 16-bit data), so the pipeline passes ``value_range=PIXEL_RANGE``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

UNIT_RANGE = (0.0, 1.0)
PIXEL_RANGE = (0.0, 255.0)  # the pipeline's data units
TORCHVISION_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics in 0-1 units
TORCHVISION_STD = (0.229, 0.224, 0.225)


def check_units(
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    value_range: tuple[float, float] = UNIT_RANGE,
) -> None:
    """ValueError when mean / std look like 0-255 units while value_range is 0-1 (a mean or std
    above 1.5 cannot describe pixels in [0, 1]); the message names the fix."""
    if tuple(value_range) != UNIT_RANGE:
        return
    values = [float(v) for v in (*(mean or ()), *(std or ()))]
    if values and max(values) > 1.5:
        raise ValueError(
            f"mean={list(mean or [])} / std={list(std or [])} look like 0-255 units, but mean "
            "and std are taken in 0-1 units (as torchvision's Normalize and wsss.cam.box_rule "
            "take them): pass mean/255 and std/255, or value_range=(0, 255)"
        )


def denormalise(
    image: torch.Tensor,
    mean: Optional[Sequence[float]],
    std: Optional[Sequence[float]],
    value_range: tuple[float, float] = UNIT_RANGE,
) -> np.ndarray:
    """(C, H, W) normalised tensor -> HxWx3 uint8 for display.

    image * std + mean is in ``value_range`` units (0-1 by default; see the module docstring),
    mapped to 0..255. One channel is repeated to three (more than three: the first three are
    shown). Values outside the range (16-bit data, or an image that could not be de-normalised
    because mean/std are None) are stretched to 0..255 by the image's own min and max.
    """
    if image.dim() != 3:
        raise ValueError(f"denormalise expects one (C, H, W) image, got shape {tuple(image.shape)}")
    check_units(mean, std, value_range)
    array = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    if mean is not None and std is not None:
        array = array * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    low, high = (float(v) for v in value_range)
    if (low, high) != PIXEL_RANGE:
        array = (array - low) * (255.0 / max(high - low, 1e-12))
    if array.shape[2] < 3:
        array = np.repeat(array[:, :, :1], 3, axis=2)
    array = array[:, :, :3]
    if array.size and (array.max() > 255.5 or array.min() < -0.5):  # tolerate rounding
        low, high = float(array.min()), float(array.max())
        array = (array - low) / max(high - low, 1e-6) * 255.0
    return np.clip(array, 0, 255).astype(np.uint8)
