"""Built-in medical-style synthetic data (``data.name=synthetic_lesion``): no files, deterministic
by (seed, split, index).

Each image is one-channel 16-bit (integer values 0..65535, as a 16-bit scanner writes them):
- tissue: a base level with smooth low-frequency shading, mid-frequency mottling, fibrous
  gratings, bright thin vessels (structures that are *not* findings) and pixel noise;
- a share of images (``negative_fraction``) holds no finding: a negative, with all-zero labels;
- the others hold one or two *lesions*: blobs with irregular borders, of varied size (6-20 % of
  the side) and contrast (brighter or darker than the tissue, faint to strong), soft-edged;
- with ``findings=2`` a second finding type, *calcification*: a cluster of small very bright
  specks, alone or beside a lesion (multi-finding images).

Masks hold class indices (0 background, 1 lesion, 2 calcification); image-level labels are the
classes present. ``scripts/make_synthetic_lesion.py`` writes the same images as an image folder
with CSVs and masks, so the folder path is exercised on identical data.
"""

from __future__ import annotations

import cv2
import numpy as np

from wsss.data.base import RawSample, SegmentationSource, labels_from_mask
from wsss.data.synthetic import split_code

LESION_CLASSES = ["lesion", "calcification"]
MAX_VALUE = 65535
STATS_IMAGES = 64


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-range smooth noise: a random ``cells`` x ``cells`` grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _tissue(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    side = max(height, width)
    image = np.full((height, width), rng.uniform(16000, 30000), np.float32)
    image += rng.uniform(1200, 2500) * _smooth_field(rng, height, width, 4)  # shading
    image += rng.uniform(600, 1400) * _smooth_field(
        rng, height, width, int(rng.integers(10, 18))
    )  # mottling
    for _ in range(int(rng.integers(2, 4))):  # fibrous gratings, each fading in and out
        angle, period = rng.uniform(0, np.pi), side * rng.uniform(0.03, 0.08)
        wave = np.sin(
            (xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period + rng.uniform(0, 6.3)
        )
        image += (
            rng.uniform(300, 900) * wave * np.clip(_smooth_field(rng, height, width, 3) + 0.3, 0, 1)
        )
    for _ in range(int(rng.integers(1, 4))):  # vessels: thin bright meandering curves
        vertical = rng.random() < 0.5
        along, across = (yy, xx) if vertical else (xx, yy)
        extent = width if vertical else height
        centre = rng.uniform(0.1, 0.9) * extent + rng.uniform(0.03, 0.1) * extent * np.sin(
            along * 2 * np.pi / (side * rng.uniform(0.4, 1.2)) + rng.uniform(0, 6.3)
        )
        thickness = rng.uniform(0.8, 1.8)
        image += rng.uniform(1500, 3500) * np.exp(-0.5 * ((across - centre) / thickness) ** 2)
    return image


def _lesion_shape(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, side: int
) -> np.ndarray:
    """A blob with an irregular border: radius modulated by a few random harmonics of the angle."""
    height, width = yy.shape
    radius = side * rng.uniform(0.06, 0.2)
    cy = rng.uniform(radius, max(radius + 1, height - radius))
    cx = rng.uniform(radius, max(radius + 1, width - radius))
    dy, dx = yy - cy, xx - cx
    theta = np.arctan2(dy, dx)
    border = np.ones_like(theta)
    for k in range(2, 6):
        border += rng.uniform(0.0, 0.12) * np.sin(k * theta + rng.uniform(0, 6.3))
    return np.hypot(dy, dx) <= radius * border


def _calcification_shape(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, side: int
) -> np.ndarray:
    """A cluster of 4-10 small specks within a small region."""
    height, width = yy.shape
    spread = side * rng.uniform(0.04, 0.08)
    cy, cx = rng.uniform(spread, height - spread), rng.uniform(spread, width - spread)
    shape = np.zeros(yy.shape, bool)
    for _ in range(int(rng.integers(4, 11))):
        sy, sx = cy + rng.normal(0, spread / 2), cx + rng.normal(0, spread / 2)
        shape |= np.hypot(yy - sy, xx - sx) <= rng.uniform(1.2, 2.5)
    return shape


def render_lesion_sample(
    seed: int,
    split: str,
    index: int,
    height: int,
    width: int,
    negative_fraction: float = 0.3,
    findings: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """One image (float32 HxWx1 holding integers 0..65535) and its mask (uint8 class indices)."""
    if findings not in (1, 2):
        raise ValueError(f"findings must be 1 or 2, got {findings}")
    rng = np.random.default_rng([seed, split_code(split), index, 7919])
    side = max(height, width)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = _tissue(rng, height, width)
    mask = np.zeros((height, width), np.uint8)

    present: list[int] = []
    if rng.random() >= negative_fraction:
        present = (
            [1] if findings == 1 else [[1], [2], [1, 2]][int(rng.choice(3, p=[0.4, 0.3, 0.3]))]
        )
    if 1 in present:
        for _ in range(1 if rng.random() < 0.7 else 2):
            shape = _lesion_shape(rng, yy, xx, side)
            contrast = rng.uniform(2500, 7000) * (1.0 if rng.random() < 0.8 else -1.0)
            edge = cv2.GaussianBlur(shape.astype(np.float32), (0, 0), rng.uniform(0.8, 2.0))
            inner = 1.0 + 0.15 * _smooth_field(rng, height, width, int(rng.integers(12, 24)))
            image += contrast * edge * inner
            mask[shape] = 1
    if 2 in present:
        shape = _calcification_shape(rng, yy, xx, side)
        image += rng.uniform(6000, 12000) * cv2.GaussianBlur(shape.astype(np.float32), (0, 0), 0.7)
        mask[shape] = 2
    image += rng.normal(0, rng.uniform(250, 600), size=image.shape).astype(np.float32)
    image = np.clip(np.round(image), 0, MAX_VALUE).astype(np.float32)
    return image[:, :, None], mask


class SyntheticLesion(SegmentationSource):
    """Deterministic medical-style data set; every item is generated on the fly from its index."""

    allows_negatives = True
    has_labels = True

    def __init__(
        self,
        split: str = "train",
        num_images: int = 200,
        image_size: int = 128,
        seed: int = 0,
        negative_fraction: float = 0.3,
        findings: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if findings not in (1, 2):
            raise ValueError(f"findings must be 1 or 2, got {findings}")
        self.split = split
        self.num_images = num_images
        self.image_size = image_size
        self.seed = seed
        self.negative_fraction = negative_fraction
        self.findings = findings
        self.class_names = LESION_CLASSES[:findings]
        self._ids = [f"lesion_{split}_{i:05d}" for i in range(num_images)]

    @property
    def ids(self) -> list[str]:
        return self._ids

    def default_stats(self) -> tuple[list[float], list[float]]:
        """Computed over the first (up to) 64 images: they are generated, so this is cheap."""
        return self.compute_stats(list(range(min(STATS_IMAGES, len(self)))))

    def load_raw(self, index: int) -> RawSample:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        image, mask = render_lesion_sample(
            self.seed,
            self.split,
            index,
            self.image_size,
            self.image_size,
            self.negative_fraction,
            self.findings,
        )
        return RawSample(self._ids[index], image, labels_from_mask(mask, self.findings), mask)
