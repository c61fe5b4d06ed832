"""The one label-map writer: palette PNGs (VOC palette, 255 = ignore), written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from wsss.io import atomic_path
from wsss.label_maps import IGNORE_INDEX


def voc_palette() -> list[int]:
    """The standard Pascal VOC colour map as a flat list of 768 ints; index 255 is white-ish void."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette.extend((r, g, b))
    palette[IGNORE_INDEX * 3 : IGNORE_INDEX * 3 + 3] = [224, 224, 192]
    return palette


_PALETTE = voc_palette()


def colorize(label_map: np.ndarray) -> np.ndarray:
    """HxW indices -> HxWx3 uint8 RGB, for panels and overlays."""
    table = np.asarray(_PALETTE, dtype=np.uint8).reshape(256, 3)
    return table[np.asarray(label_map, dtype=np.uint8)]


def write_label_png(path: str | Path, label_map: np.ndarray) -> None:
    """Write an HxW uint8 label map as a palette PNG, atomically."""
    label_map = np.asarray(label_map)
    if label_map.ndim != 2:
        raise ValueError(f"{path}: label map must be 2-D, got shape {label_map.shape}")
    img = Image.fromarray(label_map.astype(np.uint8), mode="P")
    img.putpalette(_PALETTE)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


CONFIDENCE_DIR = "confidence"  # beside a mask folder: <dir>/confidence/<id>.png


def write_confidence_png(path: str | Path, levels: np.ndarray) -> None:
    """Write an HxW uint8 confidence map (255 = certain) as a grayscale PNG, atomically: the
    per-pixel weight the segmenter may give to the mask of the same name."""
    levels = np.asarray(levels)
    if levels.ndim != 2 or levels.dtype != np.uint8:
        raise ValueError(
            f"{path}: confidence must be a 2-D uint8 array, got {levels.dtype} {levels.shape}"
        )
    with atomic_path(path) as tmp:
        Image.fromarray(levels, mode="L").save(tmp, format="PNG")
