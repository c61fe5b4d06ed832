"""Image folder + CSV labels, for medical data.

Layout under ``root`` (``data.root``)::

    <split>.csv              columns image,labels; labels separated by ';', an empty cell = no finding
    <image_dir>/<image>      the CSV's image path, relative to image_dir (PNG, TIFF, JPEG, ...)
    <mask_dir>/<stem>.png    optional masks for evaluation, named by the image's file stem

Images are read without loss: 8- or 16-bit, grayscale or RGB, in raw units. Normalisation
statistics are computed per data set in those raw units (so 16-bit data normalises correctly)
over up to 200 evenly spaced images of the split, and cached in ``<root>/.wsss_stats_<split>.json``
when ``root`` is writable. Class names come from the argument, or sorted from ``train.csv`` (when
it exists, so that every split shares the same order) or from the split's own CSV.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from wsss.data.base import RawSample, SegmentationSource
from wsss.data.imageio import DataError, check_mask, read_image, read_mask
from wsss.io import read_json, write_json_atomic

STATS_IMAGES = 200
LABEL_SEPARATOR = ";"


def read_label_csv(path: Path) -> list[tuple[int, str, list[str]]]:
    """Rows of (CSV line number, image path, label names) from an ``image,labels`` CSV."""
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.csv")) if path.parent.is_dir() else []
        raise DataError(f"{path}: label CSV is missing (CSVs present in {path.parent}: "
                        f"{', '.join(present) or 'none'}); expected columns image,labels with labels "
                        f"separated by '{LABEL_SEPARATOR}'")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: tolerate an Excel BOM
            reader = csv.reader(handle)
            header = [cell.strip().lower() for cell in next(reader, [])]
            if "image" not in header or "labels" not in header:
                raise DataError(f"{path}: the first line must be a header with columns image,labels; "
                                f"found {header or 'an empty file'}")
            image_col, labels_col = header.index("image"), header.index("labels")
            rows = []
            for cells in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in cells):
                    continue  # blank line
                if len(cells) <= max(image_col, labels_col):
                    cells = cells + [""] * (max(image_col, labels_col) + 1 - len(cells))
                image = cells[image_col].strip()
                if not image:
                    raise DataError(f"{path}, row {line}: the image cell is empty")
                labels = [name.strip() for name in cells[labels_col].split(LABEL_SEPARATOR) if name.strip()]
                rows.append((line, image, labels))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text CSV ({exc})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from exc
    if not rows:
        raise DataError(f"{path}: the CSV has no rows below its header")
    return rows


class FolderDataset(SegmentationSource):
    """One split of an image folder with image-level labels in a CSV."""

    def __init__(self, root: str | Path, split: str, image_dir: str = "images", mask_dir: Optional[str] = None,
                 class_names: Optional[list[str]] = None,
                 transform: Optional[Callable[..., dict[str, Any]]] = None,
                 mean: Optional[list[float]] = None, std: Optional[list[float]] = None,
                 channels: int = 3) -> None:
        super().__init__(transform=transform, mean=mean, std=std, channels=channels)
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data folder does not exist; data.root must hold <split>.csv and "
                            f"the image folder {image_dir!r}")
        self.csv_path = self.root / f"{split}.csv"
        rows = read_label_csv(self.csv_path)
        self.class_names = self._class_names(class_names, rows)
        self.image_root = self.root / image_dir
        if not self.image_root.is_dir():
            raise DataError(f"{self.image_root}: image folder does not exist; set data.image_dir to the folder "
                            f"(relative to {self.root}) that the CSV's image paths are relative to")
        self.mask_root = self.root / mask_dir if mask_dir else None
        if self.mask_root is not None and not self.mask_root.is_dir():
            raise DataError(f"{self.mask_root}: mask folder does not exist; fix data.mask_dir, or leave it unset "
                            f"for a data set without masks")
        self.has_masks = self.mask_root is not None
        self.has_labels = True  # every CSV row carries labels; an empty cell means "no finding"

        index = {name: i for i, name in enumerate(self.class_names)}
        self.image_names: list[str] = []
        self.csv_lines: list[int] = []
        self.label_rows: list[np.ndarray] = []
        self._ids: list[str] = []
        seen: dict[str, int] = {}
        for line, image, labels in rows:
            unknown = [name for name in labels if name not in index]
            if unknown:
                raise DataError(f"{self.csv_path}, row {line}: label(s) {unknown} of image {image} not among the "
                                f"classes {self.class_names}; fix the CSV or data.class_names")
            sample_id = Path(image).stem
            if sample_id in seen:
                raise DataError(f"{self.csv_path}, rows {seen[sample_id]} and {line}: two images share the id "
                                f"{sample_id!r} (the file name without extension); ids must be unique")
            seen[sample_id] = line
            vector = np.zeros(len(self.class_names), np.float32)
            vector[[index[name] for name in labels]] = 1.0
            self.image_names.append(image)
            self.csv_lines.append(line)
            self.label_rows.append(vector)
            self._ids.append(sample_id)

    def _class_names(self, given: Optional[list[str]], rows: list[tuple[int, str, list[str]]]) -> list[str]:
        if given is not None:
            names = [str(name) for name in given]
            duplicates = sorted({name for name in names if names.count(name) > 1})
            if duplicates:
                raise DataError(f"data.class_names lists {duplicates} more than once: {names}")
            if not names:
                raise DataError("data.class_names is empty; list the foreground classes or leave it unset")
            return names
        reference = self.root / "train.csv"  # the train CSV fixes the order, so every split agrees
        source_rows = read_label_csv(reference) if reference.is_file() else rows
        names = sorted({name for _, _, labels in source_rows for name in labels})
        if not names:
            where = reference if reference.is_file() else self.csv_path
            raise DataError(f"{where}: no label appears in the CSV, so there are no classes; "
                            f"set data.class_names")
        return names

    @property
    def ids(self) -> list[str]:
        return self._ids

    def image_path(self, index: int) -> Path:
        return self.image_root / self.image_names[index]

    def mask_path(self, index: int) -> Optional[Path]:
        return self.mask_root / f"{self._ids[index]}.png" if self.mask_root is not None else None

    def load_raw(self, index: int) -> RawSample:
        image = read_image(self.image_path(index))
        mask = None
        if self.mask_root is not None:
            path = self.mask_root / f"{self._ids[index]}.png"
            mask = read_mask(path)
            check_mask(mask, self.num_classes, path, image.shape[:2])
        return RawSample(self._ids[index], image, self.label_rows[index].copy(), mask)

    # -- normalisation statistics, per data set, in raw units
    def stats_cache_path(self) -> Path:
        return self.root / f".wsss_stats_{self.split}.json"

    def _stats_picks(self) -> list[int]:
        count = min(STATS_IMAGES, len(self))
        return sorted({int(i) for i in np.linspace(0, len(self) - 1, count).round()})

    def _fingerprint(self, picks: list[int]) -> str:
        """Changes when the sampled images (names, sizes, modification times) or the channels change."""
        digest = hashlib.sha1(f"channels={self.channels};count={len(self)}".encode())
        for index in picks:
            path = self.image_path(index)
            try:
                stat = path.stat()
                digest.update(f"|{self.image_names[index]}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            except OSError:
                digest.update(f"|{self.image_names[index]}:missing".encode())
        return digest.hexdigest()

    def default_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean/std in raw units over up to 200 evenly spaced images (cached as JSON)."""
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
        total = np.zeros(self.channels)
        squares = np.zeros(self.channels)
        pixels = 0
        for index in picks:
            image = self._to_channels(read_image(self.image_path(index)), self._ids[index]).astype(np.float64)
            total += image.sum(axis=(0, 1))
            squares += (image ** 2).sum(axis=(0, 1))
            pixels += image.shape[0] * image.shape[1]
        mean = total / pixels
        std = np.sqrt(np.maximum(squares / pixels - mean ** 2, 0.0))
        result = ([float(v) for v in mean], [float(max(v, 1e-6)) for v in std])
        if os.access(self.root, os.W_OK):
            try:
                write_json_atomic(cache, {"fingerprint": fingerprint, "images": len(picks), "channels": self.channels,
                                          "mean": result[0], "std": result[1]})
            except OSError:
                pass  # a read-only mount that reports itself writable: the statistics are still right
        return result
