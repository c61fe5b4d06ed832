"""The CAM methods by name: the one list the config's choices, the pipeline and the scripts read.

cam = build_cam("gradcam", model, ["layer4"])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from wsss.cam.baselines import CAM, GradCAM, GradCAMPlusPlus
from wsss.cam.core import LayerCAM
from wsss.cam.libra import LibraCAM
from wsss.cam.liftcam import LiftCAM
from wsss.cam.relevance import RelevanceCAM


@dataclass(frozen=True)
class CamMethod:
    """A method's config name, its display title, its class, whether it takes keyword options,
    the options it needs, and whether a call accepts ``present=`` (the classes in each image)."""

    name: str
    title: str
    cls: type[LayerCAM]
    takes_options: bool = False
    required: tuple[str, ...] = ()
    help: str = ""
    takes_present: bool = False


METHODS: dict[str, CamMethod] = {
    m.name: m
    for m in (
        CamMethod(
            "relevance",
            "Relevance-CAM",
            RelevanceCAM,
            True,
            help="preset=..., and LRPConfig fields",
            takes_present=True,
        ),
        CamMethod("gradcam", "Grad-CAM", GradCAM),
        CamMethod("gradcampp", "Grad-CAM++", GradCAMPlusPlus),
        CamMethod("liftcam", "LIFT-CAM", LiftCAM),
        CamMethod("cam", "CAM", CAM),
        CamMethod(
            "libra",
            "Libra-CAM",
            LibraCAM,
            True,
            required=("library",),
            help="library=ReferenceLibrary (wsss.cam.build_library / library_for), activation=, "
            "chunk=, calibrate=",
            takes_present=True,
        ),
    )
}
CAM_METHODS: tuple[str, ...] = tuple(METHODS)


def method_title(method: str, variant: str = "") -> str:
    """A method's display name, with a variant after it ("Relevance-CAM default")."""
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {CAM_METHODS}")
    return f"{METHODS[method].title} {variant}".strip()


def build_cam(method: str, model: nn.Module, layers: list[str] | str, **options: Any) -> LayerCAM:
    """A CAM object by name: "relevance" (options: preset=..., and LRPConfig fields), "libra"
    (options: library=ReferenceLibrary (required), activation=, chunk=, calibrate=), "gradcam",
    "gradcampp", "liftcam" or "cam" (no options)."""
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {CAM_METHODS}")
    spec = METHODS[method]
    missing = [name for name in spec.required if name not in options]
    if missing:
        raise TypeError(f"CAM method {method!r} needs {', '.join(missing)}: {spec.help}")
    if options and not spec.takes_options:
        raise TypeError(f"CAM method {method!r} takes no options, got {sorted(options)}")
    return spec.cls(model, layers, **options)
