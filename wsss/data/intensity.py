"""Intensity handling (``data.intensity``): how raw pixel units become the units that the data
set's mean/std then normalise.

- ``dataset``: raw units unchanged (0..255, 0..65535, Hounsfield units ...); the per-data-set
  mean/std do all the work. One bit depth per data set.
- ``minmax``: each image scaled to 0..1 by its own minimum and maximum (all channels together).
  Images of different bit depths or exposures land on one scale.
- ``window``: a fixed window ``[low, high]`` in raw units, clipped and scaled to 0..1, as CT is
  read (e.g. ``[-160, 240]`` HU for soft tissue).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

INTENSITY_MODES = (
    "dataset",
    "minmax",
    "window",
)  # also the choices of data.intensity in wsss.config


def check_intensity(mode: str, window: Optional[Sequence[float]] = None) -> None:
    """Raise ValueError for an unknown mode, or a window that ``window`` mode cannot use."""
    if mode not in INTENSITY_MODES:
        raise ValueError(
            f"unknown intensity mode {mode!r}; choose one of {', '.join(INTENSITY_MODES)}"
        )
    if mode == "window" and (window is None or len(window) != 2 or not window[0] < window[1]):
        raise ValueError(f"intensity=window needs window=[low, high] with low < high, got {window}")


def scale_intensity(
    image: np.ndarray, mode: str, window: Optional[Sequence[float]] = None
) -> np.ndarray:
    """Map a float32 HxWxC image in raw units to the units of ``mode`` (see the module docstring)."""
    check_intensity(mode, window)
    if mode == "dataset":
        return image
    if mode == "minmax":
        low, high = float(image.min()), float(image.max())
        if high <= low:  # a constant image carries no contrast: all zeros
            return np.zeros_like(image, dtype=np.float32)
        return ((image - low) / (high - low)).astype(np.float32)
    low, high = float(window[0]), float(window[1])  # window
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)
