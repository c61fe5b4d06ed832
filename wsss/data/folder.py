"""Image folder + CSV labels, for medical data.

Layout under ``data.root``: ``<split>.csv`` with columns ``image,labels`` (labels separated by
``;``, an empty cell = no finding), images under ``image_dir`` (8- or 16-bit, grayscale or RGB,
PNG or TIFF, read without loss) and optional masks ``mask_dir/<image stem>.png`` for evaluation.
Normalisation statistics are computed per data set in raw units (so 16-bit data is handled) and
cached in ``<root>/.wsss_stats_<split>.json``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Optional

import numpy as np

from wsss.data.base import RawSample, SegmentationSource
from wsss.data.imageio import DataError, check_mask, read_image, read_mask
from wsss.io import read_json, write_json_atomic

STATS_IMAGES = 200


def read_label_csv(path: Path) -> list[tuple[str, list[str]]]:
    """Rows of (image path, label names) from an ``image,labels`` CSV."""
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.csv"))
        raise DataError(f"{path}: label CSV missing (CSVs present: {present or 'none'}); expected columns "
                        f"image,labels with labels separated by ';'")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"image", "labels"} <= set(reader.fieldnames):
            raise DataError(f"{path}: needs a header with columns image,labels; found {reader.fieldnames}")
        rows = []
        for line, row in enumerate(reader, start=2):
            image = (row["image"] or "").strip()
            if not image:
                raise DataError(f"{path}, row {line}: empty image cell")
            labels = [name.strip() for name in (row["labels"] or "").split(";") if name.strip()]
            rows.append((image, labels))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


class FolderDataset(SegmentationSource):
    """One split of an image folder with CSV image-level labels."""

    def __init__(self, root: str | Path, split: str, image_dir: str = "images", mask_dir: Optional[str] = None,
                 class_names: Optional[list[str]] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.split = split
        self.csv_path = self.root / f"{split}.csv"
        self.rows = read_label_csv(self.csv_path)
        if class_names is None:  # the train CSV fixes the order, so every split agrees
            reference = self.root / "train.csv"
            source_rows = read_label_csv(reference) if reference.is_file() else self.rows
            class_names = sorted({name for _, labels in source_rows for name in labels})
        if not class_names:
            raise DataError(f"{self.csv_path}: no class names found; set data.class_names")
        self.class_names = list(class_names)
        index = {name: i for i, name in enumerate(self.class_names)}
        self.label_rows = []
        for line, (image, labels) in enumerate(self.rows, start=2):
            unknown = [name for name in labels if name not in index]
            if unknown:
                raise DataError(f"{self.csv_path}, row {line}: label(s) {unknown} not among the classes "
                                f"{self.class_names}; fix the CSV or data.class_names")
            vector = np.zeros(len(self.class_names), np.float32)
            vector[[index[name] for name in labels]] = 1.0
            self.label_rows.append(vector)
        self.image_root = self.root / image_dir
        self.mask_root = self.root / mask_dir if mask_dir else None
        self.has_masks = self.mask_root is not None
        self._ids = [Path(image).stem for image, _ in self.rows]
        seen: dict[str, int] = {}
        for line, sample_id in enumerate(self._ids, start=2):
            if sample_id in seen:
                raise DataError(f"{self.csv_path}, rows {seen[sample_id]} and {line}: two images share the "
                                f"id {sample_id!r} (file stem); ids must be unique")
            seen[sample_id] = line

    @property
    def ids(self) -> list[str]:
        return self._ids

    def image_path(self, index: int) -> Path:
        return self.image_root / self.rows[index][0]

    def mask_path(self, index: int) -> Optional[Path]:
        return self.mask_root / f"{self._ids[index]}.png" if self.mask_root else None

    def load_raw(self, index: int) -> RawSample:
        image = read_image(self.image_path(index))
        mask = None
        if self.mask_root is not None:
            path = self.mask_path(index)
            mask = read_mask(path)
            check_mask(mask, self.num_classes, path, image.shape[:2])
        return RawSample(self._ids[index], image, self.label_rows[index].copy(), mask)

    def default_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean/std in raw units over up to 200 evenly spaced images (cached)."""
        cache = self.root / f".wsss_stats_{self.split}.json"
        if cache.is_file():
            saved = read_json(cache)
            if saved.get("channels") == self.channels and saved.get("count") == len(self):
                return saved["mean"], saved["std"]
        picks = np.unique(np.linspace(0, len(self) - 1, min(STATS_IMAGES, len(self))).astype(int))
        total = np.zeros(self.channels)
        squares = np.zeros(self.channels)
        pixels = 0
        for index in picks:
            image = self._to_channels(read_image(self.image_path(index)), self._ids[index]).astype(np.float64)
            total += image.sum((0, 1))
            squares += (image ** 2).sum((0, 1))
            pixels += image.shape[0] * image.shape[1]
        mean = total / pixels
        std = np.sqrt(np.maximum(squares / pixels - mean ** 2, 1e-12))
        result = ([float(v) for v in mean], [float(max(v, 1e-6)) for v in std])
        if os.access(self.root, os.W_OK):
            write_json_atomic(cache, {"channels": self.channels, "count": len(self),
                                      "mean": result[0], "std": result[1]})
        return result
