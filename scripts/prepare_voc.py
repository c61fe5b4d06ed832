"""Check a Pascal VOC 2012 + SegmentationClassAug set-up and write ``train_aug.txt``.

    python scripts/prepare_voc.py --root /data/VOCdevkit/VOC2012 [--sbd /data/benchmark_RELEASE/dataset]

It checks that ``--root`` holds JPEGImages/, SegmentationClass/, SegmentationClassAug/ and
ImageSets/Segmentation/{train,val}.txt. When ImageSets/Segmentation/train_aug.txt is missing it
writes it: (VOC train ids + SBD ids) - VOC val ids, sorted; 10,582 ids for the standard set. The
SBD ids come from SBD's train.txt / val.txt when --sbd is given, otherwise from the masks present
in SegmentationClassAug/. It exits 1, saying what is missing and where users usually get it,
when the set-up is incomplete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional

try:
    from wsss.io import write_text_atomic
except (
    ImportError
):  # run from a checkout without the package installed (wsss.io needs only the stdlib)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from wsss.io import write_text_atomic

STANDARD_TRAIN_AUG = 10582
SPLITS = Path("ImageSets") / "Segmentation"
VOC_TAR = (
    "the VOC2012 trainval archive VOCtrainval_11-May-2012.tar from the Pascal VOC site "
    "(host.robots.ox.ac.uk/pascal/VOC/voc2012/); untar it and point --root at VOCdevkit/VOC2012"
)
AUG_ZIP = (
    "SegmentationClassAug.zip, the SBD-derived train_aug masks as palette PNGs, usually shared as a "
    "download linked from the DeepLab, AffinityNet (psa) and IRN READMEs; unzip it so that "
    "VOC2012/SegmentationClassAug/<id>.png exists"
)
# required part -> where users usually get it
REQUIRED = {
    Path("JPEGImages"): VOC_TAR,
    Path("SegmentationClass"): VOC_TAR,
    SPLITS / "train.txt": VOC_TAR,
    SPLITS / "val.txt": VOC_TAR,
    Path("SegmentationClassAug"): AUG_ZIP,
}

Echo = Callable[[str], object]


def read_ids(path: Path) -> list[str]:
    """Ids of a split file: the first word of each non-empty line."""
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _aug_hint(root: Path) -> str:
    """Where a misplaced SegmentationClassAug folder sits, if it is somewhere near."""
    for candidate in (
        root / "SegmentationClassAug" / "SegmentationClassAug",
        root.parent / "SegmentationClassAug",
        root.parent.parent / "SegmentationClassAug",
    ):
        if candidate.is_dir() and any(candidate.glob("*.png")):
            return f" (found one at {candidate}: move it to {root / 'SegmentationClassAug'})"
    return ""


def missing_parts(root: Path) -> list[str]:
    """Required parts of the layout that are absent, each with where users usually get it."""
    if not root.is_dir():
        return [f"{root} does not exist; it comes with {VOC_TAR}"]
    if not (root / "JPEGImages").is_dir() and (root / "VOC2012" / "JPEGImages").is_dir():
        return [
            f"{root} looks like VOCdevkit, not VOCdevkit/VOC2012: use --root {root / 'VOC2012'}"
        ]
    problems = []
    for part, source in REQUIRED.items():
        if not (root / part).exists():
            extra = _aug_hint(root) if part.name == "SegmentationClassAug" else ""
            problems.append(f"{root / part} is missing{extra}; it comes with {source}")
        elif part.name == "SegmentationClassAug" and not any((root / part).glob("*.png")):
            problems.append(
                f"{root / part} holds no PNG masks{_aug_hint(root)}; it should hold the contents of "
                f"{AUG_ZIP}"
            )
    return problems


def sbd_ids(root: Path, sbd: Optional[Path]) -> list[str]:
    """SBD image ids: from SBD's dataset/train.txt + val.txt, else from the SegmentationClassAug PNGs."""
    if sbd is not None:
        files = [sbd / "train.txt", sbd / "val.txt"]
        if not all(f.is_file() for f in files) and (sbd / "dataset" / "train.txt").is_file():
            files = [
                sbd / "dataset" / "train.txt",
                sbd / "dataset" / "val.txt",
            ]  # given benchmark_RELEASE/
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(
                f"--sbd: {', '.join(absent)} missing; point --sbd at the dataset/ folder of "
                f"SBD (benchmark_RELEASE/dataset, from SBD's benchmark.tgz), or leave --sbd "
                f"out to take the ids from SegmentationClassAug/"
            )
        return sorted({i for f in files for i in read_ids(f)})
    return sorted(p.stem for p in (root / "SegmentationClassAug").glob("*.png"))


def build_train_aug(root: Path, sbd: Optional[Path] = None) -> list[str]:
    """(VOC train ids + SBD ids) - VOC val ids, sorted."""
    val = set(read_ids(root / SPLITS / "val.txt"))
    ids = set(read_ids(root / SPLITS / "train.txt")) | set(sbd_ids(root, sbd))
    return sorted(ids - val)


def _absent(ids: list[str], folder: Path, suffix: str) -> list[str]:
    return [i for i in ids if not (folder / f"{i}{suffix}").is_file()]


def prepare(root: Path, sbd: Optional[Path] = None, echo: Echo = print) -> int:
    """Check the layout and write train_aug.txt if it is missing; 0 when ready, 1 otherwise."""
    root = Path(root)
    sbd = Path(sbd) if sbd is not None else None
    problems = missing_parts(root)
    if problems:
        echo("VOC set-up incomplete:")
        for problem in problems:
            echo(f"  - {problem}")
        return 1
    target = root / SPLITS / "train_aug.txt"
    if target.is_file():
        ids = read_ids(target)
        echo(
            f"{target} exists: {len(ids)} ids (the standard set has {STANDARD_TRAIN_AUG:,}); left as it is"
        )
    else:
        try:
            ids = build_train_aug(root, sbd)
        except FileNotFoundError as exc:
            echo(str(exc))
            return 1
        if not ids:
            echo(
                "no train_aug ids: train.txt and the SBD ids hold nothing outside val.txt; "
                f"{target} not written"
            )
            return 1
        write_text_atomic(target, "\n".join(ids) + "\n")
        source = f"SBD lists in {sbd}" if sbd is not None else "the masks in SegmentationClassAug/"
        echo(
            f"wrote {target}: {len(ids)} ids = (train + ids from {source}) - val "
            f"(the standard set has {STANDARD_TRAIN_AUG:,})"
        )
    failed = False
    checks = [
        (ids, root / "JPEGImages", ".jpg", "train_aug", VOC_TAR),
        (ids, root / "SegmentationClassAug", ".png", "train_aug", AUG_ZIP),
        (read_ids(root / SPLITS / "val.txt"), root / "SegmentationClass", ".png", "val", VOC_TAR),
    ]
    for split_ids, folder, suffix, split, source in checks:
        absent = _absent(split_ids, folder, suffix)
        if absent:
            failed = True
            echo(
                f"{len(absent)} of {len(split_ids)} {split} id(s) have no {suffix} file in {folder}, "
                f"e.g. {', '.join(absent[:5])}; get the complete {source}"
            )
    if failed:
        return 1
    echo(f"ready: wsss run configs/voc.yaml data.root={root}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Check a Pascal VOC 2012 + SegmentationClassAug set-up and "
        "write ImageSets/Segmentation/train_aug.txt if it is missing."
    )
    parser.add_argument("--root", required=True, type=Path, help="the VOCdevkit/VOC2012 folder")
    parser.add_argument(
        "--sbd", type=Path, help="SBD's dataset/ folder (train.txt, val.txt); optional"
    )
    args = parser.parse_args(argv)
    return prepare(args.root, args.sbd)


if __name__ == "__main__":
    sys.exit(main())
