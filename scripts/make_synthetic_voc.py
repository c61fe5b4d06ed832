"""Write a harder synthetic data set in the Pascal VOC layout, read through the VOC data source.

    python scripts/make_synthetic_voc.py --out DIR [--num-train 400 --num-val 100 --seed 0 --size 160]
    wsss run configs/synthetic_voc.yaml data.root=DIR/VOCdevkit/VOC2012

Six VOC classes drawn as upright textured objects in shades of a hue family per class, neighbouring
families touching (labels are VOC indices, so the other 14 classes are simply absent):
- ``boat`` always sits on water, a textured background region of its own labelled background
  (the context confound: boats and water co-occur, only the boat is the class);
- thin parts: chair and table legs, the bottle's neck, the monitor's stand, the plant's stems,
  the boat's mast;
- void borders: 255 on a band along every object boundary, as in the VOC masks;
- clutter fragments of the object textures in random colours, JPEG images, several objects that
  occlude each other.

Two options, off by default (the default set stays the same byte for byte):
- ``--part-class`` adds ``person`` (VOC index 15), a class with one telling part: a small,
  strongly textured, high-contrast head over a large plain, low-contrast body; its mask covers
  both, so maps that fire on the head alone miss most of it;
- ``--negatives N`` writes N background-only images to ``DIR/negatives/neg_<i>.jpg`` (for
  ``data.negatives``): the same backgrounds, water and clutter the classes appear on, no object.

Output under ``DIR/VOCdevkit/VOC2012``: ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png``
(palette PNGs), ``SegmentationClassAug/<id>.png`` (the train masks again, so ``train_aug`` works
too and ``scripts/prepare_voc.py`` accepts the layout) and ``ImageSets/Segmentation/{train,val,
train_aug}.txt``. Deterministic by (seed, split, index); every file is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np
from PIL import Image

try:
    import wsss  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsss.data.masks import write_label_png
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
from wsss.io import atomic_path, write_text_atomic

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


def write_negatives(
    folder: Path, count: int, seed: int, size: int, echo: Callable[[str], object] = print
) -> list[Path]:
    """``count`` background-only JPEGs ``folder/neg_<i>.jpg``; returns their paths."""
    paths = [folder / f"neg_{i:05d}.jpg" for i in range(count)]
    for index, path in enumerate(paths):
        with atomic_path(path) as tmp:
            Image.fromarray(render_negative(seed, index, size)).save(tmp, format="JPEG", quality=90)
    echo(f"negatives: {count} images in {folder}")
    return paths


def write_split(
    root: Path,
    split: str,
    count: int,
    seed: int,
    size: int,
    void_width: int,
    echo: Callable[[str], object] = print,
    classes: tuple[str, ...] | list[str] = tuple(CLASSES),
) -> list[str]:
    """Images and masks of one split; returns its ids."""
    ids = [f"{split}_{i:05d}" for i in range(count)]
    for index, sample_id in enumerate(ids):
        image, mask = labelled_sample(seed, split, index, size, void_width, classes)
        with atomic_path(root / "JPEGImages" / f"{sample_id}.jpg") as tmp:
            Image.fromarray(image).save(tmp, format="JPEG", quality=90)
        write_label_png(root / "SegmentationClass" / f"{sample_id}.png", mask)
        if split == "train":
            write_label_png(root / "SegmentationClassAug" / f"{sample_id}.png", mask)
    write_text_atomic(root / "ImageSets" / "Segmentation" / f"{split}.txt", "\n".join(ids) + "\n")
    echo(f"{split}: {count} images")
    return ids


def make_synthetic_voc(
    out: Path,
    num_train: int = 400,
    num_val: int = 100,
    seed: int = 0,
    size: int = 160,
    void_width: int = 2,
    echo: Callable[[str], object] = print,
    negatives: int = 0,
    part_class: bool = False,
) -> Path:
    """Write the data set under ``out/VOCdevkit/VOC2012`` and return that folder (``data.root``);
    ``negatives`` background-only images go to ``out/negatives``."""
    if num_train < 1 or num_val < 1:
        raise ValueError(
            f"--num-train and --num-val must be at least 1, got {num_train} and {num_val}"
        )
    if size < 32:
        raise ValueError(f"--size must be at least 32 pixels, got {size}")
    if negatives < 0:
        raise ValueError(f"--negatives must be 0 or more, got {negatives}")
    classes = tuple(CLASSES) + ((PART_CLASS,) if part_class else ())
    root = Path(out) / "VOCdevkit" / "VOC2012"
    train = write_split(root, "train", num_train, seed, size, void_width, echo, classes)
    write_split(root, "val", num_val, seed, size, void_width, echo, classes)
    write_text_atomic(
        root / "ImageSets" / "Segmentation" / "train_aug.txt", "\n".join(train) + "\n"
    )
    extra = ""
    if negatives:
        write_negatives(Path(out) / "negatives", negatives, seed, size, echo)
        extra = f" data.negatives={Path(out) / 'negatives'}"
    echo(f"ready: wsss run configs/synthetic_voc.yaml data.root={root}{extra}")
    return root


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", required=True, type=Path, help="folder to write VOCdevkit/VOC2012 into"
    )
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=160, help="image side in pixels")
    parser.add_argument(
        "--void-width", type=int, default=2, help="void band along object boundaries, pixels"
    )
    parser.add_argument(
        "--negatives", type=int, default=0, help="background-only images to write to DIR/negatives"
    )
    parser.add_argument(
        "--part-class",
        action="store_true",
        help="add person: a telling textured head over a plain body",
    )
    args = parser.parse_args(argv)
    try:
        make_synthetic_voc(
            args.out,
            args.num_train,
            args.num_val,
            args.seed,
            args.size,
            args.void_width,
            negatives=args.negatives,
            part_class=args.part_class,
        )
    except (ValueError, OSError) as exc:
        print(f"make_synthetic_voc: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
