"""albumentations 2.x pipelines for each stage, and the working-size resize of folder data.
Image and mask move together; masks are padded with 255 (ignore) and images with the data-set
mean, so padding normalises to zero.

albumentations keeps its own random state, untouched by global seeds: the training pipeline is
seeded from ``run.seed`` here, and reseeded for every item by the data set from the seed its
sampler draws (``wsss.data.samplers``), so a run is reproducible, resumable to identical weights
and independent of how many workers or processes load it."""

from __future__ import annotations

from typing import Optional

import albumentations as A
import cv2

from wsss.label_maps import IGNORE_INDEX


def train_transform(
    crop_size: int,
    fill: tuple[float, ...],
    scale_range: tuple[float, float] = (0.7, 1.3),
    seed: Optional[int] = None,
) -> A.Compose:
    """Random scale, pad, random crop and flip: classifier and segmenter training."""
    return A.Compose(
        [
            A.RandomScale(scale_limit=(scale_range[0] - 1.0, scale_range[1] - 1.0), p=1.0),
            A.PadIfNeeded(
                min_height=crop_size,
                min_width=crop_size,
                border_mode=cv2.BORDER_CONSTANT,
                fill=fill,
                fill_mask=IGNORE_INDEX,
            ),
            A.RandomCrop(height=crop_size, width=crop_size),
            A.HorizontalFlip(p=0.5),
        ],
        seed=seed,
    )


def eval_transform(crop_size: int, fill: tuple[float, ...]) -> A.Compose:
    """Fit the longest side to ``crop_size`` and pad to a square: batched classifier validation."""
    return A.Compose(
        [
            A.LongestMaxSize(max_size=crop_size),
            A.PadIfNeeded(
                min_height=crop_size,
                min_width=crop_size,
                border_mode=cv2.BORDER_CONSTANT,
                fill=fill,
                fill_mask=IGNORE_INDEX,
            ),
        ]
    )


def resize_transform(long_side: int) -> A.Compose:
    """The working size of folder data (``data.image_size``): the long side becomes ``long_side``
    (up or down), the aspect ratio is kept. Images shrink by area averaging and grow bilinearly;
    masks take the nearest label (pixel-centre aligned, as ``wsss.data.resize.restore_size``)."""
    return A.Compose(
        [
            A.LongestMaxSize(
                max_size=long_side,
                interpolation=cv2.INTER_LINEAR,
                area_for_downscale="image",
                mask_interpolation=cv2.INTER_NEAREST_EXACT,
            ),
        ]
    )
