"""Conformance checks of a CAM method on one model: does it build, are its maps finite, is one
batched call equal to one image and class at a time, is total relevance conserved at each
captured layer, and does the model carry no hooks afterwards.

    result = check_method(model, "relevance:lrp", layers, images, targets)
    result.passed, result.reason, result.conservation   # {layer: max relative error}

Methods are named as in `wsss.cam.methods` ("gradcam", "liftcam", ...), with a preset after a
colon for Relevance-CAM ("relevance:stable"); "libra" builds a small reference library from the
images themselves. Used by scripts/cam_conformance.py (the model-zoo table) and the zoo tests.
"""

from __future__ import annotations

import copy
import gc
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as module_lib

from wsss.cam.libra import LibrarySettings, build_library
from wsss.cam.lrp.composites import PRESETS
from wsss.cam.lrp.rules import Rule
from wsss.cam.methods import build_cam
from wsss.cam.relevance import start_relevance

# The conservation check: plain LRP (one-hot start, bias ignored) with the sign-aware γ rule on
# convs and the residual split by absolute parts (|a| / (|a| + |b|): conserving, and never
# amplified). Its total must reach each captured layer unchanged, up to float32 rounding and the
# outputs where a denominator is exactly 0. Every other preset is measured and reported, not held
# to it: z⁺ drops outputs with only negative evidence (e.g. a depthwise kernel with all weights
# negative on positive inputs), the positive split drops sums whose two parts are both ≤ 0, the
# signed split conserves in exact arithmetic but amplifies where the branches cancel (RepVGG's
# 3×3 + 1×1 sums reach fractions of 1e6, and float32 then loses the total), and a bias or an ε
# in a denominator absorbs its share.
CONSERVATION_CHECK = "relevance:lrp+gamma"
CONSERVATIVE_PRESETS = ("lrp+gamma",)
CONSERVATION_TOLERANCE = 1e-3  # of Σ|R| at the logits
BATCH_TOLERANCE = 1e-3  # of the largest |map| value, float32 (float64 gives ~1e-15)
# A float32 batch failure is rerun on a float64 copy of the model: rounding (a batch of 2 and a
# batch of 1 summing in another order, amplified by cancellations or DeepLIFT's slopes) drops
# to ~1e-15 there, while anything that mixes the images of a batch stays as large.
FLOAT64_BATCH_TOLERANCE = 1e-9


@dataclass
class CheckResult:
    """What `check_method` found. reason is "" when every check passed."""

    method: str
    reason: str = ""
    conservation: dict[str, float] = field(default_factory=dict)
    batch_error: float = float("nan")
    batch_error_float64: float = float("nan")  # only measured when float32 failed the bound
    finite: bool = False
    hooks_left: int = 0

    @property
    def passed(self) -> bool:
        return not self.reason

    @property
    def batch_rounding(self) -> bool:
        """Did batched != one by one fail in float32 and hold in float64 (rounding only)?"""
        return self.batch_error > BATCH_TOLERANCE and (
            self.batch_error_float64 <= FLOAT64_BATCH_TOLERANCE
        )


def hook_count(model: nn.Module) -> int:
    """Forward / backward hooks on the model's modules and torch's global module hooks."""
    names = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
    )
    count = sum(len(getattr(m, n, {})) for m in model.modules() for n in names)
    global_names = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    return count + sum(len(getattr(module_lib, n, {})) for n in global_names)


def method_options(method: str, model: nn.Module, layers: list[str], images: Tensor) -> dict:
    """build_cam's (name, options) for a conformance method name."""
    name, _, preset = method.partition(":")
    if name == "relevance" and preset == "lrp+gamma":
        return {"preset": "lrp", "conv": Rule("gamma", gamma=0.25), "residual": "abs"}
    if name == "relevance":
        return {"preset": preset or "default"}
    if name == "libra":
        # references: other random images of the same size, none labelled with any class
        g = torch.Generator().manual_seed(1)
        refs = torch.randn(6, *images.shape[1:], generator=g).to(images)
        with torch.no_grad():
            classes = model(refs[:1]).shape[1]
        labels = torch.zeros(refs.shape[0], classes)
        settings = LibrarySettings(tuple(layers), references=3, bound=1.0)
        return {"library": build_library(model, [(refs, labels)], settings)}
    return {}


def relative_conservation(cam: Any, images: Tensor, targets: Tensor) -> dict[str, float]:
    """{layer: max over images and classes of |Σ R_layer − Σ R_logits| / Σ|R_logits|}.

    Slots whose target logit is exactly 0 (a ReLU before the last pooling, as in SqueezeNet, with
    random weights) are left out: like any output of exactly 0, the rules drop its relevance."""
    with torch.no_grad():
        logits = cam.model(images)
    start = start_relevance(logits, targets, cam.config.start)  # (B, K, C)
    total, scale = start.sum(-1), start.abs().sum(-1).clamp(min=1e-12)
    live = logits.gather(1, targets) != 0
    out = {}
    for layer, (_, r) in cam.relevance(images, targets).items():
        got = r.sum(tuple(range(2, r.dim())))
        error = ((got - total).abs() / scale).masked_fill(~live, 0.0)
        out[layer] = float(error.max())
    return out


def batch_error(cam: Any, images: Tensor, targets: Tensor, maps: dict[str, Tensor]) -> float:
    """Max |batched − one image and one class at a time| over the maps, relative to max |map|."""
    worst = 0.0
    for b in range(images.shape[0]):
        for k in range(targets.shape[1]):
            alone = cam(images[b : b + 1], targets[b, k : k + 1])
            for layer, m in maps.items():
                scale = float(m.abs().max()) or 1.0
                diff = float((m[b, k] - alone[layer][0, 0]).abs().max())
                worst = max(worst, diff / scale)
    return worst


def _expects_conservation(method: str) -> bool:
    name, _, preset = method.partition(":")
    return name == "relevance" and (preset or "default") in CONSERVATIVE_PRESETS


def check_method(
    model: nn.Module, method: str, layers: list[str], images: Tensor, targets: Tensor
) -> CheckResult:
    """Run every check of the module docstring; failures are recorded, never raised.

    Libra-CAM runs on a float64 copy: its keep rule thresholds differences of scores, and on
    random weights float32 rounding (a batch of 2 against a batch of 1) flips borderline calls.
    A float32 run over the batch bound is rerun on a float64 copy (`float64_batch_error`): it
    passes when the difference was rounding, and fails with both numbers otherwise.
    """
    result = CheckResult(method)
    if method == "libra":
        model, images = copy.deepcopy(model).double(), images.double()
    hooks_before = hook_count(model)
    try:
        options = method_options(method, model, layers, images)
        with build_cam(method.partition(":")[0], model, layers, **options) as cam:
            maps = cam(images, targets)
            result.finite = all(bool(torch.isfinite(m).all()) for m in maps.values())
            result.batch_error = batch_error(cam, images, targets, maps)
            if method.startswith("relevance"):
                result.conservation = relative_conservation(cam, images, targets)
        if result.batch_error > BATCH_TOLERANCE and images.dtype != torch.float64:
            result.batch_error_float64 = float64_batch_error(model, method, layers, images, targets)
    except Exception as exc:  # a conformance table records every failure with its reason
        result.reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    result.hooks_left = hook_count(model) - hooks_before
    if not result.reason:
        result.reason = _verdict(result, method)
    return result


def float64_batch_error(
    model: nn.Module, method: str, layers: list[str], images: Tensor, targets: Tensor
) -> float:
    """`batch_error` of the method on a float64 copy of the model and images."""
    model, images = copy.deepcopy(model).double(), images.double()
    options = method_options(method, model, layers, images)
    with build_cam(method.partition(":")[0], model, layers, **options) as cam:
        return batch_error(cam, images, targets, cam(images, targets))


def _verdict(result: CheckResult, method: str) -> str:
    if not result.finite:
        return "non-finite maps"
    if not (result.batch_error <= BATCH_TOLERANCE or result.batch_rounding):
        if not math.isnan(result.batch_error_float64):  # the float64 rerun was made
            return (
                f"batched != one by one (rel. {result.batch_error:.1e} in float32, "
                f"{result.batch_error_float64:.1e} in float64)"
            )
        return f"batched != one by one (rel. {result.batch_error:.1e})"
    if result.hooks_left:
        return f"{result.hooks_left} hooks left after exit"
    if _expects_conservation(method):
        worst = max(result.conservation.values(), default=0.0)
        if not worst <= CONSERVATION_TOLERANCE:
            layer = max(result.conservation, key=result.conservation.get)
            return f"relevance not conserved at {layer} (rel. {worst:.1e})"
    return ""


def released(model_factory: Any, method: str, layers: list[str], images: Tensor) -> bool:
    """Is a model built by `model_factory()` freed once its CAM object is closed and the last
    outside reference dropped (no cache or hook keeps it alive)?"""
    model = model_factory()
    ref = weakref.ref(model)
    targets = torch.zeros(images.shape[0], 1, dtype=torch.long)
    options = method_options(method, model, layers, images)
    with build_cam(method.partition(":")[0], model, layers, **options) as cam:
        cam(images, targets)
    del cam, model, options
    gc.collect()
    return ref() is None


ALL_METHODS = (
    (CONSERVATION_CHECK,)
    + tuple(f"relevance:{p}" for p in PRESETS)
    + ("gradcam", "gradcampp", "liftcam", "libra")
)
__all__ = [
    "ALL_METHODS",
    "CONSERVATION_CHECK",
    "CONSERVATIVE_PRESETS",
    "FLOAT64_BATCH_TOLERANCE",
    "CheckResult",
    "batch_error",
    "check_method",
    "float64_batch_error",
    "hook_count",
    "method_options",
    "relative_conservation",
    "released",
]
