"""Attribution maps for CNN and vision-transformer classifiers: Relevance-CAM and baselines (pure torch).

    from wsss.cam import heatmaps
    maps = heatmaps(model, images, targets)   # (B, K, H, W) in [0, 1], fused as the pipeline does

    from wsss.cam import RelevanceCAM
    with RelevanceCAM(model, layers=["layer2", "layer3", "layer4"], preset="reference") as cam:
        maps = cam(images, targets)   # {layer: (B, K, h, w)} raw maps

This package exports its public face only: the methods, ``heatmaps``, the presets and the rules.
The rest lives in the submodules (``postprocess``: normalisation and fusion; ``core``: the base
classes; ``libra``: the reference library; ``lrp``: the engine; ``methods``: the registry). The
names this package exported before stay importable from it, so older code keeps working.
"""

from __future__ import annotations

import importlib
from typing import Any

from wsss.cam.baselines import CAM, GradCAM, GradCAMPlusPlus
from wsss.cam.heatmaps import heatmaps
from wsss.cam.libra import LibraCAM, LibrarySettings, build_library
from wsss.cam.liftcam import LiftCAM
from wsss.cam.lrp import Rule, box_rule, register_rule, unregister_rule
from wsss.cam.methods import CAM_METHODS, build_cam
from wsss.cam.relevance import DEFAULT_PRESET, PRESETS, RelevanceCAM, list_presets

__all__ = [
    # methods
    "CAM",
    "CAM_METHODS",
    "GradCAM",
    "GradCAMPlusPlus",
    "LibraCAM",
    "LiftCAM",
    "RelevanceCAM",
    "build_cam",
    # one call from images to image-sized maps
    "heatmaps",
    # presets
    "DEFAULT_PRESET",
    "PRESETS",
    "list_presets",
    # rules
    "Rule",
    "box_rule",
    "register_rule",
    "unregister_rule",
    # Libra-CAM's reference library
    "LibrarySettings",
    "build_library",
]

# Names exported here before the public face was trimmed, and the submodule each lives in.
_MOVED = {
    "GradientCAM": "wsss.cam.baselines",
    "HookedCAM": "wsss.cam.core",
    "LayerCAM": "wsss.cam.core",
    "INPUT_LAYER": "wsss.cam.lrp",
    "LRPConfig": "wsss.cam.lrp",
    "register_handler": "wsss.cam.lrp",
    "METHODS": "wsss.cam.methods",
    "ReferenceLibrary": "wsss.cam.libra",
    "library_for": "wsss.cam.libra",
    "NORMALIZATIONS": "wsss.cam.postprocess",
    "aggregate_scales": "wsss.cam.postprocess",
    "centred_normalize": "wsss.cam.postprocess",
    "fuse_layers": "wsss.cam.postprocess",
    "minmax_normalize": "wsss.cam.postprocess",
    "normalize_maps": "wsss.cam.postprocess",
    "relu_max_normalize": "wsss.cam.postprocess",
    "upsample": "wsss.cam.postprocess",
    "preset_config": "wsss.cam.relevance",
    "start_relevance": "wsss.cam.relevance",
    "TokenLayout": "wsss.cam.tokens",
    "to_grid": "wsss.cam.tokens",
    "token_layout": "wsss.cam.tokens",
}


def __getattr__(name: str) -> Any:
    """The names of ``_MOVED``, from their submodules (PEP 562), so older imports still work."""
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'wsss.cam' has no attribute {name!r}")
