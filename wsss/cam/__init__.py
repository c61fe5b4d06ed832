"""Attribution maps for CNN and vision-transformer classifiers: Relevance-CAM and baselines (pure torch).

from wsss.cam import RelevanceCAM
with RelevanceCAM(model, layers=["layer2", "layer3", "layer4"], preset="reference") as cam:
    maps = cam(images, targets)   # {layer: (B, K, h, w)} raw maps
"""

from __future__ import annotations

from wsss.cam.baselines import CAM, GradCAM, GradCAMPlusPlus, GradientCAM
from wsss.cam.core import HookedCAM, LayerCAM
from wsss.cam.libra import LibraCAM, LibrarySettings, ReferenceLibrary, build_library, library_for
from wsss.cam.liftcam import LiftCAM
from wsss.cam.lrp import (
    INPUT_LAYER,
    LRPConfig,
    Rule,
    box_rule,
    register_handler,
    register_rule,
    unregister_rule,
)
from wsss.cam.methods import CAM_METHODS, METHODS, build_cam
from wsss.cam.postprocess import (
    NORMALIZATIONS,
    aggregate_scales,
    centred_normalize,
    fuse_layers,
    minmax_normalize,
    normalize_maps,
    relu_max_normalize,
    upsample,
)
from wsss.cam.relevance import (
    DEFAULT_PRESET,
    PRESETS,
    RelevanceCAM,
    list_presets,
    preset_config,
    start_relevance,
)
from wsss.cam.tokens import TokenLayout, to_grid, token_layout

__all__ = [
    "CAM",
    "CAM_METHODS",
    "DEFAULT_PRESET",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradientCAM",
    "HookedCAM",
    "INPUT_LAYER",
    "LayerCAM",
    "METHODS",
    "LRPConfig",
    "LibraCAM",
    "LibrarySettings",
    "LiftCAM",
    "NORMALIZATIONS",
    "PRESETS",
    "ReferenceLibrary",
    "TokenLayout",
    "RelevanceCAM",
    "Rule",
    "aggregate_scales",
    "box_rule",
    "build_cam",
    "build_library",
    "centred_normalize",
    "fuse_layers",
    "library_for",
    "list_presets",
    "minmax_normalize",
    "normalize_maps",
    "preset_config",
    "register_handler",
    "register_rule",
    "relu_max_normalize",
    "start_relevance",
    "to_grid",
    "token_layout",
    "unregister_rule",
    "upsample",
]
