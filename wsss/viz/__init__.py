"""Pictures people would rather look at than read: de-normalised inputs, heatmaps and overlays
(``overlays.py``), panel grids saved as PNG (``panels.py``). Every name is importable from
``wsss.viz``."""

from wsss.images import denormalise
from wsss.viz.overlays import heatmap, mask_overlay, overlay
from wsss.viz.panels import (
    annotate,
    blank_like,
    color_legend,
    mask_panel_grid,
    panel_grid,
    pseudo_panel_grid,
    save_png,
    stack_rows,
)

__all__ = [
    "annotate",
    "blank_like",
    "color_legend",
    "denormalise",
    "heatmap",
    "mask_overlay",
    "mask_panel_grid",
    "overlay",
    "panel_grid",
    "pseudo_panel_grid",
    "save_png",
    "stack_rows",
]
