"""Written label PNGs shown over their images: the items that ``wsss.tracking.log_mask_overlays``
logs and ``wsss.viz.mask_panel_grid`` draws, read the same way for every stage that writes
masks (evaluation's predictions, the self-training rounds' masks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from wsss.data.imageio import read_mask
from wsss.images import PIXEL_RANGE, denormalise


def mask_overlay_items(
    source, directories: dict[str, Path], indices: Sequence[int]
) -> list[dict[str, Any]]:
    """For each index of ``source``: its image (HxWx3 uint8), its id as caption, and under
    ``masks`` the label map ``<directory>/<id>.png`` of each named directory, then the ground
    truth where the source has it."""
    items = []
    for index in indices:
        raw = source.load_raw(index)
        image = denormalise(
            torch.from_numpy(raw.image.transpose(2, 0, 1).copy()), None, None, PIXEL_RANGE
        )
        masks = {
            name: read_mask(Path(folder) / f"{raw.id}.png") for name, folder in directories.items()
        }
        if raw.mask is not None:
            masks["ground_truth"] = raw.mask
        items.append({"image": image, "caption": raw.id, "masks": masks})
    return items
