"""Reading images and label masks without loss, with errors that name the file.

Images come back as float32 HxWxC arrays in their raw units (0..255 for 8-bit, 0..65535 for
16-bit), so 16-bit medical images keep their full range. Masks come back as palette indices;
they are never converted through RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class DataError(ValueError):
    """Bad input data. The message names the file and says what is wrong."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as float32 HxWxC (C = 1 or 3) in raw units, loss-free for 16-bit."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file is missing")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            array = np.asarray(tifffile.imread(path))
        else:
            with Image.open(path) as img:
                img.load()  # forces a full decode so truncated files fail here
                if img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L", "RGB"):
                    array = np.array(img)
                elif img.mode in ("LA", "P", "PA", "1"):
                    array = np.array(img.convert("L"))
                else:  # RGBA, CMYK, YCbCr, ...
                    array = np.array(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image ({exc}); the file is damaged or truncated, "
                        f"replace it or remove its id from the split") from exc
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise DataError(f"{path}: unsupported image shape {array.shape}; expected HxW, HxWx3 or HxWx4")
    if array.shape[2] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array.astype(np.float32))


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label PNG as uint8 HxW palette indices (255 = ignore)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: mask file is missing")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise DataError(f"{path}: mask must be a palette or 8-bit grayscale PNG of class "
                                f"indices, got mode {img.mode}")
            mask = np.array(img)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read mask ({exc}); the file is damaged or truncated") from exc
    return mask.astype(np.uint8)


def check_mask(mask: np.ndarray, num_classes: int, path: str | Path, image_hw: tuple[int, int] | None = None) -> None:
    """Raise DataError if the mask's size differs from the image or holds an out-of-range value."""
    if image_hw is not None and tuple(mask.shape[:2]) != tuple(image_hw):
        raise DataError(f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                        f"{image_hw[1]}x{image_hw[0]}")
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != 255)]
    if bad.size:
        raise DataError(f"{path}: mask holds value(s) {bad.tolist()} outside 0..{num_classes - 1} (255 = ignore)")
