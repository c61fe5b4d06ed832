"""The shared data-set contract: each source loads raw samples; this base class applies the
intensity handling (``data.intensity``), the channel count, the working size (``data.image_size``
as the long side, image and mask together), then the albumentations pipeline (masks padded with
255), normalises per data set and returns tensors.

A sample is a dict with ``image`` (float C,H,W, normalised), ``labels`` (multi-hot float over
the foreground classes; all zero for a negative image), ``mask`` (long H,W, 255 = ignore; only
where ground truth exists), ``id`` (str) and ``orig_size`` (long tensor (H, W) of the image file,
before resizing: outputs are written back at this size, ``wsss.data.resize.restore_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from wsss.data.imageio import DataError, check_mask, read_mask
from wsss.data.intensity import check_intensity, scale_intensity
from wsss.data.masks import CONFIDENCE_DIR, voc_palette
from wsss.data.transforms import resize_transform


@dataclass
class RawSample:
    id: str
    image: np.ndarray  # float32 HxWxC, raw units
    labels: np.ndarray  # float32 multi-hot over the foreground classes
    mask: Optional[np.ndarray]  # uint8 HxW or None
    orig_size: Optional[tuple[int, int]] = (
        None  # (H, W) of the image file; set by SegmentationSource.load
    )
    confidence: Optional[np.ndarray] = None  # uint8 HxW beside an override mask, 255 = certain


def labels_from_mask(mask: np.ndarray, num_foreground: int) -> np.ndarray:
    """Multi-hot labels of the classes present in a mask, other than background 0 and void 255."""
    present = np.unique(mask)
    present = present[(present > 0) & (present <= num_foreground)]
    labels = np.zeros(num_foreground, dtype=np.float32)
    labels[present.astype(np.int64) - 1] = 1.0
    return labels


class SegmentationSource(Dataset):
    """Base class of the data sources. Subclasses implement ``ids``, ``load_raw`` and ``default_stats``."""

    class_names: list[str]  # foreground classes; index 0 of masks is background
    has_masks: bool = True
    allows_negatives: bool = (
        False  # True where an image without labels is a valid negative (CSV labels)
    )
    mask_values: Optional[dict[int, int]] = (
        None  # file value -> class of the source's own masks; None = identity
    )

    def __init__(
        self,
        transform: Optional[Callable[..., dict[str, Any]]] = None,
        mean: Optional[list[float]] = None,
        std: Optional[list[float]] = None,
        channels: int = 3,
        intensity: str = "dataset",
        window: Optional[list[float]] = None,
        long_side: Optional[int] = None,
    ) -> None:
        self.transform = transform
        self.channels = channels
        self.intensity = intensity
        self.window = window
        check_intensity(intensity, window)
        self.long_side = long_side
        self._resize = resize_transform(long_side) if long_side else None
        self._mean = mean
        self._std = std
        self.mask_override: Optional[Path] = None
        self.confidence_dir: Optional[Path] = None

    # -- to implement
    @property
    def ids(self) -> list[str]:
        raise NotImplementedError

    def load_raw(self, index: int) -> RawSample:
        raise NotImplementedError

    def default_stats(self) -> tuple[list[float], list[float]]:
        raise NotImplementedError

    # -- shared behaviour
    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return len(self.class_names) + 1

    @property
    def all_class_names(self) -> list[str]:
        return ["background", *self.class_names]

    @property
    def palette(self) -> list[int]:
        return voc_palette()

    @property
    def stats(self) -> tuple[list[float], list[float]]:
        if self._mean is None or self._std is None:
            mean, std = self.default_stats()
            self._mean = self._mean if self._mean is not None else mean
            self._std = self._std if self._std is not None else std
        if len(self._mean) != self.channels or len(self._std) != self.channels:
            raise DataError(
                f"data.mean/data.std need {self.channels} value(s) (one per channel), "
                f"got {self._mean} / {self._std}"
            )
        return self._mean, self._std

    def use_masks_from(self, directory: str | Path | None, confidence: bool = False) -> None:
        """Read masks from ``directory/<id>.png`` instead of the data set's own (pseudo-masks);
        with ``confidence``, also each mask's per-pixel confidence from
        ``directory/confidence/<id>.png``, augmented with the mask (item ``confidence``)."""
        self.mask_override = Path(directory) if directory is not None else None
        self.confidence_dir = (
            self.mask_override / CONFIDENCE_DIR if confidence and self.mask_override else None
        )

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> RawSample:
        """The sample as the model sees it before augmentation: intensity handled, channels set,
        resized to the working size (masks, the source's own or the override, by nearest)."""
        sample = self.load_raw(index)
        sample.orig_size = (int(sample.image.shape[0]), int(sample.image.shape[1]))
        sample.image = self.prepare_image(sample.image, sample.id)
        if self.mask_override is not None:
            path = self.mask_override / f"{sample.id}.png"
            mask = read_mask(path)
            check_mask(mask, self.num_classes, path, sample.orig_size)
            sample.mask = mask
        if self.confidence_dir is not None:
            sample.confidence = self._read_confidence(sample.id, sample.orig_size)
            sample.image, (sample.mask, sample.confidence) = self.resize_with(
                sample.image, [sample.mask, sample.confidence]
            )
            return sample
        sample.image, sample.mask = self.resize(sample.image, sample.mask)
        return sample

    def _read_confidence(self, sample_id: str, image_hw: tuple[int, int]) -> np.ndarray:
        path = self.confidence_dir / f"{sample_id}.png"
        if not path.is_file():
            raise DataError(
                f"{path}: confidence map is missing; the pseudo-mask stage writes one beside each "
                f"mask (rerun it), or train with segmenter.confidence_power=0 "
                f"and segmenter.co_training=false"
            )
        levels = read_mask(path)
        if tuple(levels.shape) != tuple(image_hw):
            raise DataError(
                f"{path}: confidence map is {levels.shape[0]}x{levels.shape[1]}, the image is "
                f"{image_hw[0]}x{image_hw[1]}; rerun the pseudo-mask stage"
            )
        return levels

    def prepare_image(self, image: np.ndarray, sample_id: str) -> np.ndarray:
        """Raw units -> ``data.intensity`` units, with the model's channel count."""
        return self._to_channels(scale_intensity(image, self.intensity, self.window), sample_id)

    def resize(
        self, image: np.ndarray, mask: Optional[np.ndarray] = None
    ) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """To the working size: long side = ``long_side`` (area / linear for images, nearest for masks)."""
        if self._resize is None:
            return image, mask
        if mask is None:
            return self._resize(image=image)["image"], None
        out = self._resize(image=image, mask=mask)
        return out["image"], out["mask"]

    def resize_with(
        self, image: np.ndarray, masks: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """``resize`` for an image and several masks (nearest), e.g. a mask and its confidence."""
        if self._resize is None:
            return image, masks
        out = self._resize(image=image, masks=masks)
        return out["image"], list(out["masks"])

    def raw_image(self, index: int) -> np.ndarray:
        """The image of ``load_raw`` alone; sources that can skip reading the mask override this."""
        return self.load_raw(index).image

    def working_image(self, index: int) -> np.ndarray:
        """The image of ``load`` without its mask (statistics)."""
        return self.resize(self.prepare_image(self.raw_image(index), self.ids[index]))[0]

    def compute_stats(self, indices: list[int]) -> tuple[list[float], list[float]]:
        """Per-channel mean/std of the working images ``indices`` (std floored at 1e-6)."""
        total = np.zeros(self.channels)
        squares = np.zeros(self.channels)
        pixels = 0
        for index in indices:
            image = self.working_image(index).astype(np.float64)
            total += image.sum(axis=(0, 1))
            squares += (image**2).sum(axis=(0, 1))
            pixels += image.shape[0] * image.shape[1]
        mean = total / pixels
        std = np.sqrt(np.maximum(squares / pixels - mean**2, 0.0))
        return [float(v) for v in mean], [float(max(v, 1e-6)) for v in std]

    def _to_channels(self, image: np.ndarray, sample_id: str) -> np.ndarray:
        if image.shape[2] == self.channels:
            return image
        if image.shape[2] == 1 and self.channels == 3:
            return np.repeat(image, 3, axis=2)
        if image.shape[2] == 3 and self.channels == 1:
            return image.mean(axis=2, keepdims=True)
        raise DataError(
            f"{sample_id}: image has {image.shape[2]} channels, the model expects {self.channels}"
        )

    def normalise(self, image: np.ndarray) -> torch.Tensor:
        mean, std = self.stats
        image = (image - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """``key`` is an index, or ``(index, augmentation_seed)`` from a ``GlobalBatchSampler``:
        the albumentations pipeline is then reseeded for this item, so its augmentation depends
        on nothing but the seed (not on the worker, the process or what was loaded before)."""
        index, seed = key if isinstance(key, tuple) else (key, None)
        return self.item(self.load(index), seed)

    def item(self, sample: RawSample, seed: Optional[int] = None) -> dict[str, Any]:
        """A loaded sample (``load``) augmented (reseeded with ``seed`` where given) and as
        tensors: the second half of ``__getitem__``, for wrappers that change the sample first."""
        if seed is not None and hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
        image, mask, confidence = sample.image, sample.mask, sample.confidence
        if self.transform is not None:
            if confidence is not None:  # augmented as a second mask, with the same draw
                out = self.transform(image=image, mask=mask, masks=[confidence])
                image, mask, confidence = out["image"], out["mask"], out["masks"][0]
            elif mask is not None:
                out = self.transform(image=image, mask=mask)
                image, mask = out["image"], out["mask"]
            else:
                image = self.transform(image=image)["image"]
        if image.ndim == 2:
            image = image[:, :, None]
        item: dict[str, Any] = {
            "image": self.normalise(image),
            "labels": torch.from_numpy(sample.labels),
            "id": sample.id,
            "orig_size": torch.tensor(sample.orig_size, dtype=torch.long),
        }
        if mask is not None:
            item["mask"] = torch.from_numpy(np.ascontiguousarray(mask)).long()
        if confidence is not None:
            item["confidence"] = torch.from_numpy(np.ascontiguousarray(confidence))
        return item

    def fill_value(self) -> tuple[float, ...]:
        """Raw-unit padding colour (the data set mean), so padding normalises to zero."""
        return tuple(float(m) for m in self.stats[0])
