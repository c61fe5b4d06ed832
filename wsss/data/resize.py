"""Back from the working size to each image's original size.

With ``data.image_size`` set, folder images are resized so that their long side is that size
(``wsss.data.transforms.resize_transform``) for training and CAMs. Pseudo-masks, seeds, score
maps and predictions are written at the size of the image file: each sample carries
``orig_size`` (H, W) and ``restore_size`` maps an output back to it.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

Array = TypeVar("Array", np.ndarray, torch.Tensor)


def restore_size(values: Array, orig_size: Sequence[int] | torch.Tensor) -> Array:
    """Resize the last two dimensions of ``values`` to ``orig_size`` = (H, W).

    Integer or boolean arrays are label maps: nearest label, pixel-centre aligned (the inverse of
    the mask resize, so a label map survives a round trip where its regions are larger than the
    scale step). Floating arrays are scores: bilinear, with antialiasing where a side shrinks.
    Takes and returns a numpy array or a torch tensor (on its device) of the same dtype; shapes
    (H, W), (C, H, W) or (B, C, H, W). Already the right size: returned unchanged.
    """
    height, width = (int(v) for v in orig_size)
    if tuple(values.shape[-2:]) == (height, width):
        return values
    if values.ndim not in (2, 3, 4):
        raise ValueError(
            f"restore_size: expected (H, W), (C, H, W) or (B, C, H, W), got shape {tuple(values.shape)}"
        )
    is_numpy = isinstance(values, np.ndarray)
    tensor = torch.from_numpy(np.ascontiguousarray(values)) if is_numpy else values
    dtype = tensor.dtype
    batch = tensor.reshape(-1, 1, *tensor.shape[-2:]) if tensor.ndim != 4 else tensor
    if dtype.is_floating_point:
        shrinks = height < tensor.shape[-2] or width < tensor.shape[-1]
        out = F.interpolate(
            batch.float(),
            size=(height, width),
            mode="bilinear",
            align_corners=False,
            antialias=shrinks,
        ).to(dtype)
    else:
        out = (
            F.interpolate(batch.float(), size=(height, width), mode="nearest-exact")
            .round()
            .to(dtype)
        )
    out = out.reshape(*tensor.shape[:-2], height, width)
    return out.numpy() if is_numpy else out
