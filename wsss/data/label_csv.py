"""The label CSV of an image folder: ``image,labels`` rows, labels separated by ';' (an empty
cell = a negative image), and the class names as the union of the CSVs' labels, with labels that
differ only in case or spacing refused at their row."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from wsss.data.imageio import DataError

LABEL_SEPARATOR = ";"

CsvRows = list[tuple[int, str, list[str]]]


def read_label_csv(path: Path) -> CsvRows:
    """Rows of (CSV line number, image path, label names) from an ``image,labels`` CSV."""
    if not path.is_file():
        present = sorted(p.name for p in path.parent.glob("*.csv")) if path.parent.is_dir() else []
        raise DataError(
            f"{path}: label CSV is missing (CSVs present in {path.parent}: "
            f"{', '.join(present) or 'none'}); expected columns image,labels with labels "
            f"separated by '{LABEL_SEPARATOR}'"
        )
    try:
        with path.open(
            newline="", encoding="utf-8-sig"
        ) as handle:  # utf-8-sig: tolerate an Excel BOM
            reader = csv.reader(handle)
            header = [cell.strip().lower() for cell in next(reader, [])]
            if "image" not in header or "labels" not in header:
                raise DataError(
                    f"{path}: the first line must be a header with columns image,labels; "
                    f"found {header or 'an empty file'}"
                )
            image_col, labels_col = header.index("image"), header.index("labels")
            rows = []
            for cells in reader:
                line = reader.line_num
                if not any(cell.strip() for cell in cells):
                    continue  # blank line
                if len(cells) <= max(image_col, labels_col):
                    cells = cells + [""] * (max(image_col, labels_col) + 1 - len(cells))
                image = cells[image_col].strip()
                if not image:
                    raise DataError(f"{path}, row {line}: the image cell is empty")
                labels = [
                    name.strip()
                    for name in cells[labels_col].split(LABEL_SEPARATOR)
                    if name.strip()
                ]
                rows.append((line, image, labels))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text CSV ({exc})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from exc
    if not rows:
        raise DataError(f"{path}: the CSV has no rows below its header")
    return rows


def label_key(name: str) -> str:
    """A label up to case and spacing: 'Polyp ', 'polyp' and 'POLYP' share one key."""
    return "".join(name.casefold().split())


def class_names_from_csvs(tables: Sequence[tuple[Path, CsvRows]]) -> list[str]:
    """The union of the labels of ``tables`` (CSV path, rows), sorted. Two labels that differ only
    in case or spacing are an error at the first row of the rarer one, suggesting the other."""
    counts: dict[str, int] = {}
    first_row: dict[str, tuple[Path, int]] = {}
    for path, rows in tables:
        for line, _, labels in rows:
            for name in labels:
                counts[name] = counts.get(name, 0) + 1
                first_row.setdefault(name, (path, line))
    variants: dict[str, list[str]] = {}
    for name in counts:  # first-seen order, so ties go to the earlier spelling
        variants.setdefault(label_key(name), []).append(name)
    for names in variants.values():
        if len(names) > 1:
            keep = max(names, key=lambda name: counts[name])
            odd = next(name for name in names if name != keep)
            path, line = first_row[odd]
            where, at = first_row[keep]
            raise DataError(
                f"{path}, row {line}: label {odd!r} differs from the class {keep!r} only in case or "
                f"spacing (used {counts[keep]} time(s), first at {where.name} row {at}); write "
                f"{keep!r}, or list the classes in data.class_names"
            )
    return sorted(counts)
