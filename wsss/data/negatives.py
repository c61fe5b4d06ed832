"""Background-only training images (``data.negatives``): images that hold none of the classes,
added to the classifier's training split with an all-zero multi-hot target, so that context alone
(water without a boat, a room without a chair) cannot raise a class score, and to the Libra-CAM
reference library as images lacking every class. They have no masks and never reach the
pseudo-mask stage or the segmenter.

``data.negatives`` is a folder (every image file in it, sorted by name, not recursive) or a text
file listing image paths, one per line (relative paths are relative to the list's folder; blank
lines and lines starting with ``#`` are skipped). All of them are used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from wsss.data.base import RawSample, SegmentationSource
from wsss.data.imageio import IMAGE_SUFFIXES, DataError, read_image
from wsss.data.preflight import check_files

KEY = "data.negatives"
ID_PREFIX = "negative_"


def negative_paths(spec: str | Path) -> list[Path]:
    """The image files ``data.negatives`` names; DataError naming the key when the folder or list
    does not exist, names nothing, or lists a file that is missing."""
    spec = Path(spec)
    if spec.is_dir():
        paths = sorted(
            p for p in spec.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not paths:
            raise DataError(
                f"{KEY}={spec}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)}); "
                "point it at background-only images or leave it null"
            )
        return paths
    if not spec.is_file():
        raise DataError(
            f"{KEY}={spec}: no such folder or list file; point it at a folder of background-only "
            "images or a text file listing them, or leave it null"
        )
    lines = [line.strip() for line in spec.read_text().splitlines()]
    paths = [Path(line) for line in lines if line and not line.startswith("#")]
    paths = [p if p.is_absolute() else spec.parent / p for p in paths]
    if not paths:
        raise DataError(f"{KEY}={spec}: the list names no image; list one path per line")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{KEY}={spec}: {len(missing)} listed file(s) missing, e.g. {', '.join(missing[:3])}"
        )
    return paths


class NegativeImages(SegmentationSource):
    """The ``data.negatives`` images as a source: the classes of ``like`` (the training split
    they join), all-zero labels, no masks, the same transform, statistics and working size."""

    has_masks = False
    allows_negatives = True

    def __init__(self, paths: list[Path], like: SegmentationSource) -> None:
        super().__init__(
            transform=like.transform,
            channels=like.channels,
            intensity=like.intensity,
            window=like.window,
            long_side=like.long_side,
        )
        self.like = like
        self.class_names = list(like.class_names)
        self.paths = list(paths)
        self._ids = [f"{ID_PREFIX}{i:05d}_{p.stem}" for i, p in enumerate(self.paths)]

    @property
    def ids(self) -> list[str]:
        return self._ids

    def default_stats(self) -> tuple[list[float], list[float]]:
        return self.like.stats  # normalised as the split they join, read when first needed

    def image_path(self, index: int) -> Path:
        return self.paths[index]

    def load_raw(self, index: int) -> RawSample:
        return RawSample(
            id=self._ids[index],
            image=read_image(self.paths[index]),
            labels=np.zeros(len(self.class_names), np.float32),
            mask=None,
        )


class WithNegatives(Dataset):
    """A training split followed by its negatives: indices past the split's length are the
    negatives. Keys may be ``(index, augmentation_seed)`` as the ``GlobalBatchSampler`` gives.
    Other attributes (class names, statistics, ...) are the split's."""

    def __init__(self, source: SegmentationSource, negatives: NegativeImages) -> None:
        self.source = source
        self.negatives = negatives

    def __len__(self) -> int:
        return len(self.source) + len(self.negatives)

    @property
    def ids(self) -> list[str]:
        return self.source.ids + self.negatives.ids

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        part, local = (
            (self.source, index)
            if index < len(self.source)
            else (self.negatives, index - len(self.source))
        )
        return part[(local, seed) if seed is not None else local]

    def __getattr__(self, name: str) -> Any:
        if name in ("source", "negatives"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)


def with_negatives(source: SegmentationSource, spec: str | Path | None) -> Any:
    """``source`` and the ``data.negatives`` images after it; ``source`` itself when unset."""
    if not spec:
        return source
    return WithNegatives(source, NegativeImages(negative_paths(spec), source))


def check_negatives(spec: str | Path | None, like: SegmentationSource) -> list[str]:
    """Pre-flight problems of ``data.negatives`` (the key named in each); empty when unset or
    every file exists and opens."""
    if not spec:
        return []
    try:
        paths = negative_paths(spec)
    except DataError as exc:
        return [str(exc)]
    return [f"{KEY}: {p}" for p in check_files(NegativeImages(paths, like), KEY)]
