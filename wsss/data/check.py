"""`wsss data-check`: load every item of a split and report counts, sizes and every bad file."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from wsss.data.base import SegmentationSource
from wsss.data.imageio import DataError


@dataclass
class DataCheckReport:
    num_images: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    min_hw: tuple[int, int] | None = None
    max_hw: tuple[int, int] | None = None
    problems: list[str] = field(default_factory=list)
    total_problems: int = 0
    has_masks: bool = False


def check_source(source: SegmentationSource, max_listed: int = 20) -> DataCheckReport:
    """Load every raw item; collect counts and problems (naming each file) instead of stopping."""
    report = DataCheckReport(num_images=len(source), per_class={n: 0 for n in source.class_names},
                             has_masks=source.has_masks)
    heights, widths = [], []
    for index in tqdm(range(len(source)), desc=f"checking {getattr(source, 'split', '')}", leave=False):
        try:
            raw = source.load_raw(index)
        except DataError as exc:
            _add(report, str(exc), max_listed)
            continue
        heights.append(raw.image.shape[0])
        widths.append(raw.image.shape[1])
        for c in np.flatnonzero(raw.labels):
            report.per_class[source.class_names[c]] += 1
        if source.has_masks and raw.labels.sum() == 0:
            where = getattr(source, "mask_path", lambda i: raw.id)(index)
            _add(report, f"{where}: image {raw.id} has no labels (no foreground class in its mask or CSV row)",
                 max_listed)
        elif not source.has_masks and raw.labels.sum() == 0 and hasattr(source, "csv_path"):
            _add(report, f"{source.csv_path}: image {raw.id} has no labels", max_listed)
    if heights:
        report.min_hw = (min(heights), min(widths))
        report.max_hw = (max(heights), max(widths))
    return report


def _add(report: DataCheckReport, problem: str, max_listed: int) -> None:
    report.total_problems += 1
    if len(report.problems) < max_listed:
        report.problems.append(problem)


def format_report(report: DataCheckReport, split: str) -> str:
    lines = [f"split {split}: {report.num_images} images"
             + ("" if report.has_masks else " (no masks)")]
    if report.min_hw:
        lines.append(f"  image size: {report.min_hw[1]}x{report.min_hw[0]} to {report.max_hw[1]}x{report.max_hw[0]} "
                     f"(WxH)")
    lines.append("  images per class: " + ", ".join(f"{n} {c}" for n, c in report.per_class.items()))
    if report.total_problems:
        lines.append(f"  {report.total_problems} problem(s):")
        lines += [f"    {p}" for p in report.problems]
        if report.total_problems > len(report.problems):
            lines.append(f"    ... and {report.total_problems - len(report.problems)} more")
    else:
        lines.append("  no problems found")
    return "\n".join(lines)
