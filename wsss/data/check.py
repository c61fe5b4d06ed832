"""`wsss data-check`: load every item of a split and report counts, sizes and every bad file.

Each item is loaded raw (image, labels, mask where present; no transform). A bad item does not
stop the check: its problem is recorded with the file it concerns and the check goes on, so one
run names every bad file. Problems:

- an image or mask that is missing, unreadable or truncated;
- a mask whose size differs from its image's;
- a mask value outside the class range other than 255 (void), or one ``data.mask_values`` leaves out;
- an image of another bit depth than the rest (unless ``data.intensity=minmax``);
- an image with no labels, where labels come from masks (a CSV row with an empty labels cell is a
  negative image instead: counted, not a problem).

Warnings do not fail the check: masks that hold only 0 and 255 while 255 means ignore (a binary
data set stored 0/255 whose foreground would be dropped; the fix is ``data.mask_values``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from wsss.data.base import RawSample, SegmentationSource
from wsss.data.imageio import (
    DataError,
    MaskConventionWarning,
    binary_255_message,
    holds_only_0_and_255,
)


@dataclass
class DataCheckReport:
    num_images: int = 0
    per_class: dict[str, int] = field(default_factory=dict)  # images holding each foreground class
    min_hw: Optional[tuple[int, int]] = None  # (smallest height, smallest width) over the split
    max_hw: Optional[tuple[int, int]] = None  # (largest height, largest width)
    problems: list[str] = field(default_factory=list)  # the first max_listed, each naming its file
    total_problems: int = 0
    has_masks: bool = False
    negatives: int = 0  # images without any finding (CSV rows with an empty labels cell)
    warnings: list[str] = field(default_factory=list)  # do not fail the check

    @property
    def ok(self) -> bool:
        return self.total_problems == 0


def check_source(source: SegmentationSource, max_listed: int = 20) -> DataCheckReport:
    """Load every item of ``source``; collect counts, sizes and problems instead of stopping."""
    report = DataCheckReport(
        num_images=len(source),
        per_class={name: 0 for name in source.class_names},
        has_masks=bool(source.has_masks),
    )
    labelled = bool(getattr(source, "has_labels", source.has_masks))
    heights: list[int] = []
    widths: list[int] = []
    # masks read as class indices where 255 = ignore: ones holding only 0 and 255 are suspect
    identity = source.mask_values is None and source.mask_override is None
    binary_255: Optional[list[int]] = [] if identity and source.has_masks else None
    split = getattr(source, "split", "")
    for index in tqdm(
        range(len(source)), desc=f"checking {split}".strip(), unit="img", leave=False, disable=None
    ):
        try:
            with warnings.catch_warnings():  # the report counts such masks itself
                warnings.simplefilter("ignore", MaskConventionWarning)
                raw = source.load(index)
        except DataError as exc:
            _add(report, str(exc), max_listed)
            continue
        heights.append(raw.orig_size[0])  # the files' sizes, before data.image_size resizing
        widths.append(raw.orig_size[1])
        for c in np.flatnonzero(raw.labels):
            report.per_class[source.class_names[c]] += 1
        if not np.any(raw.labels):
            if source.allows_negatives:
                report.negatives += 1
            elif labelled:
                _add(report, _no_labels(source, index, raw), max_listed)
        if binary_255 is not None and raw.mask is not None and holds_only_0_and_255(raw.mask):
            binary_255.append(index)
    if heights:
        report.min_hw = (min(heights), min(widths))
        report.max_hw = (max(heights), max(widths))
    if binary_255:
        report.warnings.append(_binary_255_warning(source, binary_255))
    return report


def _binary_255_warning(source: SegmentationSource, indices: list[int]) -> str:
    path = source.mask_path(indices[0]) if hasattr(source, "mask_path") else source.ids[indices[0]]
    return binary_255_message(
        f"{len(indices)} mask(s) hold only the values 0 and 255, e.g. {path}", source.class_names[0]
    )


def _no_labels(source: SegmentationSource, index: int, raw: RawSample) -> str:
    """The problem for an image without labels where labels come from masks (CSV sources allow
    negatives: an empty labels cell is never a problem)."""
    if raw.mask is not None:
        where = source.mask_override / f"{raw.id}.png" if source.mask_override is not None else None
        if where is None and hasattr(source, "mask_path"):
            where = source.mask_path(index)
        return (
            f"{where or raw.id}: image {raw.id} has no labels (its mask holds no foreground class)"
        )
    return f"{raw.id}: image has no labels"


def _add(report: DataCheckReport, problem: str, max_listed: int) -> None:
    report.total_problems += 1
    if len(report.problems) < max_listed:
        report.problems.append(problem)


def format_report(report: DataCheckReport, split_name: str) -> str:
    """Human-readable summary: images, size range, images per class, problems (capped, with the total)."""
    lines = [
        f"split {split_name}: {report.num_images} images"
        + ("" if report.has_masks else " (no masks)")
    ]
    if report.min_hw is not None and report.max_hw is not None:
        lines.append(
            f"  image size: {report.min_hw[1]}x{report.min_hw[0]} to "
            f"{report.max_hw[1]}x{report.max_hw[0]} (WxH)"
        )
    lines.append(
        "  images per class: "
        + ", ".join(f"{name} {count}" for name, count in report.per_class.items())
    )
    if report.negatives:
        lines.append(f"  negatives (no finding): {report.negatives}")
    lines += [f"  warning: {warning}" for warning in report.warnings]
    if report.total_problems:
        lines.append(f"  {report.total_problems} problem(s):")
        lines += [f"    {problem}" for problem in report.problems]
        if report.total_problems > len(report.problems):
            lines.append(f"    ... and {report.total_problems - len(report.problems)} more")
    else:
        lines.append("  no problems found")
    return "\n".join(lines)
