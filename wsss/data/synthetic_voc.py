"""The VOC-layout synthetic scene that ``scripts/make_synthetic_voc.py`` writes: six VOC classes
drawn as upright textured objects (boat always on water, thin legs, necks, stems and masts), void
borders along every object boundary, clutter, and two optional additions, the part class
``person`` (a telling head over a plain body) and background-only negatives. Each image is a
pure function of (seed, split, index); the script only writes them to disk."""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from wsss.data.synthetic import (
    add_noise,
    boat_rig,
    paint_clutter,
    paint_pattern,
    paint_water,
    pixel_grid,
    render_labelled,
    shape_mask,
    smooth_background,
    split_code,
    texture,
    tinted_colours,
    void_small_classes,
    water_region,
)
from wsss.data.voc import VOC_CLASSES

IGNORE = 255
# class -> its texture and hue family; the class index in the masks is its VOC index. Neighbouring
# hues touch (chair / table, bottle / plant), so colour alone leaves classes confused.
CLASS_TEXTURE = {
    "boat": "planks",
    "bottle": "stripes",
    "chair": "zigzag",
    "diningtable": "checks",
    "pottedplant": "rings",
    "tvmonitor": "dots",
}
CLASS_HUE = {
    "boat": 0.15,
    "bottle": 0.3,
    "chair": 0.0,
    "diningtable": 0.08,
    "pottedplant": 0.4,
    "tvmonitor": 0.8,
}
HUE_SPREAD = 0.04
CLASSES = list(CLASS_TEXTURE)
OBJECT_RADIUS = (0.2, 0.34)  # fractions of the image side
OBJECT_PERIOD = (0.04, 0.07)
CLUTTER_RADIUS = (0.02, 0.05)
CLUTTER_PERIOD = (0.015, 0.03)
MIN_VISIBLE_PIXELS = 30
PART_CLASS = "person"  # drawn only with --part-class
PART_HUE = 0.55  # the head's hue family (cyan); the body has none
HEAD_PERIOD = 0.025  # the head's fine texture period, a fraction of the image side
NEGATIVE_WATER = 0.5  # share of the negatives with water (the boats' context) in them


def _clutter(rng, image: np.ndarray, yy: np.ndarray, xx: np.ndarray, size: int) -> np.ndarray:
    """Fragments of the object textures (every class's but the boat's) in random colours, the
    same on labelled and background-only images."""
    kinds = [t for name, t in CLASS_TEXTURE.items() if name != "boat"]
    return paint_clutter(
        rng,
        image,
        yy,
        xx,
        kinds,
        (4, 10),
        (size * CLUTTER_RADIUS[0], size * CLUTTER_RADIUS[1]),
        (size * CLUTTER_PERIOD[0], size * CLUTTER_PERIOD[1]),
    )


def voc_index(name: str) -> int:
    return VOC_CLASSES.index(name) + 1


def _box(
    dy: np.ndarray, dx: np.ndarray, top: float, bottom: float, left: float, right: float
) -> np.ndarray:
    return (dy >= top) & (dy <= bottom) & (dx >= left) & (dx <= right)


def _stick(
    dy: np.ndarray,
    dx: np.ndarray,
    start: tuple[float, float],
    end: tuple[float, float],
    half_width: float,
) -> np.ndarray:
    """A thin segment from ``start`` to ``end`` ((dy, dx) pairs), ``half_width`` pixels either side."""
    (y0, x0), (y1, x1) = start, end
    ly, lx = y1 - y0, x1 - x0
    t = np.clip(((dy - y0) * ly + (dx - x0) * lx) / max(ly * ly + lx * lx, 1e-6), 0.0, 1.0)
    return (dy - y0 - t * ly) ** 2 + (dx - x0 - t * lx) ** 2 <= half_width**2


def _bottle(dy, dx, r):
    body = _box(dy, dx, -0.15 * r, r, -0.32 * r, 0.32 * r)
    shoulder = (dy < -0.15 * r) & (
        (dy + 0.15 * r) ** 2 / (0.25 * r) ** 2 + dx**2 / (0.32 * r) ** 2 <= 1
    )
    neck = _box(dy, dx, -r, -0.3 * r, -0.08 * r, 0.08 * r)
    return body | shoulder | neck


def _chair(dy, dx, r):
    seat = _box(dy, dx, -0.1 * r, 0.12 * r, -0.5 * r, 0.5 * r)
    back = _box(dy, dx, -r, -0.1 * r, -0.5 * r, -0.28 * r)
    legs = _box(dy, dx, 0.12 * r, r, -0.5 * r, -0.38 * r) | _box(
        dy, dx, 0.12 * r, r, 0.38 * r, 0.5 * r
    )
    return seat | back | legs


def _table(dy, dx, r):
    top = _box(dy, dx, -0.45 * r, -0.2 * r, -r, r)
    legs = _box(dy, dx, -0.2 * r, 0.55 * r, -0.9 * r, -0.78 * r) | _box(
        dy, dx, -0.2 * r, 0.55 * r, 0.78 * r, 0.9 * r
    )
    return top | legs


def _plant(dy, dx, r):
    pot = (
        (dy >= 0.35 * r)
        & (dy <= r)
        & (np.abs(dx) <= r * (0.38 - 0.12 * (dy - 0.35 * r) / (0.65 * r)))
    )
    region = pot
    for tip in ((-0.7 * r, -0.5 * r), (-r, 0.0), (-0.6 * r, 0.55 * r)):
        region = region | _stick(dy, dx, (0.35 * r, 0.0), tip, 0.06 * r)
        leaf_y, leaf_x = tip
        region = region | (
            (dy - leaf_y) ** 2 / (0.16 * r) ** 2 + (dx - leaf_x) ** 2 / (0.26 * r) ** 2 <= 1
        )
    return region


def _monitor(dy, dx, r):
    screen = _box(dy, dx, -0.8 * r, 0.25 * r, -0.75 * r, 0.75 * r)
    stand = _box(dy, dx, 0.25 * r, 0.6 * r, -0.05 * r, 0.05 * r)
    base = _box(dy, dx, 0.6 * r, 0.7 * r, -0.35 * r, 0.35 * r)
    return screen | stand | base


def person_parts(dy: np.ndarray, dx: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
    """(head, body) of an upright person: a small round head over a large torso-and-legs block."""
    head = (dy + 0.74 * r) ** 2 + dx**2 <= (0.22 * r) ** 2
    body = _box(dy, dx, -0.5 * r, r, -0.4 * r, 0.4 * r)
    return head & ~body, body


def paint_person(
    rng: np.random.Generator,
    image: np.ndarray,
    yy: np.ndarray,
    xx: np.ndarray,
    centre: tuple[float, float],
    r: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The part class: a fine, high-contrast checked head (light and near-black, in the class's
    hue family) over a plain body of one flat random colour, like the smooth background, so the
    head is the only telling part. Returns (image, head, body)."""
    cy, cx = centre
    head, body = person_parts(yy - cy, xx - cx, r)
    image = np.where(body[..., None], rng.uniform(60, 200, size=3).astype(np.float32), image)
    light, dark = tinted_colours(rng, PART_HUE, HUE_SPREAD)
    period = yy.shape[0] * HEAD_PERIOD
    pattern = texture("checks", yy - cy, xx - cx, period, rng.uniform(0, np.pi))
    image = paint_pattern(image, head, pattern, (light, dark * 0.3))
    return image, head, body


SHAPES: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "bottle": _bottle,
    "chair": _chair,
    "diningtable": _table,
    "pottedplant": _plant,
    "tvmonitor": _monitor,
}


def void_borders(mask: np.ndarray, width: int) -> np.ndarray:
    """``mask`` with 255 on a band ``width`` pixels wide across every change of label (object
    against background or another object), like VOC's outlines: a pixel is void when its
    (width+1)-square window holds two labels."""
    if width <= 0:
        return mask
    kernel = np.ones((width + 1, width + 1), np.uint8)
    labels = np.where(mask == IGNORE, 0, mask).astype(np.uint8)
    changes = cv2.dilate(labels, kernel) != cv2.erode(labels, kernel)
    out = mask.copy()
    out[changes] = IGNORE
    return out


def render_voc_sample(
    seed: int,
    split: str,
    index: int,
    size: int,
    void_width: int = 2,
    classes: tuple[str, ...] | list[str] = tuple(CLASSES),
) -> tuple[np.ndarray, np.ndarray]:
    """One image (uint8 HxWx3) and its VOC-indexed mask (uint8; 0 background, 255 void);
    ``classes`` are the classes drawn from (``CLASSES``, plus ``PART_CLASS`` for --part-class)."""
    rng = np.random.default_rng([seed, split_code(split), index])
    yy, xx = pixel_grid(size, size)
    image = smooth_background(rng, size, size)
    mask = np.zeros((size, size), np.uint8)

    names = [
        classes[int(c)]
        for c in rng.integers(0, len(classes), size=rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    ]
    water_top = None
    if "boat" in names or rng.random() < 0.1:  # a boat is always on water; water alone sometimes
        water_top = size * rng.uniform(0.5, 0.7)
        image = paint_water(rng, image, water_region(rng, yy, xx, water_top), yy, xx)
    image = _clutter(rng, image, yy, xx, size)

    for name in names:
        r = size * rng.uniform(*OBJECT_RADIUS)
        cx = rng.uniform(0.8 * r, size - 0.8 * r)
        if name == "boat":
            cy = water_top - 0.1 * r + rng.uniform(-0.04, 0.04) * size
            region = shape_mask("boat", yy, xx, cy, cx, r, 0.0)
        elif name == PART_CLASS:
            cy = rng.uniform(r, size - r)
            image, head, body = paint_person(rng, image, yy, xx, (cy, cx), r)
            mask[head | body] = voc_index(name)
            continue
        else:
            cy = rng.uniform(r, size - r)
            mirror = -1.0 if rng.random() < 0.5 else 1.0  # chairs face either way
            region = SHAPES[name](yy - cy, mirror * (xx - cx), r)
        period = size * rng.uniform(*OBJECT_PERIOD)
        pattern = texture(CLASS_TEXTURE[name], yy - cy, xx - cx, period, rng.uniform(-0.4, 0.4))
        colours = tinted_colours(rng, CLASS_HUE[name], HUE_SPREAD)
        image = paint_pattern(image, region, pattern, colours)
        if name == "boat":
            image = np.where(boat_rig(yy - cy, xx - cx, r)[..., None], colours[1], image)
        mask[region] = voc_index(name)

    void_small_classes(mask, [voc_index(n) for n in classes], MIN_VISIBLE_PIXELS)
    mask = void_borders(mask, void_width)
    image = add_noise(rng, image, sigma=8.0)
    return np.round(image).astype(np.uint8), mask


def labelled_sample(
    seed: int,
    split: str,
    index: int,
    size: int,
    void_width: int,
    classes: tuple[str, ...] | list[str] = tuple(CLASSES),
) -> tuple[np.ndarray, np.ndarray]:
    """``render_voc_sample``, redrawn deterministically until at least one class is visible."""
    return render_labelled(
        lambda key: render_voc_sample(seed, key, index, size, void_width, classes),
        split,
        len(VOC_CLASSES),
    )


def render_negative(seed: int, index: int, size: int) -> np.ndarray:
    """A background-only image (uint8 HxWx3): the smooth background, water in about half of them
    (the boats' context without a boat) and the same clutter as the labelled images."""
    rng = np.random.default_rng([seed, split_code("negatives"), index])
    yy, xx = pixel_grid(size, size)
    image = smooth_background(rng, size, size)
    if rng.random() < NEGATIVE_WATER:
        top = size * rng.uniform(0.35, 0.7)
        image = paint_water(rng, image, water_region(rng, yy, xx, top), yy, xx)
    image = _clutter(rng, image, yy, xx, size)
    return np.round(add_noise(rng, image, sigma=8.0)).astype(np.uint8)
