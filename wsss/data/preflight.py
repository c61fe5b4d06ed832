"""A fast look at every file a run will read, before any stage starts: each image and mask
exists, its header opens, a mask has its image's size, and a JPEG or PNG is not cut short. No
pixel is decoded (a full check is `wsss data-check`), so a VOC-sized split takes seconds, and a
bad file stops the run before training instead of an epoch into it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from PIL import Image
from tqdm.auto import tqdm

from wsss.data.imageio import DataError

JPEG_END = b"\xff\xd9"
PNG_END = b"IEND\xaeB`\x82"


def header_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    suffix = path.suffix.lower()
    if suffix == ".dcm":
        import pydicom  # heavy (about a second), and only DICOM data sets need it

        header = pydicom.dcmread(path, stop_before_pixels=True)
        return int(header.Rows), int(header.Columns)
    if suffix in (".tif", ".tiff"):
        import tifffile  # heavy, and only TIFF data sets need it

        with tifffile.TiffFile(path) as tiff:
            shape = tiff.pages[0].shape
        return int(shape[0]), int(shape[1])
    with Image.open(path) as image:
        width, height = image.size
    return height, width


def truncated(path: Path) -> bool:
    """Whether a JPEG or PNG file lacks its end marker (a cut-short download or copy)."""
    suffix = path.suffix.lower()
    marker = JPEG_END if suffix in (".jpg", ".jpeg") else PNG_END if suffix == ".png" else None
    if marker is None:
        return False
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - 32))
        tail = handle.read()
    return marker not in tail


def _problem(path: Path, role: str) -> Optional[str]:
    if not path.is_file():
        return f"{path}: {role} is missing"
    try:
        header_size(path)
    except Exception as exc:  # any reader error means the same thing here: the file does not open
        return f"{path}: {role} does not open ({type(exc).__name__}: {exc})"
    if truncated(path):
        return f"{path}: {role} is cut short (no end marker); copy or export it again"
    return None


def check_files(source, split: str) -> list[str]:
    """Problems of one split's files (empty: all good). Sources without files (synthetic) pass."""
    if not hasattr(source, "image_path"):
        return []
    problems = []
    mask_path = getattr(source, "mask_path", None)
    for index in tqdm(
        range(len(source)), desc=f"pre-flight {split}", unit="file", leave=False, disable=None
    ):
        image = Path(source.image_path(index))
        problem = _problem(image, "image")
        if problem:
            problems.append(problem)
            continue
        mask = mask_path(index) if mask_path is not None and source.has_masks else None
        if mask is None:
            continue
        mask = Path(mask)
        problem = _problem(mask, "mask")
        if problem is None and header_size(mask) != header_size(image):
            problem = (
                f"{mask}: mask is {header_size(mask)} (h, w) but its image {image.name} is "
                f"{header_size(image)}"
            )
        if problem:
            problems.append(problem)
    return problems


def preflight(sources: dict[str, object], limit: int = 20) -> None:
    """Raise DataError naming the bad files (the first ``limit``) of the given splits."""
    problems = [
        problem for split, source in sources.items() for problem in check_files(source, split)
    ]
    if problems:
        shown = "\n  ".join(problems[:limit])
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        raise DataError(
            f"{len(problems)} bad file(s) before any work; fix or remove them (wsss data-check "
            f"lists everything):\n  {shown}{more}"
        )
