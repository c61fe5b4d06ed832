"""Image folder + CSV labels, for medical data.

Layout under ``root`` (``data.root``)::

    <split>.csv              columns image,labels; labels separated by ';', an empty cell = a negative
    <image_dir>/<image>      the CSV's image path, relative to image_dir (PNG, TIFF, JPEG, DICOM ...)
    <mask_dir>/<stem>.png    optional masks for evaluation, named by the image's file stem

- Images are read without loss: 8- or 16-bit, grayscale or RGB, DICOM with its rescale applied.
  ``data.intensity`` says how raw units become model units (``wsss.data.intensity``). One bit
  depth per data set unless each image is scaled by its own range (``minmax``): an image of
  another depth than the split's first image is an error naming both files.
- A row with an empty labels cell is a negative image (all-zero labels).
- Class names come from the argument (``data.class_names``), or are the union of the labels in
  the CSVs of ``class_splits`` (the config's train, val and test splits), sorted, so every split
  shares one order. A label that differs from a class only in case or spacing is an error naming
  the CSV row and the class.
- Mask files hold class indices (255 = ignore) unless ``mask_values`` maps file values to classes.
- Normalisation statistics are computed per data set in ``data.intensity`` units over up to 200
  evenly spaced images of the split, and cached under ``cache_dir`` (default ``$WSSS_CACHE_DIR``,
  else ``$XDG_CACHE_HOME/wsss``, else ``~/.cache/wsss``). Nothing is ever written into ``root``.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from wsss.data.base import RawSample, SegmentationSource
from wsss.data.imageio import (
    DataError,
    MaskConventionWarning,
    binary_255_message,
    check_mask,
    holds_only_0_and_255,
    map_mask_values,
    read_image_file,
    read_mask,
)
from wsss.data.label_csv import CsvRows, class_names_from_csvs, label_key, read_label_csv
from wsss.io import read_json, write_json_atomic

STATS_IMAGES = 200
DEFAULT_CLASS_SPLITS = ("train", "val", "test")


def default_cache_dir() -> Path:
    """Where computed statistics are kept when ``data.cache_dir`` is unset: ``$WSSS_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/wsss``, else ``~/.cache/wsss``."""
    if os.environ.get("WSSS_CACHE_DIR"):
        return Path(os.environ["WSSS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wsss"


class FolderDataset(SegmentationSource):
    """One split of an image folder with image-level labels in a CSV."""

    allows_negatives = True  # an empty labels cell is a negative image, not a mistake

    def __init__(
        self,
        root: str | Path,
        split: str,
        image_dir: str = "images",
        mask_dir: Optional[str] = None,
        class_names: Optional[list[str]] = None,
        class_splits: Optional[Sequence[str]] = None,
        mask_values: Optional[dict[int, int]] = None,
        cache_dir: Optional[str | Path] = None,
        transform: Optional[Callable[..., dict[str, Any]]] = None,
        mean: Optional[list[float]] = None,
        std: Optional[list[float]] = None,
        channels: int = 3,
        intensity: str = "dataset",
        window: Optional[list[float]] = None,
        long_side: Optional[int] = None,
    ) -> None:
        super().__init__(
            transform=transform,
            mean=mean,
            std=std,
            channels=channels,
            intensity=intensity,
            window=window,
            long_side=long_side,
        )
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DataError(
                f"{self.root}: data folder does not exist; data.root must hold <split>.csv and "
                f"the image folder {image_dir!r}"
            )
        self.csv_path = self.root / f"{split}.csv"
        rows = read_label_csv(self.csv_path)
        self.class_names = self._class_names(class_names, rows, class_splits)
        self.image_root = self.root / image_dir
        if not self.image_root.is_dir():
            raise DataError(
                f"{self.image_root}: image folder does not exist; set data.image_dir to the folder "
                f"(relative to {self.root}) that the CSV's image paths are relative to"
            )
        self.mask_root = self.root / mask_dir if mask_dir else None
        if self.mask_root is not None and not self.mask_root.is_dir():
            raise DataError(
                f"{self.mask_root}: mask folder does not exist; fix data.mask_dir, or leave it unset "
                f"for a data set without masks"
            )
        self.has_masks = self.mask_root is not None
        self.has_labels = True  # every CSV row carries labels; an empty cell means "no finding"
        self.mask_values = dict(mask_values) if mask_values is not None else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._reference_depth: Optional[tuple[int, Path]] = (
            None  # (bits, file) every image must match
        )
        self._warned_binary_255 = (
            False  # a run warns once per data set about 0/255 masks (data-check counts them)
        )

        index = {name: i for i, name in enumerate(self.class_names)}
        self.image_names: list[str] = []
        self.csv_lines: list[int] = []
        self.label_rows: list[np.ndarray] = []
        self._ids: list[str] = []
        seen: dict[str, int] = {}
        for line, image, labels in rows:
            for name in labels:
                if name not in index:
                    raise DataError(self._unknown_label(line, image, name))
            sample_id = Path(image).stem
            if sample_id in seen:
                raise DataError(
                    f"{self.csv_path}, rows {seen[sample_id]} and {line}: two images share the id "
                    f"{sample_id!r} (the file name without extension); ids must be unique"
                )
            seen[sample_id] = line
            vector = np.zeros(len(self.class_names), np.float32)
            vector[[index[name] for name in labels]] = 1.0
            self.image_names.append(image)
            self.csv_lines.append(line)
            self.label_rows.append(vector)
            self._ids.append(sample_id)

    def _unknown_label(self, line: int, image: str, name: str) -> str:
        where = f"{self.csv_path}, row {line}: label {name!r} of image {image}"
        same = [known for known in self.class_names if label_key(known) == label_key(name)]
        if same:
            return (
                f"{where} differs from the class {same[0]!r} only in case or spacing; write {same[0]!r} "
                f"(classes: {self.class_names})"
            )
        close = difflib.get_close_matches(name, self.class_names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{where} is not among the classes {self.class_names}; {hint}fix the CSV or data.class_names"

    def _class_names(
        self, given: Optional[list[str]], rows: CsvRows, class_splits: Optional[Sequence[str]]
    ) -> list[str]:
        if given is not None:
            names = [str(name) for name in given]
            if not names:
                raise DataError(
                    "data.class_names is empty; list the foreground classes or leave it unset"
                )
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise DataError(f"data.class_names lists {duplicates} more than once: {names}")
            keys = [label_key(name) for name in names]
            alike = sorted({name for name, key in zip(names, keys) if keys.count(key) > 1})
            if alike:
                raise DataError(
                    f"data.class_names lists {alike}, which differ only in case or spacing: {names}"
                )
            return names
        # every split's CSV contributes, so the order is the same whichever split is built first
        splits = list(dict.fromkeys([*(class_splits or DEFAULT_CLASS_SPLITS), self.split]))
        tables = []
        for name in splits:
            path = self.root / f"{name}.csv"
            if path == self.csv_path:
                tables.append((path, rows))
            elif path.is_file():
                tables.append((path, read_label_csv(path)))
        names = class_names_from_csvs(tables)
        if not names:
            raise DataError(
                f"{', '.join(str(path) for path, _ in tables)}: no label appears in the CSV(s), "
                f"so there are no classes; set data.class_names"
            )
        return names

    @property
    def ids(self) -> list[str]:
        return self._ids

    def image_path(self, index: int) -> Path:
        return self.image_root / self.image_names[index]

    def mask_path(self, index: int) -> Optional[Path]:
        return self.mask_root / f"{self._ids[index]}.png" if self.mask_root is not None else None

    def raw_image(self, index: int) -> np.ndarray:
        """The image file in raw units, checked against the data set's bit depth."""
        path = self.image_path(index)
        image, bits = read_image_file(path)
        if self.intensity != "minmax":
            reference_bits, reference = self._reference(index, bits)
            if bits != reference_bits:
                raise DataError(
                    f"{path}: {bits}-bit image in a data set of {reference_bits}-bit images (e.g. "
                    f"{reference}); with data.intensity={self.intensity} one scale cannot fit both "
                    f"depths. Convert the files to one bit depth, or set data.intensity=minmax "
                    f"to scale each image by its own range"
                )
        return image

    def _reference(self, index: int, bits: int) -> tuple[int, Path]:
        """The bit depth of the split's first image (or, if that is unreadable, the first one read),
        the same in every process, so any image of another depth is caught wherever it is loaded."""
        if self._reference_depth is None:
            first = self.image_path(0)
            try:
                self._reference_depth = (
                    (bits, first) if index == 0 else (read_image_file(first)[1], first)
                )
            except DataError:
                self._reference_depth = (bits, self.image_path(index))
        return self._reference_depth

    def load_raw(self, index: int) -> RawSample:
        image = self.raw_image(index)
        mask = None
        if self.mask_root is not None:
            path = self.mask_root / f"{self._ids[index]}.png"
            mask = read_mask(path)
            if self.mask_values is not None:
                mask = map_mask_values(mask, self.mask_values, path)
            elif not self._warned_binary_255 and holds_only_0_and_255(mask):
                self._warned_binary_255 = True
                warnings.warn(
                    binary_255_message(
                        f"mask {path} holds only the values 0 and 255", self.class_names[0]
                    ),
                    MaskConventionWarning,
                    stacklevel=2,
                )
            check_mask(mask, self.num_classes, path, image.shape[:2])
        return RawSample(self._ids[index], image, self.label_rows[index].copy(), mask)

    # -- normalisation statistics, per data set, in data.intensity units
    def stats_cache_path(self) -> Path:
        """One file per (data folder, split) under the cache directory, never inside the data folder."""
        folder = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:16]
        return self.cache_dir / "stats" / f"{folder}_{self.split}.json"

    def _stats_picks(self) -> list[int]:
        count = min(STATS_IMAGES, len(self))
        return sorted({int(i) for i in np.linspace(0, len(self) - 1, count).round()})

    def _fingerprint(self, picks: list[int]) -> str:
        """Changes when the sampled images (names, sizes, modification times), the channels, the
        intensity handling or the working size change."""
        digest = hashlib.sha1(
            f"channels={self.channels};count={len(self)};intensity={self.intensity};"
            f"window={self.window};long_side={self.long_side}".encode()
        )
        for index in picks:
            path = self.image_path(index)
            try:
                stat = path.stat()
                digest.update(
                    f"|{self.image_names[index]}:{stat.st_size}:{stat.st_mtime_ns}".encode()
                )
            except OSError:
                digest.update(f"|{self.image_names[index]}:missing".encode())
        return digest.hexdigest()

    def default_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean/std over up to 200 evenly spaced images (cached as JSON)."""
        picks = self._stats_picks()
        fingerprint = self._fingerprint(picks)
        cache = self.stats_cache_path()
        if cache.is_file():
            try:
                saved = read_json(cache)
                if saved.get("fingerprint") == fingerprint:
                    return [float(v) for v in saved["mean"]], [float(v) for v in saved["std"]]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass  # unreadable or stale cache: recompute and overwrite
        result = self.compute_stats(picks)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(
                cache,
                {
                    "fingerprint": fingerprint,
                    "root": str(self.root.resolve()),
                    "split": self.split,
                    "images": len(picks),
                    "channels": self.channels,
                    "mean": result[0],
                    "std": result[1],
                },
            )
        except OSError:
            pass  # no writable cache directory: the statistics are still right, only recomputed next time
        return result
