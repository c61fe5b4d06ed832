"""Pascal VOC 2012: ``data.root`` is the ``VOCdevkit/VOC2012`` folder.

Splits come from ``ImageSets/Segmentation/<split>.txt``. ``train_aug`` reads its masks from
``SegmentationClassAug`` (SBD-derived, 10,582 images), every other split from
``SegmentationClass``. Image labels are the classes present in the mask other than 0 and 255,
read lazily per item. Masks are palette indices and are never converted through RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from wsss.data.base import RawSample, SegmentationSource, labels_from_mask
from wsss.data.imageio import DataError, check_mask, read_image, read_mask

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]
IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
PREPARE_HINT = "run `python scripts/prepare_voc.py --root <VOC2012>` to check the layout"


class VOCSegmentation(SegmentationSource):
    """One split of Pascal VOC 2012 (21 classes with background; 255 = void)."""

    class_names = VOC_CLASSES

    def __init__(self, root: str | Path, split: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.split = split
        if not (self.root / "JPEGImages").is_dir():
            raise DataError(f"{self.root}: not a VOC2012 folder (no JPEGImages/); data.root must point "
                            f"at VOCdevkit/VOC2012; {PREPARE_HINT}")
        split_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            present = sorted(p.stem for p in split_file.parent.glob("*.txt"))
            raise DataError(f"{split_file}: split file missing (splits present: {present or 'none'}); "
                            f"{PREPARE_HINT}")
        self._ids = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        if not self._ids:
            raise DataError(f"{split_file}: the split lists no image ids")
        self.mask_root = self.root / ("SegmentationClassAug" if split == "train_aug" else "SegmentationClass")
        # the VOC test split ships without masks: allowed, but then the whole split has none
        self.has_masks = self.mask_root.is_dir() and (self.mask_root / f"{self._ids[0]}.png").is_file()
        if split == "train_aug" and not self.has_masks:
            raise DataError(f"{self.mask_root / (self._ids[0] + '.png')}: train_aug needs SegmentationClassAug; "
                            f"{PREPARE_HINT}")

    @property
    def ids(self) -> list[str]:
        return self._ids

    def default_stats(self) -> tuple[list[float], list[float]]:
        if self.channels == 1:
            return [float(np.mean(IMAGENET_MEAN))], [float(np.mean(IMAGENET_STD))]
        return list(IMAGENET_MEAN), list(IMAGENET_STD)

    def image_path(self, index: int) -> Path:
        return self.root / "JPEGImages" / f"{self._ids[index]}.jpg"

    def mask_path(self, index: int) -> Path:
        return self.mask_root / f"{self._ids[index]}.png"

    def load_raw(self, index: int) -> RawSample:
        sample_id = self._ids[index]
        image = read_image(self.image_path(index))
        if not self.has_masks:
            return RawSample(sample_id, image, np.zeros(len(VOC_CLASSES), np.float32), None)
        mask = read_mask(self.mask_path(index))
        check_mask(mask, self.num_classes, self.mask_path(index), image.shape[:2])
        return RawSample(sample_id, image, labels_from_mask(mask, len(VOC_CLASSES)), mask)
