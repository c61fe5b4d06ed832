"""Display images: de-normalised inputs, heatmaps, and maps or label colours blended over an
image.

    from wsss.viz import overlay
    picture = overlay(x[0], maps[0, 0])   # torchvision-normalised (3, H, W) image + (h, w) map

mean / std are in 0-1 units everywhere in wsss.viz (``wsss.images``), as torchvision's
``Normalize`` and ``wsss.cam.box_rule`` take them.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wsss.data.masks import colorize
from wsss.images import TORCHVISION_MEAN, TORCHVISION_STD, denormalise


def heatmap(values: np.ndarray) -> np.ndarray:
    """HxW map in [0, 1] -> HxWx3 uint8 through the 'jet' colour map."""
    from matplotlib import colormaps  # heavy, and only drawing a heatmap needs it

    rgba = colormaps["jet"](np.clip(np.asarray(values, np.float32), 0.0, 1.0))
    return (rgba[..., :3] * 255).astype(np.uint8)


def overlay(
    image: Any,
    layer: Any,
    alpha: float = 0.5,
    mean: Optional[Sequence[float]] = TORCHVISION_MEAN,
    std: Optional[Sequence[float]] = TORCHVISION_STD,
) -> np.ndarray:
    """``layer`` blended over ``image`` at ``alpha``: an HxWx3 uint8 RGB picture.

    image: what a torchvision transform gives, a normalised (3, H, W) or (1, 3, H, W) float
    tensor (de-normalised with mean / std in 0-1 units, ImageNet's by default; mean=None,
    std=None for a plain ``ToTensor`` image in [0, 1]), a PIL image, or an HxW(x3) uint8 array.
    layer: a map in [0, 1] of any size, (h, w) or (1, h, w), tensor or array (resized bilinearly
    to the image and coloured by ``heatmap``), or an HxWx3 uint8 colour layer of the image's size.
    """
    base = display_image(image, mean, std)
    if not _is_colour_layer(layer):
        layer = heatmap(_resized_map(layer, base.shape[:2]))
    layer = np.asarray(layer)
    if layer.shape != base.shape:
        raise ValueError(f"overlay: layer {layer.shape} does not match the image {base.shape}")
    blended = (1.0 - alpha) * base.astype(np.float32) + alpha * layer.astype(np.float32)
    return blended.astype(np.uint8)


def display_image(
    image: Any,
    mean: Optional[Sequence[float]] = TORCHVISION_MEAN,
    std: Optional[Sequence[float]] = TORCHVISION_STD,
) -> np.ndarray:
    """An image as HxWx3 uint8 from a (normalised) float tensor, a PIL image or an array."""
    if isinstance(image, torch.Tensor):
        image = image[0] if image.dim() == 4 and image.shape[0] == 1 else image
        if image.dtype == torch.uint8:
            image = image.permute(1, 2, 0).cpu().numpy()
        else:
            return denormalise(image, mean, std)
    array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if array.dtype != np.uint8:
        array = np.clip(array.astype(np.float32) * 255.0, 0, 255).astype(np.uint8)  # 0-1 floats
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"overlay: an image must be (3, H, W), HxW or HxWx3, got {array.shape}")
    return np.ascontiguousarray(
        np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[..., :3]
    )


def _is_colour_layer(layer: Any) -> bool:
    array = layer if isinstance(layer, np.ndarray) else None
    return array is not None and array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3


def _resized_map(values: Any, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) or (1, h, w) map, bilinearly resized to `size`, as a float numpy array."""
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    tensor = tensor.detach().float().cpu()
    while tensor.dim() > 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.dim() != 2:
        raise ValueError(
            f"overlay: a heatmap must be (h, w) or (1, h, w), got {tuple(values.shape)}"
        )
    if tuple(tensor.shape) != tuple(size):
        tensor = F.interpolate(tensor[None, None], size=size, mode="bilinear", align_corners=False)[
            0, 0
        ]
    return tensor.numpy()


def mask_overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Label colours (VOC palette) blended over the image at ``alpha`` where the label is not
    background (0); background pixels show the plain image."""
    label_map = np.asarray(label_map)
    blended = overlay(image, colorize(label_map), alpha)
    return np.where((label_map != 0)[..., None], blended, image)
