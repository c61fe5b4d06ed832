"""Built-in synthetic multi-label segmentation data: no files, deterministic by (seed, split, index).

It is made hard enough that attribution methods differ:
- each class is a shape with its own texture, in random colours, so colour gives nothing away;
- cluttered background with a few small fragments of the class textures (finer than on the
  objects), and smooth noise;
- several objects per image, at varied scales, occluding one another;
- a *context* region ("water") that co-occurs with boats but is background, the way VOC boats
  sit on water: classifiers learn to look at it, and good maps must not spill onto it.
"""

from __future__ import annotations

import zlib

import cv2
import numpy as np

from wsss.data.base import RawSample, SegmentationSource, labels_from_mask

SYNTHETIC_CLASSES = ["disc", "square", "triangle", "boat"]
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
_MIN_VISIBLE_PIXELS = 24


def _split_code(split: str) -> int:
    return _SPLIT_CODES.get(split, zlib.crc32(split.encode()) % 1000 + 10)


def _texture(kind: str, yy: np.ndarray, xx: np.ndarray, period: float, angle: float) -> np.ndarray:
    """A 0/1 pattern of the given kind over the pixel grid."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = xx * c + yy * s, -xx * s + yy * c
    if kind == "rings":
        return (np.sin(np.hypot(u, v) * 2 * np.pi / period) > 0).astype(np.float32)
    if kind == "checks":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == "stripes":
        return (np.sin((u + v) * 2 * np.pi / period) > 0).astype(np.float32)
    if kind == "planks":
        return (np.sin(v * 2 * np.pi / period) > 0.3).astype(np.float32)
    raise ValueError(kind)


_CLASS_TEXTURE = {"disc": "rings", "square": "checks", "triangle": "stripes", "boat": "planks"}


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float,
                angle: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == "disc":
        return dx * dx + dy * dy <= r * r
    c, s = np.cos(angle), np.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    if kind == "square":
        side = 0.82 * r
        return (np.abs(u) <= side) & (np.abs(v) <= side)
    if kind == "triangle":
        # equilateral triangle of circumradius r, rotated by angle
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = angle + np.pi / 2 + k * 2 * np.pi / 3
            inside &= (dx * np.cos(a) + dy * np.sin(a)) >= -0.5 * r
        return inside
    if kind == "boat":
        # trapezoid hull (wide deck, narrow keel) plus a mast and a sail, upright
        hull = (dy >= 0) & (dy <= 0.55 * r) & (np.abs(dx) <= r * (1.0 - 0.45 * dy / (0.55 * r)))
        mast = (dy < 0) & (dy >= -1.1 * r) & (np.abs(dx + 0.1 * r) <= 0.07 * r)
        sail = (dy < -0.1 * r) & (dy >= -1.0 * r) & (dx >= -0.03 * r) & (dx <= 0.6 * r * (dy + 1.0 * r) / (0.9 * r))
        return hull | mast | sail
    raise ValueError(kind)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(20, 235, size=3).astype(np.float32)


def render_sample(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one image (float32 HxWx3, 0..255) and its mask (uint8, 0 = background)."""
    rng = np.random.default_rng([seed, _split_code(split), index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    # smooth coloured background with low-frequency noise
    low = rng.uniform(30, 220, size=(4, 4, 3)).astype(np.float32)
    image = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    mask = np.zeros((size, size), np.uint8)

    # choose the objects first, so the context region can depend on them
    n_objects = rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15])
    classes = [int(c) for c in rng.integers(0, len(SYNTHETIC_CLASSES), size=n_objects)]
    has_boat = SYNTHETIC_CLASSES.index("boat") in classes
    water_top = None
    if (has_boat and rng.random() < 0.9) or (not has_boat and rng.random() < 0.1):
        water_top = size * rng.uniform(0.55, 0.7)
        wave = water_top + 0.03 * size * np.sin(xx * 2 * np.pi / rng.uniform(0.2, 0.4) / size + rng.uniform(0, 6))
        water = yy >= wave
        ripple = (np.sin(yy * 2 * np.pi / 5 + 0.4 * np.sin(xx / 6)) > 0.6).astype(np.float32)[..., None]
        base = np.array([rng.uniform(10, 60), rng.uniform(60, 140), rng.uniform(140, 230)], np.float32)
        water_rgb = base * (0.85 + 0.3 * ripple)
        image = np.where(water[..., None], water_rgb, image)

    # clutter: small fragments of every texture in random colours
    for _ in range(int(rng.integers(2, 7))):
        kind = SYNTHETIC_CLASSES[int(rng.integers(0, len(SYNTHETIC_CLASSES) - 1))]
        cy, cx = rng.uniform(0, size, 2)
        r = size * rng.uniform(0.025, 0.06)
        frag = ((yy - cy) ** 2 / rng.uniform(0.3, 1.0) + (xx - cx) ** 2) <= r * r
        tex = _texture(_CLASS_TEXTURE[kind], yy, xx, size * rng.uniform(0.02, 0.04), rng.uniform(0, np.pi))
        col = np.where(tex[..., None] > 0, _random_colour(rng), _random_colour(rng))
        image = np.where(frag[..., None], col, image)

    # objects, drawn in order so later ones occlude earlier ones
    for cls in classes:
        kind = SYNTHETIC_CLASSES[cls]
        r = size * rng.uniform(0.12, 0.28)
        angle = rng.uniform(0, 2 * np.pi)
        if kind == "boat" and water_top is not None:
            cy = water_top - 0.1 * r + rng.uniform(-0.05, 0.05) * size
            angle = 0.0
        else:
            cy = rng.uniform(r, size - r)
            if kind == "boat":
                angle = 0.0
        cx = rng.uniform(r * 0.8, size - r * 0.8)
        shape = _shape_mask(kind, yy, xx, cy, cx, r, angle)
        period = r * rng.uniform(0.25, 0.4)
        tex = _texture(_CLASS_TEXTURE[kind], yy - cy, xx - cx, period, angle + rng.uniform(-0.3, 0.3))
        col_a, col_b = _random_colour(rng), _random_colour(rng)
        while np.abs(col_a - col_b).sum() < 120:
            col_b = _random_colour(rng)
        obj = np.where(tex[..., None] > 0, col_a, col_b)
        image = np.where(shape[..., None], obj, image)
        mask[shape] = cls + 1

    # drop classes that ended up (almost) fully occluded: their few pixels become ignore
    for cls in range(1, len(SYNTHETIC_CLASSES) + 1):
        visible = mask == cls
        if 0 < visible.sum() < _MIN_VISIBLE_PIXELS:
            mask[visible] = 255

    image = image + rng.normal(0, 6, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.float32), mask


class SyntheticSegmentation(SegmentationSource):
    """Deterministic synthetic data set; every item is generated on the fly from its index."""

    class_names = SYNTHETIC_CLASSES

    def __init__(self, split: str = "train", num_images: int = 400, image_size: int = 128,
                 seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.split = split
        self.num_images = num_images
        self.image_size = image_size
        self.seed = seed
        self._ids = [f"syn_{split}_{i:05d}" for i in range(num_images)]

    @property
    def ids(self) -> list[str]:
        return self._ids

    def default_stats(self) -> tuple[list[float], list[float]]:
        return [127.0] * self.channels, [60.0] * self.channels

    def load_raw(self, index: int) -> RawSample:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        image, mask = render_sample(self.seed, self.split, index, self.image_size)
        labels = labels_from_mask(mask, len(self.class_names))
        attempt = 0
        while labels.sum() == 0:  # every image has at least one class; regenerate deterministically
            attempt += 1
            image, mask = render_sample(self.seed, f"{self.split}#{attempt}", index, self.image_size)
            labels = labels_from_mask(mask, len(self.class_names))
        return RawSample(id=self._ids[index], image=image, labels=labels, mask=mask)
