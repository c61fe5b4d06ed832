"""Which LRP rule goes where: the composite (`LRPConfig`) and the named presets.

A composite picks a rule for every Conv / Linear layer on the relevance path, in this order:
1. `layer_rules`: (pattern, rule) pairs; the first pattern that matches the layer's module path
   (fnmatch, e.g. "layer1.*") or its type name (e.g. "Linear") wins;
2. `input`: the layers that read the image (no other Conv / Linear before them), z^B by default;
3. `lower`: Conv layers in the first `lower_depth` fraction of the network's Conv / Linear
   layers (in graph order), when set;
4. `conv` for convolutions, `linear` for Linear layers.
It also says how BatchNorm (identity or folded into the conv before it), residual additions
(signed / positive / abs split), the start vector and the channel weights (summed or averaged
over positions, or per position: see RelevanceCAM) are handled.

Presets are composites (docs/ALGORITHMS.md derives "reference"):
- reference: the official Relevance-CAM rules exactly;
- default: reference with the residual split by positive parts (the project's default);
- lrp: plain LRP-z⁺, one-hot start, conservative on bias-free nets;
- stable / stable_gamma / sglrp: BN folded, positive split, contrast against absent classes;
- epsilon_gamma_box: γ in the lower third, z⁺ in the middle, ε at the head, z^B at the input
  (the layered composite recommended by Montavon et al. 2019, like zennit's EpsilonGammaBox).
- attnlrp: default with the ε-rule (bias counted) on Linear layers, as AttnLRP (Achtibat et al.
  2024) treats a language model's Linear layers (one product per class and Linear, where z⁺
  needs two on signed LayerNorm outputs);
- transformer: default with per-position weights (weights="position"), the ViT backbones'
  default: the best of these on a trained DeiT-Tiny (docs/benchmarks.md §12).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any, Sequence

from torch import nn

from wsss.cam.lrp.rules import Rule, as_rule

BATCHNORM_MODES = ("identity", "fold")
RESIDUAL_MODES = ("signed", "positive", "abs")
START_VECTORS = ("lrp", "clrp", "clrp_absent", "sglrp")
WEIGHTS = ("sum", "mean", "position")


@dataclass(frozen=True)
class LayerInfo:
    """What a composite may look at to choose a layer's rule."""

    path: str  # module path, as in model.named_modules()
    module: nn.Module
    kind: str  # "conv" or "linear"
    is_input: bool  # reads the image directly (no Conv / Linear before it)
    depth: float  # position among the Conv / Linear layers on the relevance path, 0 = first


def _as_layer_rules(value: Any) -> tuple[tuple[str, Rule], ...]:
    items = value.items() if isinstance(value, dict) else value
    return tuple((str(pattern), as_rule(rule)) for pattern, rule in items)


@dataclass(frozen=True)
class LRPConfig:
    """Everything that defines one Relevance-CAM variant: the composite and the CAM options."""

    conv: Rule = field(default_factory=Rule)
    linear: Rule = field(default_factory=Rule)
    batchnorm: str = "identity"
    residual: str = "signed"
    start: str = "clrp"
    weights: str = "sum"
    input: Rule = field(default_factory=lambda: Rule("zb"))
    lower: Rule | None = None
    lower_depth: float = 1.0 / 3.0
    layer_rules: tuple[tuple[str, Rule], ...] = ()

    def __post_init__(self) -> None:
        for name in ("conv", "linear", "input"):
            object.__setattr__(self, name, as_rule(getattr(self, name)))
        if self.lower is not None:
            object.__setattr__(self, "lower", as_rule(self.lower))
        object.__setattr__(self, "layer_rules", _as_layer_rules(self.layer_rules))
        _check_choice("batchnorm", self.batchnorm, BATCHNORM_MODES)
        _check_choice("residual", self.residual, RESIDUAL_MODES)
        _check_choice("start", self.start, START_VECTORS)
        _check_choice("weights", self.weights, WEIGHTS)
        if not 0.0 <= self.lower_depth <= 1.0:
            raise ValueError(f"lower_depth must lie in [0, 1], got {self.lower_depth}")

    def updated(self, **options: Any) -> "LRPConfig":
        unknown = set(options) - set(self.__dataclass_fields__)
        if unknown:
            raise TypeError(
                f"unknown RelevanceCAM option(s) {sorted(unknown)}; "
                f"valid: {sorted(self.__dataclass_fields__)}"
            )
        return replace(self, **options)

    def rule_for(self, layer: LayerInfo) -> Rule:
        """The rule for one Conv / Linear layer (see the module docstring for the order)."""
        type_name = type(layer.module).__name__
        for pattern, rule in self.layer_rules:
            if fnmatchcase(layer.path, pattern) or pattern == type_name:
                return rule
        if layer.is_input:
            return self.input
        if self.lower is not None and layer.kind == "conv" and layer.depth < self.lower_depth:
            return self.lower
        return self.conv if layer.kind == "conv" else self.linear


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {tuple(choices)}")


def box_rule(
    mean: Sequence[float], std: Sequence[float], value_range: tuple[float, float] = (0.0, 1.0)
) -> Rule:
    """The z^B rule with the bounds of normalised images: (value_range - mean) / std per channel.

    E.g. RelevanceCAM(model, ["input"], input=box_rule(mean, std)) for pixel-level heatmaps of
    images normalised as (x - mean) / std from pixels in value_range. mean and std are in the
    units of value_range, 0-1 by default (as wsss.viz takes them); values above 1.5 with the
    default range look like 0-255 units and are refused with the fix.
    """
    if tuple(value_range) == (0.0, 1.0) and max(float(v) for v in (*mean, *std)) > 1.5:
        raise ValueError(
            f"box_rule: mean={list(mean)} / std={list(std)} look like 0-255 units, but they are "
            "taken in 0-1 units (as torchvision's Normalize and wsss.viz take them): pass "
            "mean/255 and std/255, or value_range=(0, 255)"
        )
    low = tuple((value_range[0] - m) / s for m, s in zip(mean, std))
    high = tuple((value_range[1] - m) / s for m, s in zip(mean, std))
    return Rule("zb", low=low, high=high)


PRESETS: dict[str, dict[str, Any]] = {
    # The official Relevance-CAM code, exactly: its start vector, z+ everywhere, BN as identity.
    "reference": dict(
        conv=Rule("zplus", bias=2.0),
        linear=Rule("zplus", bias=0.0),
        batchnorm="identity",
        residual="signed",
        start="clrp",
        weights="sum",
    ),
    # Plain LRP-z⁺: one-hot start, conservative everywhere on bias-free nets.
    "lrp": dict(
        conv=Rule("zplus", bias=0.0),
        linear=Rule("zplus", bias=0.0),
        batchnorm="identity",
        residual="signed",
        start="lrp",
        weights="sum",
    ),
    # Stable variants: BN folded into the conv, residual split by positive parts, contrast only
    # against absent classes, bias ignored (conservative).
    "stable": dict(
        conv=Rule("zplus", bias=0.0),
        linear=Rule("zplus", bias=0.0),
        batchnorm="fold",
        residual="positive",
        start="clrp_absent",
        weights="sum",
    ),
    "stable_gamma": dict(
        conv=Rule("gamma", gamma=0.25, bias=0.0),
        linear=Rule("zplus", bias=0.0),
        batchnorm="fold",
        residual="positive",
        start="clrp_absent",
        weights="sum",
    ),
    "sglrp": dict(
        conv=Rule("zplus", bias=0.0),
        linear=Rule("zplus", bias=0.0),
        batchnorm="fold",
        residual="positive",
        start="sglrp",
        weights="sum",
    ),
    # Layered composite: γ low, z⁺ in the middle, ε at the head, z^B at the input.
    "epsilon_gamma_box": dict(
        conv=Rule("zplus", bias=0.0),
        lower=Rule("gamma", gamma=0.25, bias=1.0),
        linear=Rule("epsilon", epsilon=1e-6, bias=1.0),
        input=Rule("zb"),
        batchnorm="fold",
        residual="positive",
        start="clrp_absent",
        weights="sum",
    ),
}
# The project's default, chosen by measurement (docs/benchmarks.md): the reference rules with
# the residual split by positive parts (same seed IoU as "reference" on the synthetic toy, and no
# negative or amplified relevance).
PRESETS["default"] = dict(PRESETS["reference"], residual="positive")
# Transformers: the default's rules with AttnLRP's ε-rule on Linear layers (bias counted, so the
# denominator is the recorded output); docs/ALGORITHMS.md gives the reasons.
PRESETS["attnlrp"] = dict(PRESETS["default"], linear=Rule("epsilon", epsilon=1e-6, bias=1.0))
# Transformers, measured best on a ViT: the default's rules with per-position weights (the map is
# the relevance itself, which keeps its sign on signed tokens; docs/ALGORITHMS.md §7.10).
PRESETS["transformer"] = dict(PRESETS["default"], weights="position")

DEFAULT_PRESET = "default"


def list_presets() -> dict[str, LRPConfig]:
    """All named presets with their full options."""
    return {name: LRPConfig(**options) for name, options in PRESETS.items()}


def preset_config(preset: str = DEFAULT_PRESET, **options: Any) -> LRPConfig:
    """The LRPConfig of a named preset, with keyword options overriding its fields."""
    if preset not in PRESETS:
        raise ValueError(
            f"unknown Relevance-CAM preset {preset!r}; choose one of {sorted(PRESETS)}"
        )
    return LRPConfig(**PRESETS[preset]).updated(**options)
