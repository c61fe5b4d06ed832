"""Pascal VOC 2012: ``root`` (``data.root``) is the ``VOCdevkit/VOC2012`` folder.

Layout::

    VOC2012/JPEGImages/<id>.jpg
    VOC2012/SegmentationClass/<id>.png         official masks (train, val)
    VOC2012/SegmentationClassAug/<id>.png      SBD-derived masks (train_aug, 10,582 images)
    VOC2012/ImageSets/Segmentation/<split>.txt one id per line

``train_aug`` reads its masks from ``SegmentationClassAug``, every other split from
``SegmentationClass``. Image labels are the classes present in the mask other than 0
(background) and 255 (void); they are read lazily, one item at a time. Masks are palette
indices and are never converted through RGB. A split none of whose masks exist (the VOC test
split) has ``has_masks = False``; for any other split a missing mask file is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from wsss.data.base import RawSample, SegmentationSource, labels_from_mask
from wsss.data.imageio import DataError, check_mask, read_image, read_mask

VOC_CLASSES = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]
IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
PREPARE_HINT = "run `python scripts/prepare_voc.py --root <VOCdevkit/VOC2012>` to check the set-up"
AUG_SPLIT = "train_aug"


class VOCSegmentation(SegmentationSource):
    """One split of Pascal VOC 2012 (20 foreground classes plus background; 255 = void)."""

    class_names = VOC_CLASSES

    def __init__(
        self,
        root: str | Path,
        split: str,
        transform: Optional[Callable[..., dict[str, Any]]] = None,
        mean: Optional[list[float]] = None,
        std: Optional[list[float]] = None,
        channels: int = 3,
    ) -> None:
        super().__init__(transform=transform, mean=mean, std=std, channels=channels)
        self.root = Path(root)
        self.split = split
        self._check_root()
        self.split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        self._ids = self._read_split()
        self.image_root = self.root / "JPEGImages"
        self.mask_root = self.root / (
            "SegmentationClassAug" if split == AUG_SPLIT else "SegmentationClass"
        )
        # A split without any mask (the VOC test split) is allowed: it has neither masks nor labels.
        # Otherwise every id needs its mask, and a missing one is reported when the item is loaded.
        self.has_masks = self.mask_root.is_dir() and any(
            (self.mask_root / f"{sample_id}.png").is_file() for sample_id in self._ids
        )
        if split == AUG_SPLIT and not self.has_masks:
            raise DataError(
                f"{self.mask_root}: the train_aug split needs the SBD-derived masks in "
                f"SegmentationClassAug/ (usually from SegmentationClassAug.zip, unzipped into "
                f"the VOC2012 folder) and none of its ids has one there; {PREPARE_HINT}"
            )
        # image labels come from the masks: without masks, an image carries no known label
        self.has_labels = self.has_masks

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise DataError(
                f"{self.root}: VOC root folder does not exist; data.root must point at "
                f"VOCdevkit/VOC2012 (the VOC2012 trainval archive from the Pascal VOC site); "
                f"{PREPARE_HINT}"
            )
        if not (self.root / "JPEGImages").is_dir():
            nested = self.root / "VOC2012"
            hint = (
                f"it looks like VOCdevkit: use {nested}"
                if (nested / "JPEGImages").is_dir()
                else "data.root must point at VOCdevkit/VOC2012"
            )
            raise DataError(
                f"{self.root}: not a VOC2012 folder (no JPEGImages/ inside); {hint}; {PREPARE_HINT}"
            )

    def _read_split(self) -> list[str]:
        if not self.split_file.is_file():
            folder = self.split_file.parent
            present = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
            listed = ", ".join(present) if present else "none"
            raise DataError(
                f"{self.split_file}: split file for split {self.split!r} is missing "
                f"(split files present in {folder}: {listed}); pick one of those or "
                f"{PREPARE_HINT} (it writes train_aug.txt)"
            )
        ids = [line.split()[0] for line in self.split_file.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(
                f"{self.split_file}: the split file lists no image ids; restore it from the VOC2012 "
                f"archive or {PREPARE_HINT}"
            )
        return ids

    @property
    def ids(self) -> list[str]:
        return self._ids

    def default_stats(self) -> tuple[list[float], list[float]]:
        """ImageNet mean/std in 0..255 units (one averaged value for a 1-channel model)."""
        if self.channels == 1:
            return [float(np.mean(IMAGENET_MEAN))], [float(np.mean(IMAGENET_STD))]
        return list(IMAGENET_MEAN), list(IMAGENET_STD)

    def image_path(self, index: int) -> Path:
        return self.image_root / f"{self._ids[index]}.jpg"

    def mask_path(self, index: int) -> Path:
        return self.mask_root / f"{self._ids[index]}.png"

    def load_raw(self, index: int) -> RawSample:
        sample_id = self._ids[index]
        image = read_image(self.image_path(index))
        if not self.has_masks:
            return RawSample(sample_id, image, np.zeros(len(VOC_CLASSES), np.float32), None)
        path = self.mask_path(index)
        mask = read_mask(path)
        check_mask(mask, self.num_classes, path, image.shape[:2])
        return RawSample(sample_id, image, labels_from_mask(mask, len(VOC_CLASSES)), mask)
