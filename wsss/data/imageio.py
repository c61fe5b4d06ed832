"""Reading images and label masks without loss, with errors that name the file.

Images come back as float32 HxWxC arrays in their raw units (0..255 for 8-bit, 0..65535 for
16-bit; DICOM after its rescale slope and intercept, e.g. Hounsfield units), so 16-bit medical
images keep their full range; ``read_image_file`` also gives the file's bit depth. Masks come
back as palette indices; they are never converted through RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsss.label_maps import IGNORE_INDEX

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")
_PIL_BITS = {
    "1": 8,
    "L": 8,
    "P": 8,
    "LA": 8,
    "PA": 8,
    "RGB": 8,
    "RGBA": 8,
    "CMYK": 8,
    "YCbCr": 8,
    "I;16": 16,
    "I;16B": 16,
    "I;16L": 16,
    "I": 32,
    "F": 32,
}


class DataError(ValueError):
    """Bad input data. The message names the file and says what is wrong."""


class MaskConventionWarning(UserWarning):
    """Masks that look stored under another convention than the configured one (0/255 masks)."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as float32 HxWxC (C = 1 or 3) in raw units, loss-free for 16-bit."""
    return read_image_file(path)[0]


def read_image_file(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an image as float32 HxWxC (C = 1 or 3) in raw units, and the bits per sample of
    the file (8, 16 or 32), so that a data set can refuse to mix bit depths."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file is missing")
    if path.suffix.lower() == ".dcm":
        array, bits = read_dicom(path)
    else:
        try:
            if path.suffix.lower() in (".tif", ".tiff"):
                import tifffile  # heavy, and only TIFF data sets need it

                array = np.asarray(tifffile.imread(path))
                bits = 8 * array.dtype.itemsize
            else:
                with Image.open(path) as img:
                    img.load()  # forces a full decode so truncated files fail here
                    bits = _PIL_BITS.get(img.mode, 8)
                    if img.mode == "I" and img.format == "PNG":
                        bits = 16  # a PNG holds at most 16 bits per sample
                    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F", "L", "RGB"):
                        array = np.array(img)
                    elif img.mode in ("LA", "P", "PA", "1"):
                        array = np.array(img.convert("L"))
                    else:  # RGBA, CMYK, YCbCr, ...
                        array = np.array(img.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(
                f"{path}: cannot read image ({exc}); the file is damaged or truncated, "
                f"replace it or remove its id from the split"
            ) from exc
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise DataError(
            f"{path}: unsupported image shape {array.shape}; expected HxW, HxWx3 or HxWx4"
        )
    if array.shape[2] == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array.astype(np.float32)), bits


def read_dicom(path: Path) -> tuple[np.ndarray, int]:
    """One DICOM image as float32 in modality units (rescale slope and intercept applied), and its
    bits allocated. Compressed pixel data needs a decoder plugin for pydicom; without one the
    error names the file, its transfer syntax and what to install."""
    try:  # heavy (about a second), and only DICOM data sets need it
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pydicom.pixels import apply_modality_lut
    except ImportError as exc:
        raise DataError(f"{path}: reading DICOM needs pydicom (pip install pydicom)") from exc
    try:
        dataset = pydicom.dcmread(path)
    except (OSError, ValueError, InvalidDicomError) as exc:
        raise DataError(
            f"{path}: cannot read DICOM ({exc}); the file is damaged or not DICOM"
        ) from exc
    if "PixelData" not in dataset:
        raise DataError(f"{path}: DICOM file holds no pixel data (not an image)")
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    try:
        pixels = dataset.pixel_array
    except (
        Exception
    ) as exc:  # pydicom raises RuntimeError / NotImplementedError / ValueError by plugin
        if syntax is not None and syntax.is_compressed:
            raise DataError(
                f"{path}: DICOM pixel data is compressed ({syntax.name}) and no installed "
                f"decoder handles it ({str(exc).splitlines()[0]}); install one "
                f"(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or "
                f"python-gdcm), or decompress the files first (gdcmconv --raw)"
            ) from exc
        raise DataError(f"{path}: cannot decode DICOM pixel data ({exc})") from exc
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DataError(
            f"{path}: DICOM holds {frames} frames; one image per file is supported, "
            f"split the series into single-frame files"
        )
    values = apply_modality_lut(
        pixels, dataset
    )  # rescale slope / intercept or a modality LUT, if any
    return np.asarray(values, np.float32), int(
        getattr(dataset, "BitsAllocated", 8 * pixels.dtype.itemsize)
    )


def read_mask(path: str | Path) -> np.ndarray:
    """Read a label PNG as uint8 HxW palette indices (255 = ignore)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: mask file is missing")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("P", "L"):
                raise DataError(
                    f"{path}: mask must be a palette or 8-bit grayscale PNG of class "
                    f"indices, got mode {img.mode}"
                )
            mask = np.array(img)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(
            f"{path}: cannot read mask ({exc}); the file is damaged or truncated"
        ) from exc
    return mask.astype(np.uint8)


def check_mask(
    mask: np.ndarray, num_classes: int, path: str | Path, image_hw: tuple[int, int] | None = None
) -> None:
    """Raise DataError if the mask's size differs from the image or holds an out-of-range value."""
    if image_hw is not None and tuple(mask.shape[:2]) != tuple(image_hw):
        raise DataError(
            f"{path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
            f"{image_hw[1]}x{image_hw[0]}"
        )
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataError(
            f"{path}: mask holds value(s) {bad.tolist()} outside 0..{num_classes - 1} (255 = ignore)"
        )


def map_mask_values(mask: np.ndarray, mapping: dict[int, int], path: str | Path) -> np.ndarray:
    """File values -> class indices through ``data.mask_values``; a value it leaves out is an error."""
    table = np.full(256, -1, np.int16)
    for value, target in mapping.items():
        table[value] = target
    mapped = table[mask]
    if (mapped < 0).any():
        unknown = sorted(int(v) for v in np.unique(mask[mapped < 0]))
        raise DataError(
            f"{path}: mask holds value(s) {unknown} that data.mask_values {mapping} does not "
            f"map; add them (to a class, or to 255 = ignore)"
        )
    return mapped.astype(np.uint8)


def holds_only_0_and_255(mask: np.ndarray) -> bool:
    """True for a mask of exactly the values 0 and 255: under the default convention (255 = ignore)
    most likely a binary data set whose foreground was stored as 255 (needs data.mask_values)."""
    return set(np.unique(mask).tolist()) == {0, 255}


def binary_255_message(what: str, first_class: str) -> str:
    """The warning for masks of only 0 and 255 (data-check; once per data set in a run)."""
    return (
        f"{what}; 255 means ignore, so their foreground is dropped from training and scoring. If 255 "
        f"marks a finding, map it: data.mask_values='{{0: 0, 255: 1}}' (255 -> class 1, {first_class})"
    )
