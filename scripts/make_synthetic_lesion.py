"""Write the built-in synthetic lesion data (``data.name=synthetic_lesion``) as an image folder with
CSV labels and masks, so that the folder path is exercised on known data.

    python scripts/make_synthetic_lesion.py --out data/lesion --format png16
    wsss run configs/medical_demo.yaml data.root=data/lesion

Layout written under --out::

    train.csv, val.csv        image,labels   (labels separated by ';'; an empty cell = a negative)
    images/<id>.png|tif|dcm   one-channel 16-bit: PNG, TIFF, or DICOM (int16 stored with rescale
                              intercept 32768, so reading it exercises the rescale)
    masks/<id>.png            class indices (--masks index), or 0/255 (--masks binary255, one finding
                              only; then set data.mask_values='{0: 0, 255: 1}')

With --size-jitter 0 (the default) the images are exactly those of the built-in source with the
same --seed, --size, --negative-fraction and --findings (train: indices 0..num_train-1, val the
same for the val split). A jitter gives each image its own height and width (up to size*(1 ± j)),
for data sets of mixed sizes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

try:
    from wsss.data.masks import write_label_png
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from wsss.data.masks import write_label_png
from wsss.data.synthetic import split_code
from wsss.data.synthetic_lesion import LESION_CLASSES, render_lesion_sample
from wsss.io import atomic_path, write_text_atomic

SUFFIXES = {"png16": ".png", "tiff": ".tif", "dcm": ".dcm"}
DICOM_INTERCEPT = 32768  # stored int16 = value - 32768; the reader must add it back


def write_png16(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image.astype(np.uint16)).save(tmp, format="PNG")


def write_tiff(path: Path, image: np.ndarray) -> None:
    import tifffile

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, image.astype(np.uint16))


def write_dicom(path: Path, image: np.ndarray) -> None:
    """A single-frame MONOCHROME2 DICOM, uncompressed, int16 pixels with rescale intercept 32768."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = (
        meta.MediaStorageSOPClassUID,
        meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality = "OT"
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = DICOM_INTERCEPT, 1
    ds.PixelData = (image.astype(np.int32) - DICOM_INTERCEPT).astype("<i2").tobytes()
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


WRITERS = {"png16": write_png16, "tiff": write_tiff, "dcm": write_dicom}


def image_shape(seed: int, split: str, index: int, size: int, jitter: float) -> tuple[int, int]:
    if jitter <= 0:
        return size, size
    rng = np.random.default_rng([seed, split_code(split), index, 104729])
    low, high = max(8, round(size * (1 - jitter))), round(size * (1 + jitter))
    return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))


def write_split(
    out: Path,
    split: str,
    count: int,
    fmt: str,
    size: int,
    seed: int,
    negative_fraction: float,
    findings: int,
    masks: str,
    jitter: float,
) -> dict[str, int]:
    """Images, masks and ``<split>.csv``; returns the images per label (and 'negative')."""
    names = LESION_CLASSES[:findings]
    rows = ["image,labels"]
    counts = {name: 0 for name in [*names, "negative"]}
    for index in range(count):
        sample_id = f"lesion_{split}_{index:05d}"
        height, width = image_shape(seed, split, index, size, jitter)
        image, mask = render_lesion_sample(
            seed, split, index, height, width, negative_fraction, findings
        )
        file_name = sample_id + SUFFIXES[fmt]
        WRITERS[fmt](out / "images" / file_name, image[:, :, 0])
        present = [names[c - 1] for c in sorted(set(np.unique(mask).tolist()) - {0})]
        write_label_png(
            out / "masks" / f"{sample_id}.png",
            np.where(mask > 0, 255, 0) if masks == "binary255" else mask,
        )
        rows.append(f"{file_name},{';'.join(present)}")
        for name in present or ["negative"]:
            counts[name] += 1
    write_text_atomic(out / f"{split}.csv", "\n".join(rows) + "\n")
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write (created)")
    parser.add_argument(
        "--format", choices=sorted(WRITERS), default="png16", help="image file format"
    )
    parser.add_argument("--num-train", type=int, default=300)
    parser.add_argument("--num-val", type=int, default=60)
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument(
        "--size-jitter", type=float, default=0.0, help="each side drawn in size*(1 ± this)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--negative-fraction", type=float, default=0.3, help="share of images without a finding"
    )
    parser.add_argument(
        "--findings",
        type=int,
        choices=(1, 2),
        default=1,
        help="1 = lesion; 2 = lesion and calcification",
    )
    parser.add_argument(
        "--masks",
        choices=("index", "binary255"),
        default="index",
        help="mask values: class indices, or 0/255 (one finding; needs data.mask_values)",
    )
    args = parser.parse_args(argv)
    if args.masks == "binary255" and args.findings != 1:
        parser.error(
            "--masks binary255 stores one finding as 255; use --findings 1 or --masks index"
        )
    if not 0 <= args.size_jitter < 1:
        parser.error("--size-jitter must lie in [0, 1)")
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    (args.out / "masks").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", args.num_train), ("val", args.num_val)):
        counts = write_split(
            args.out,
            split,
            count,
            args.format,
            args.size,
            args.seed,
            args.negative_fraction,
            args.findings,
            args.masks,
            args.size_jitter,
        )
        print(f"{split}: {count} images ({', '.join(f'{k} {v}' for k, v in counts.items())})")
    hint = " data.mask_values='{0: 0, 255: 1}'" if args.masks == "binary255" else ""
    print(f"wrote {args.out}; run: wsss run configs/medical_demo.yaml data.root={args.out}{hint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
