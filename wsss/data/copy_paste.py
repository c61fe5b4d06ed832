"""Context decoupling (CDA): training images with objects of other images pasted onto them.

For training image ``i`` at epoch ``e`` a numpy generator seeded with (seed, e, i) decides
whether to paste, picks a donor image and some of the classes of its round-1 pseudo-mask, cuts
those pixels out (the donor class only: neither background nor void), rescales them and pastes
them at a random place. The labels become the union of both images' labels; the receiving image
keeps its own even where the paste covers them (docs/ALGORITHMS.md says why). The sampler passes
the epoch with each index (``GlobalBatchSampler(with_epoch=True)``), so a resumed fit replays
the same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import cv2
import numpy as np
from torch.utils.data import Dataset

from wsss.data.base import RawSample, SegmentationSource

DONOR_TRIES = 3  # donors drawn before giving up on an image whose donors have no object


@dataclass(frozen=True)
class Paste:
    """What one paste put where: the donor, its classes and the box in the receiving image."""

    donor: int
    classes: tuple[int, ...]
    box: tuple[int, int, int, int]  # top, left, height, width


def paste_generator(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of every random choice for image ``index`` at ``epoch``."""
    return np.random.default_rng([seed, epoch, index])


def present_classes(mask: np.ndarray, num_foreground: int) -> np.ndarray:
    """Foreground classes in a mask (not background 0, not void 255), sorted."""
    values = np.unique(mask)
    return values[(values > 0) & (values <= num_foreground)]


def paste_region(
    image: np.ndarray,
    mask: Optional[np.ndarray],
    donor_image: np.ndarray,
    donor_mask: np.ndarray,
    classes: np.ndarray,
    rng: np.random.Generator,
    min_scale: float,
) -> tuple[int, int, int, int]:
    """Paste the donor pixels of ``classes`` into ``image`` (and ``mask``) in place, rescaled by
    a factor drawn from [min_scale, 1] (shrunk further to fit) at a random place; the box."""
    rows, cols = np.nonzero(np.isin(donor_mask, classes))
    top, left = rows.min(), cols.min()
    patch_image = donor_image[top : rows.max() + 1, left : cols.max() + 1]
    patch_mask = donor_mask[top : rows.max() + 1, left : cols.max() + 1]
    height, width = image.shape[:2]
    scale = rng.uniform(min_scale, 1.0)
    scale = min(scale, height / patch_mask.shape[0], width / patch_mask.shape[1])
    size = (
        max(1, min(width, round(patch_mask.shape[1] * scale))),
        max(1, min(height, round(patch_mask.shape[0] * scale))),
    )
    patch_image = cv2.resize(patch_image, size, interpolation=cv2.INTER_LINEAR)
    patch_mask = cv2.resize(patch_mask, size, interpolation=cv2.INTER_NEAREST)
    if patch_image.ndim == 2:
        patch_image = patch_image[:, :, None]
    y = int(rng.integers(0, height - size[1] + 1))
    x = int(rng.integers(0, width - size[0] + 1))
    chosen = np.isin(patch_mask, classes)
    image[y : y + size[1], x : x + size[0]][chosen] = patch_image[chosen]
    if mask is not None:
        mask[y : y + size[1], x : x + size[0]][chosen] = patch_mask[chosen]
    return y, x, size[1], size[0]


class CopyPasteSource(Dataset):
    """The training source with copy-paste applied before its augmentation.

    source: the training split with its augmentation (images and labels of the receivers);
    donors: the same split without augmentation whose masks are the round-1 pseudo-masks
    (``use_masks_from``); probability: the share of images that receive a paste;
    min_scale: the smallest rescaling of a pasted object.
    """

    reads_epoch = True  # the sampler yields (index, augmentation_seed, epoch)

    def __init__(
        self,
        source: SegmentationSource,
        donors: SegmentationSource,
        seed: int,
        probability: float,
        min_scale: float = 0.5,
    ) -> None:
        if len(source) < 2 or len(donors) != len(source):
            raise ValueError("copy-paste needs the same split of at least two images twice")
        self.source, self.donors = source, donors
        self.seed, self.probability, self.min_scale = seed, probability, min_scale
        self.class_names = source.class_names
        self.all_class_names = source.all_class_names
        self.ids = source.ids

    def __len__(self) -> int:
        return len(self.source)

    def decoupled(self, index: int, epoch: int) -> tuple[RawSample, Optional[Paste]]:
        """Image ``index`` at ``epoch`` with its paste (if any) applied, before augmentation."""
        sample = self.source.load(index)
        rng = paste_generator(self.seed, epoch, index)
        if rng.random() >= self.probability:
            return sample, None
        count = len(self.class_names)
        for _ in range(DONOR_TRIES):
            donor = int(rng.integers(0, len(self) - 1))
            donor += donor >= index  # never the image itself
            other = self.donors.load(donor)
            present = present_classes(other.mask, count)
            if len(present):
                break
        else:
            return sample, None
        chosen = np.sort(rng.choice(present, int(rng.integers(1, len(present) + 1)), False))
        sample.image = np.array(sample.image, dtype=np.float32)
        sample.mask = None if sample.mask is None else np.array(sample.mask)
        box = paste_region(
            sample.image, sample.mask, other.image, other.mask, chosen, rng, self.min_scale
        )
        sample.labels = sample.labels.copy()
        sample.labels[chosen.astype(np.int64) - 1] = 1.0
        return sample, Paste(donor, tuple(int(c) for c in chosen), box)

    def __getitem__(self, key: int | tuple[int, ...]) -> dict[str, Any]:
        """``key``: ``(index, augmentation_seed, epoch)`` from the sampler, or an index (epoch 0,
        the source's own augmentation draw)."""
        index, seed, epoch = key if isinstance(key, tuple) else (key, None, 0)
        sample, _ = self.decoupled(index, epoch)
        return self.source.item(sample, seed)
