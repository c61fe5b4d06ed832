"""Image-sized heatmaps in one call, for people who want the CAM engine alone:

    maps = heatmaps(model, images, targets)   # (B, K, H, W) in [0, 1], on the images' device

The maps are the pipeline's fused maps: each layer's raw map normalised (``centred`` by default,
as ``cam.normalize``), resized to the image, averaged over the layers and rescaled to a maximum
of 1 (``aggregate_scales`` then ``fuse_layers``, the functions the pseudo-mask module calls).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from wsss.cam.core import check_layer_names, targets_2d
from wsss.cam.methods import METHODS, build_cam
from wsss.cam.postprocess import aggregate_scales, fuse_layers

DEFAULT_NORMALIZATION = "centred"  # the pipeline's cam.normalize default


def heatmaps(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | int | Sequence[int],
    method: str = "relevance",
    layers: Sequence[str] | str | None = None,
    size: tuple[int, int] | None = None,
    *,
    normalize: str = DEFAULT_NORMALIZATION,
    layer_weights: Sequence[float] | None = None,
    **options: Any,
) -> Tensor:
    """(B, K, H, W) maps in [0, 1] of the `targets` classes, fused over `layers`.

    images: (B, C, H, W) as the model takes them (normalised). targets: (B,) or (B, K) class
    indices (an int or a list is taken for every image). method: a ``CAM_METHODS`` name; options
    go to it (``preset=`` for relevance, ``library=`` for libra). layers: module names as in
    ``model.named_modules()``; None takes the last top-level module giving a spatial map (e.g.
    a ResNet's ``layer4``). size: the (H, W) of the maps, the images' by default. The maps are on
    the images' device; nothing is copied to the CPU. The model is not put in eval mode here.
    """
    targets = _as_targets(targets, images)
    layers = (
        check_layer_names(layers) if layers is not None else [last_feature_layer(model, images)]
    )
    call: dict[str, Any] = {}
    if method in METHODS and METHODS[method].takes_present:
        present = torch.zeros(
            images.shape[0], _num_classes(model, images), dtype=torch.bool, device=images.device
        )
        call["present"] = present.scatter_(1, targets, True)  # the asked classes are present
    with build_cam(method, model, layers, **options) as cam:
        per_layer = aggregate_scales(
            cam, images, (1.0,), False, targets=targets, normalize=normalize, **call
        )
    out_size = tuple(size) if size is not None else tuple(images.shape[-2:])
    return fuse_layers(per_layer, out_size, layer_weights)


def _as_targets(targets: Tensor | int | Sequence[int], images: Tensor) -> Tensor:
    """(B, K) long targets on the images' device, from a tensor, an int or a list."""
    if not isinstance(targets, Tensor):
        values = [targets] if isinstance(targets, int) else list(targets)
        targets = torch.tensor(values, device=images.device).expand(images.shape[0], -1)
    return targets_2d(targets, images)


def _num_classes(model: nn.Module, images: Tensor) -> int:
    """The classifier's output count: its last Linear's, else one forward of one image."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].out_features
    with torch.no_grad():
        return int(model(images[:1]).shape[1])


def last_feature_layer(model: nn.Module, images: Tensor) -> str:
    """The name of the last top-level module (in forward order) whose output is a spatial
    (B, C, h, w) map with h * w > 1, found with one forward of one image: the feature map
    a CAM is usually read from (``layer4`` of a ResNet, ``features`` of a VGG)."""
    order: list[str] = []

    def record(name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.dim() == 4 and out.shape[-2] * out.shape[-1] > 1:
                order.append(name)

        return hook

    handles = [child.register_forward_hook(record(n)) for n, child in model.named_children()]
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise ValueError(
            "no top-level module of the model gives a (B, C, h, w) map; pass layers= "
            "(module names as in model.named_modules())"
        )
    return order[-1]
