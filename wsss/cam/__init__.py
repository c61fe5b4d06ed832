"""Attribution maps for CNN classifiers: Relevance-CAM and baselines (pure torch).

    from wsss.cam import RelevanceCAM
    with RelevanceCAM(model, layers=["layer2", "layer3", "layer4"], preset="reference") as cam:
        maps = cam(images, targets)   # {layer: (B, K, h, w)} raw maps
"""

from __future__ import annotations

from typing import Any

from torch import nn

from wsss.cam.baselines import CAM, METHODS, GradCAM, GradCAMPlusPlus, LiftCAM
from wsss.cam.libra import LibraCAM, LibrarySettings, ReferenceLibrary, build_library, library_for
from wsss.cam.lrp import (INPUT_LAYER, LRPConfig, Rule, box_rule, register_handler, register_rule,
                          unregister_rule)
from wsss.cam.postprocess import (NORMALIZATIONS, aggregate_scales, centred_normalize,
                                  fuse_layers, minmax_normalize, normalize_maps,
                                  relu_max_normalize, upsample)
from wsss.cam.relevance import (DEFAULT_PRESET, PRESETS, RelevanceCAM, list_presets,
                                preset_config, start_relevance)

CAM_METHODS = ("relevance", "gradcam", "gradcampp", "liftcam", "cam", "libra")


def build_cam(method: str, model: nn.Module, layers: list[str] | str, **options: Any):
    """A CAM object by name: "relevance" (options: preset=..., and LRPConfig fields),
    "libra" (options: library=ReferenceLibrary (required), activation=, chunk=, calibrate=),
    "gradcam", "gradcampp", "liftcam" or "cam" (no options)."""
    if method == "relevance":
        return RelevanceCAM(model, layers, **options)
    if method == "libra":
        if "library" not in options:
            raise TypeError("CAM method 'libra' needs library=ReferenceLibrary "
                            "(wsss.cam.build_library / library_for)")
        return LibraCAM(model, layers, **options)
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {CAM_METHODS}")
    if options:
        raise TypeError(f"CAM method {method!r} takes no options, got {sorted(options)}")
    return METHODS[method](model, layers)


__all__ = [
    "CAM", "CAM_METHODS", "DEFAULT_PRESET", "GradCAM", "GradCAMPlusPlus", "INPUT_LAYER",
    "LRPConfig", "LibraCAM", "LibrarySettings", "LiftCAM", "NORMALIZATIONS", "PRESETS",
    "ReferenceLibrary", "RelevanceCAM", "Rule", "aggregate_scales", "box_rule", "build_cam",
    "build_library", "centred_normalize", "fuse_layers", "library_for", "list_presets",
    "minmax_normalize", "normalize_maps", "preset_config", "register_handler", "register_rule",
    "relu_max_normalize", "start_relevance", "unregister_rule", "upsample",
]
