"""Check a Pascal VOC 2012 + SegmentationClassAug set-up and write ``train_aug.txt``.

    python scripts/prepare_voc.py --root /data/VOCdevkit/VOC2012 [--sbd /data/benchmark_RELEASE/dataset]

train_aug = (VOC train ids + SBD ids) - VOC val ids: 10,582 images for the standard set. SBD ids
come from SBD's train.txt / val.txt when --sbd is given, otherwise from the masks present in
SegmentationClassAug. Exits 1 and says where to get what is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

STANDARD_TRAIN_AUG = 10582
WHERE = {
    "JPEGImages": "the VOC2012 trainval archive (VOCtrainval_11-May-2012.tar) from the Pascal VOC site",
    "SegmentationClass": "the VOC2012 trainval archive (VOCtrainval_11-May-2012.tar)",
    "ImageSets/Segmentation/train.txt": "the VOC2012 trainval archive",
    "ImageSets/Segmentation/val.txt": "the VOC2012 trainval archive",
    "SegmentationClassAug": ("SegmentationClassAug.zip, the SBD-derived masks as palette PNGs (linked from the "
                             "DeepLab, AffinityNet and IRN READMEs); unzip it into the VOC2012 folder"),
}


def read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def missing_parts(root: Path) -> list[str]:
    """Required parts of the layout that are absent, each with where users usually get it."""
    problems = []
    for part, source in WHERE.items():
        if not (root / part).exists():
            problems.append(f"{root / part} is missing; it comes with {source}")
    return problems


def sbd_ids(root: Path, sbd: Path | None) -> list[str]:
    if sbd is not None:
        files = [sbd / "train.txt", sbd / "val.txt"]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"--sbd: {', '.join(absent)} missing; point --sbd at SBD's dataset/ folder")
        return sorted({i for f in files for i in read_ids(f)})
    return sorted(p.stem for p in (root / "SegmentationClassAug").glob("*.png"))


def build_train_aug(root: Path, sbd: Path | None = None) -> list[str]:
    split_dir = root / "ImageSets" / "Segmentation"
    val = set(read_ids(split_dir / "val.txt"))
    ids = set(read_ids(split_dir / "train.txt")) | set(sbd_ids(root, sbd))
    return sorted(ids - val)


def prepare(root: Path, sbd: Path | None = None, echo=print) -> int:
    """Check the layout, write train_aug.txt if missing; 0 when ready, 1 otherwise."""
    problems = missing_parts(root)
    if problems:
        echo("VOC set-up incomplete:")
        for problem in problems:
            echo(f"  - {problem}")
        return 1
    target = root / "ImageSets" / "Segmentation" / "train_aug.txt"
    if target.is_file():
        ids = read_ids(target)
        echo(f"{target} exists: {len(ids)} ids (the standard set has {STANDARD_TRAIN_AUG})")
    else:
        try:
            ids = build_train_aug(root, sbd)
        except FileNotFoundError as exc:
            echo(str(exc))
            return 1
        target.write_text("\n".join(ids) + "\n")
        echo(f"wrote {target}: {len(ids)} ids (the standard set has {STANDARD_TRAIN_AUG})")
    masks = root / "SegmentationClassAug"
    absent = [i for i in ids if not (masks / f"{i}.png").is_file()]
    if absent:
        echo(f"{len(absent)} train_aug id(s) have no mask in {masks}, e.g. {absent[:5]}; "
             f"get the complete {WHERE['SegmentationClassAug']}")
        return 1
    echo(f"ready: wsss run configs/voc.yaml data.root={root}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="the VOCdevkit/VOC2012 folder")
    parser.add_argument("--sbd", type=Path, help="SBD's dataset/ folder (train.txt, val.txt), optional")
    args = parser.parse_args()
    sys.exit(prepare(args.root, args.sbd))


if __name__ == "__main__":
    main()
