"""Panel grids: tiles in rows under column titles, text on tiles, a colour legend, the
pseudo-mask stage's grid (maps per layer, seeds, masks, ground truth) and a grid of written masks
side by side (the self-training rounds'), saved atomically as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from wsss.data.masks import colorize, voc_palette
from wsss.io import atomic_path
from wsss.label_maps import IGNORE_INDEX
from wsss.viz.overlays import heatmap, mask_overlay, overlay


def panel_grid(
    rows: list[list[np.ndarray]], column_titles: Optional[list[str]] = None, gap: int = 2
) -> np.ndarray:
    """Tile rows of HxWx3 uint8 images (resized to the first tile) with optional column titles."""
    tile_h, tile_w = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    title_h = 14 if column_titles else 0
    canvas = Image.new(
        "RGB",
        (columns * (tile_w + gap) - gap, title_h + len(rows) * (tile_h + gap) - gap),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(column_titles or []):
        draw.text((c * (tile_w + gap) + 2, 1), title[: max(4, tile_w // 6)], fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            img = Image.fromarray(tile)
            if img.size != (tile_w, tile_h):
                img = img.resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(img, (c * (tile_w + gap), title_h + r * (tile_h + gap)))
    return np.asarray(canvas)


def annotate(tile: np.ndarray, text: str) -> np.ndarray:
    """The tile with ``text`` on a white box in its top-left corner (e.g. which class a heatmap
    shows)."""
    img = Image.fromarray(tile)
    draw = ImageDraw.Draw(img)
    box = draw.textbbox((1, 0), text)
    draw.rectangle((0, 0, box[2] + 1, box[3] + 1), fill=(255, 255, 255))
    draw.text((1, 0), text, fill=(0, 0, 0))
    return np.asarray(img)


def blank_like(tile: np.ndarray) -> np.ndarray:
    """A white tile of the same size."""
    return np.full_like(tile, 255)


def color_legend(
    names: Sequence[str], colors: np.ndarray, width: int, swatch: int = 10
) -> np.ndarray:
    """A white strip, ``width`` pixels wide, with one colour swatch and its name per entry,
    wrapped over as many lines as needed."""
    entries = [(name, tuple(int(c) for c in color)) for name, color in zip(names, colors)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines, line, used = [], [], 0
    for name, color in entries:
        need = swatch + 4 + int(measure.textlength(name)) + 10
        if line and used + need > width:
            lines.append(line)
            line, used = [], 0
        line.append((name, color))
        used += need
    lines.append(line)
    height = 14
    canvas = Image.new("RGB", (width, height * len(lines) + 2), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, items in enumerate(lines):
        x, y = 2, 2 + row * height
        for name, color in items:
            draw.rectangle((x, y + 1, x + swatch, y + 1 + swatch), fill=color, outline=(0, 0, 0))
            draw.text((x + swatch + 4, y), name, fill=(0, 0, 0))
            x += swatch + 4 + int(draw.textlength(name)) + 10
    return np.asarray(canvas)


def stack_rows(*images: np.ndarray, gap: int = 2) -> np.ndarray:
    """Images of any widths one below the other on white (left-aligned)."""
    width = max(image.shape[1] for image in images)
    height = sum(image.shape[0] for image in images) + gap * (len(images) - 1)
    canvas = np.full((height, width, 3), 255, np.uint8)
    y = 0
    for image in images:
        canvas[y : y + image.shape[0], : image.shape[1]] = image
        y += image.shape[0] + gap
    return canvas


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Write an RGB uint8 array as PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def pseudo_panel_grid(
    panels: list[dict[str, Any]], layers: list[str], class_names: list[str]
) -> np.ndarray:
    """One row per (sample, present class): the image, that class's map at each layer and fused
    (the class named in each heatmap), then, on the sample's first row, the seeds, the calibrated
    and (after refinement) the refined masks over the image at 50 %, the final mask and the
    ground truth; a colour legend with the class names below. ``class_names`` includes
    background."""
    refined = any(item.get("calibrated") is not None for item in panels)
    rows = []
    for item in panels:
        image = item["display"]
        truth = (
            colorize(item["mask"].numpy())
            if item["mask"] is not None
            else annotate(blank_like(image), "none")
        )
        steps = [item["seeds"]] + ([item["calibrated"]] if refined else []) + [item["pseudo"]]
        masks = [mask_overlay(image, step.numpy()) for step in steps]
        masks += [colorize(item["pseudo"].numpy()), truth]
        classes = item["classes"]
        for k, label in enumerate(classes or [None]):
            name = class_names[label] if label is not None else "no class"
            maps = (
                [item["layers"][n][k] for n in layers] + [item["fused"][k]]
                if label is not None
                else []
            )
            heat = [annotate(overlay(image, heatmap(m.numpy())), name) for m in maps] or [
                annotate(blank_like(image), name)
            ] * (len(layers) + 1)
            first = annotate(image, str(item["id"])) if k == 0 else blank_like(image)
            rows.append([first, *heat, *(masks if k == 0 else [blank_like(image)] * len(masks))])
    steps = ["seeds", "calibrated", "refined"] if refined else ["seeds", "pseudo"]
    grid = panel_grid(rows, ["image", *layers, "fused", *steps, "final mask", "ground truth"])
    return with_legend(grid, class_names)


def with_legend(grid: np.ndarray, class_names: list[str]) -> np.ndarray:
    """The grid above a colour legend of ``class_names`` (background included) and "ignore", in
    the VOC palette the masks are drawn in."""
    palette = np.asarray(voc_palette(), np.uint8).reshape(256, 3)
    colours = palette[[*range(len(class_names)), IGNORE_INDEX]]
    return stack_rows(grid, color_legend([*class_names, "ignore"], colours, grid.shape[1]))


def mask_panel_grid(items: list[dict[str, Any]], class_names: list[str]) -> np.ndarray:
    """One row per item of ``wsss.stages.mask_overlays.mask_overlay_items``: the image (its id
    on it), then each of its label maps over the image at 50 % in the items' order, the ground
    truth in plain label colours (a "none" tile where an item has none); a colour legend with
    ``class_names`` (background included) below."""
    names = [name for name in items[0]["masks"] if name != "ground_truth"]
    rows = []
    for item in items:
        image, masks = item["image"], item["masks"]
        truth = masks.get("ground_truth")
        rows.append(
            [
                annotate(image, str(item["caption"])),
                *[mask_overlay(image, masks[name]) for name in names],
                colorize(truth) if truth is not None else annotate(blank_like(image), "none"),
            ]
        )
    return with_legend(panel_grid(rows, ["image", *names, "ground truth"]), class_names)
