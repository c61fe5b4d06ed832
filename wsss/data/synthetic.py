"""Built-in synthetic multi-label segmentation data: no files, deterministic by (seed, split, index).

Version 2 ("learnable"): a segmenter trained on its ground truth for CPU minutes reaches the
figures in docs/benchmarks.md, so the pipeline's numbers can be judged against it. It stays hard
enough that attribution methods differ:
- each class is a shape with its own texture (rings, checks, stripes, planks with joints, at one
  common scale) in light and dark shades of its own hue family; the background is smooth colour
  of every hue, and clutter repeats the textures in random colours, so neither hue nor texture
  alone gives a class away;
- cluttered background: small fragments of the object textures, finer than on the objects, and
  smooth low-frequency colour;
- several objects per image, at varied scales, occluding one another;
- a *context* region ("water") that co-occurs with boats but is background, the way VOC boats
  sit on water: classifiers learn to look at it, and good maps must not spill onto it.

The drawing helpers (``texture``, ``shape_mask``, ``paint_pattern``, ``smooth_background``,
``paint_water``, ``paint_clutter``, ...) are shared with ``scripts/make_synthetic_voc.py``.
"""

from __future__ import annotations

import colorsys
import zlib
from typing import Callable, Sequence

import cv2
import numpy as np

from wsss.data.base import RawSample, SegmentationSource, labels_from_mask
from wsss.label_maps import IGNORE_INDEX

SYNTHETIC_CLASSES = ["disc", "square", "triangle", "boat"]
CLASS_TEXTURE = {"disc": "rings", "square": "checks", "triangle": "stripes", "boat": "planks"}
CLASS_HUE = {
    "disc": 0.0,
    "square": 0.33,
    "triangle": 0.77,
    "boat": 0.15,
}  # red, green, violet, yellow
_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
_MIN_VISIBLE_PIXELS = 24
# geometry as fractions of the image side
_OBJECT_RADIUS = (0.16, 0.3)
_BOAT_SCALE = 1.25  # a boat covers less of its radius than the other shapes
_OBJECT_PERIOD = (0.065, 0.09)  # texture period on objects: one scale for every object size
_CLUTTER_RADIUS = (0.025, 0.06)
_CLUTTER_PERIOD = (0.02, 0.035)  # finer than any object texture


def split_code(split: str) -> int:
    """A number per split name, for seeding: train 1, val 2, test 3, others from a hash."""
    return _SPLIT_CODES.get(split, zlib.crc32(split.encode()) % 1000 + 10)


def render_labelled(
    render: Callable[[str], tuple[np.ndarray, np.ndarray]], split: str, num_foreground: int
) -> tuple[np.ndarray, np.ndarray]:
    """``render(split)``, redrawn deterministically under the keys ``split#1``, ``split#2``, ...
    until its mask holds at least one foreground class (an image must carry a label)."""
    image, mask = render(split)
    attempt = 0
    while not labels_from_mask(mask, num_foreground).any():
        attempt += 1
        image, mask = render(f"{split}#{attempt}")
    return image, mask


def pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (float32 HxW each)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return yy, xx


def texture(kind: str, yy: np.ndarray, xx: np.ndarray, period: float, angle: float) -> np.ndarray:
    """A 0/1 float32 pattern of the given kind over the pixel grid (coordinates relative to its
    centre for ``rings``): rings, checks, stripes (50 % duty), planks (boards with joints), dots
    or zigzag."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = xx * c + yy * s, -xx * s + yy * c
    if kind == "rings":
        return (np.sin(np.hypot(u, v) * 2 * np.pi / period) > 0).astype(np.float32)
    if kind == "checks":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == "stripes":
        return (np.sin((u + v) * 2 * np.pi / period) > 0).astype(np.float32)
    if kind == "planks":
        # boards of height `period` (lines along u), each row's butt joints offset by half a board
        row = np.floor(v / period)
        seam = (v / period - row) < 0.25
        joint = ((u / (2.5 * period) + 0.5 * row) % 1.0) < 0.12
        return (seam | joint).astype(np.float32)
    if kind == "dots":
        du, dv = u / period % 1.0 - 0.5, v / period % 1.0 - 0.5
        return (du * du + dv * dv < 0.09).astype(np.float32)
    if kind == "zigzag":
        tooth = np.abs(u / period % 1.0 - 0.5)  # triangle wave along u
        return (np.sin((v + period * tooth) * 2 * np.pi / period) > 0).astype(np.float32)
    raise ValueError(kind)


def shape_mask(
    kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float, angle: float
) -> np.ndarray:
    """Boolean mask of one shape of "radius" ``r`` centred at (cy, cx), rotated by ``angle``."""
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
        return boat_hull(dy, dx, r) | boat_rig(dy, dx, r)
    raise ValueError(kind)


def boat_hull(dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Trapezoid hull (wide deck, narrow keel) of an upright boat; (dy, dx) from its deck centre."""
    return (dy >= 0) & (dy <= 0.55 * r) & (np.abs(dx) <= r * (1.0 - 0.45 * dy / (0.55 * r)))


def boat_rig(dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Thin mast plus a triangular sail above the deck of an upright boat."""
    mast = (dy < 0) & (dy >= -1.1 * r) & (np.abs(dx + 0.1 * r) <= 0.07 * r)
    sail = (
        (dy < -0.1 * r)
        & (dy >= -1.0 * r)
        & (dx >= -0.03 * r)
        & (dx <= 0.6 * r * (dy + 1.0 * r) / (0.9 * r))
    )
    return mast | sail


def random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(20, 235, size=3).astype(np.float32)


def contrasting_colours(
    rng: np.random.Generator, min_distance: float = 120.0
) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours at least ``min_distance`` apart (L1 over RGB), for a visible pattern."""
    first, second = random_colour(rng), random_colour(rng)
    while np.abs(first - second).sum() < min_distance:
        second = random_colour(rng)
    return first, second


def tinted_colours(
    rng: np.random.Generator, hue: float, spread: float = 0.05
) -> tuple[np.ndarray, np.ndarray]:
    """A light and a dark colour within ``spread`` of ``hue`` (0..1, as in HSV): the hue hints at
    the class, the light/dark contrast shows the texture."""
    h = (hue + rng.uniform(-spread, spread)) % 1.0
    light = colorsys.hsv_to_rgb(h, rng.uniform(0.45, 0.9), rng.uniform(0.8, 1.0))
    dark = colorsys.hsv_to_rgb(
        (h + rng.uniform(-0.03, 0.03)) % 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.25, 0.5)
    )
    return np.float32(light) * 255, np.float32(dark) * 255


def paint_pattern(
    image: np.ndarray,
    region: np.ndarray,
    pattern: np.ndarray,
    colours: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """``image`` with ``region`` painted in ``colours[0]`` where ``pattern`` is on, else ``colours[1]``."""
    painted = np.where(pattern[..., None] > 0, colours[0], colours[1])
    return np.where(region[..., None], painted, image)


def smooth_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth coloured background: a 4x4 grid of random colours, bicubically upsampled."""
    low = rng.uniform(30, 220, size=(4, 4, 3)).astype(np.float32)
    return cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)


def water_region(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, top: float
) -> np.ndarray:
    """Everything below a wavy waterline around row ``top``."""
    width = xx.shape[1]
    wave = top + 0.03 * width * np.sin(
        xx * 2 * np.pi / rng.uniform(0.2, 0.4) / width + rng.uniform(0, 6)
    )
    return yy >= wave


def paint_water(
    rng: np.random.Generator, image: np.ndarray, water: np.ndarray, yy: np.ndarray, xx: np.ndarray
) -> np.ndarray:
    """Blue water with horizontal ripples: a background texture of its own (the context confound)."""
    ripple = (np.sin(yy * 2 * np.pi / 5 + 0.4 * np.sin(xx / 6)) > 0.6).astype(np.float32)[..., None]
    base = np.array([rng.uniform(10, 60), rng.uniform(60, 140), rng.uniform(140, 230)], np.float32)
    return np.where(water[..., None], base * (0.85 + 0.3 * ripple), image)


def paint_clutter(
    rng: np.random.Generator,
    image: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    kinds: Sequence[str],
    count: tuple[int, int],
    radius: tuple[float, float],
    period: tuple[float, float],
) -> np.ndarray:
    """Small elliptic fragments of the given textures (radius and period in pixels) at random places."""
    height, width = yy.shape
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        kind = kinds[int(rng.integers(0, len(kinds)))]
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(*radius)
        fragment = ((yy - cy) ** 2 / rng.uniform(0.3, 1.0) + (xx - cx) ** 2) <= r * r
        pattern = texture(kind, yy - cy, xx - cx, rng.uniform(*period), rng.uniform(0, np.pi))
        image = paint_pattern(image, fragment, pattern, (random_colour(rng), random_colour(rng)))
    return image


def void_small_classes(mask: np.ndarray, classes: Sequence[int], min_pixels: int) -> None:
    """In place: classes left with fewer than ``min_pixels`` visible pixels (occluded) become 255."""
    for cls in classes:
        visible = mask == cls
        if 0 < visible.sum() < min_pixels:
            mask[visible] = IGNORE_INDEX


def add_noise(rng: np.random.Generator, image: np.ndarray, sigma: float = 6.0) -> np.ndarray:
    """Gaussian pixel noise, clipped to 0..255 (float32)."""
    image = image + rng.normal(0, sigma, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.float32)


def render_sample(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one image (float32 HxWx3, 0..255) and its mask (uint8, 0 = background)."""
    rng = np.random.default_rng([seed, split_code(split), index])
    yy, xx = pixel_grid(size, size)
    image = smooth_background(rng, size, size)
    mask = np.zeros((size, size), np.uint8)

    # choose the objects first, so the context region can depend on them
    n_objects = rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15])
    classes = [int(c) for c in rng.integers(0, len(SYNTHETIC_CLASSES), size=n_objects)]
    has_boat = SYNTHETIC_CLASSES.index("boat") in classes
    water_top = None
    if (has_boat and rng.random() < 0.9) or (not has_boat and rng.random() < 0.1):
        water_top = size * rng.uniform(0.55, 0.7)
        image = paint_water(rng, image, water_region(rng, yy, xx, water_top), yy, xx)

    # clutter: small, finely textured fragments of every texture but the boat's
    clutter_kinds = [CLASS_TEXTURE[k] for k in SYNTHETIC_CLASSES if k != "boat"]
    image = paint_clutter(
        rng,
        image,
        yy,
        xx,
        clutter_kinds,
        (2, 6),
        (size * _CLUTTER_RADIUS[0], size * _CLUTTER_RADIUS[1]),
        (size * _CLUTTER_PERIOD[0], size * _CLUTTER_PERIOD[1]),
    )

    # objects, drawn in order so later ones occlude earlier ones
    for cls in classes:
        kind = SYNTHETIC_CLASSES[cls]
        r = size * rng.uniform(*_OBJECT_RADIUS) * (_BOAT_SCALE if kind == "boat" else 1.0)
        angle = 0.0 if kind == "boat" else rng.uniform(0, 2 * np.pi)  # boats stay upright
        if kind == "boat" and water_top is not None:
            cy = water_top - 0.1 * r + rng.uniform(-0.05, 0.05) * size
        else:
            cy = rng.uniform(r, size - r)
        cx = rng.uniform(r * 0.8, size - r * 0.8)
        shape = shape_mask(kind, yy, xx, cy, cx, r, angle)
        period = size * rng.uniform(*_OBJECT_PERIOD)
        pattern = texture(
            CLASS_TEXTURE[kind], yy - cy, xx - cx, period, angle + rng.uniform(-0.3, 0.3)
        )
        colours = tinted_colours(rng, CLASS_HUE[kind], 0.05)
        image = paint_pattern(image, shape, pattern, colours)
        if kind == "boat":  # a plain mast and sail over the textured hull
            image = np.where(boat_rig(yy - cy, xx - cx, r)[..., None], colours[0], image)
        mask[shape] = cls + 1

    # drop classes that ended up (almost) fully occluded: their few pixels become ignore
    void_small_classes(mask, range(1, len(SYNTHETIC_CLASSES) + 1), _MIN_VISIBLE_PIXELS)
    return add_noise(rng, image), mask


class SyntheticSegmentation(SegmentationSource):
    """Deterministic synthetic data set; every item is generated on the fly from its index."""

    class_names = SYNTHETIC_CLASSES

    def __init__(
        self,
        split: str = "train",
        num_images: int = 400,
        image_size: int = 128,
        seed: int = 0,
        **kwargs,
    ) -> None:
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
        image, mask = render_labelled(
            lambda key: render_sample(self.seed, key, index, self.image_size),
            self.split,
            len(self.class_names),
        )
        return RawSample(
            id=self._ids[index],
            image=image,
            labels=labels_from_mask(mask, len(self.class_names)),
            mask=mask,
        )
