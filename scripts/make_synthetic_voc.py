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

from PIL import Image

try:
    import wsss  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsss.data.masks import write_label_png
from wsss.data.synthetic_voc import CLASSES, PART_CLASS, labelled_sample, render_negative
from wsss.io import atomic_path, write_text_atomic


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
