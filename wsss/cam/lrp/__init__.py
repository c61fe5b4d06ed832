"""The LRP engine, zennit-like: rules (rules.py), op rules for graph nodes by op family (ops/),
the traced model (tracing.py), graph passes before planning (canonize.py), the relevance plan and
its sweep (graph.py), and composites / presets (composites.py)."""

from wsss.cam.lrp.composites import (
    BATCHNORM_MODES,
    DEFAULT_PRESET,
    PRESETS,
    RESIDUAL_MODES,
    START_VECTORS,
    LayerInfo,
    LRPConfig,
    box_rule,
    list_presets,
    preset_config,
)
from wsss.cam.lrp.graph import RelevanceGraph
from wsss.cam.lrp.ops import (
    NodeContext,
    OpRule,
    Step,
    UnsupportedOp,
    register_handler,
    register_rule,
    unregister_rule,
)
from wsss.cam.lrp.rules import RULE_KINDS, LinearMap, Rule, as_rule, propagate, safe_inverse
from wsss.cam.lrp.tracing import INPUT_LAYER, TracedModel, trace

__all__ = [
    "BATCHNORM_MODES",
    "DEFAULT_PRESET",
    "INPUT_LAYER",
    "LRPConfig",
    "LayerInfo",
    "LinearMap",
    "NodeContext",
    "OpRule",
    "PRESETS",
    "RESIDUAL_MODES",
    "RULE_KINDS",
    "RelevanceGraph",
    "Rule",
    "START_VECTORS",
    "Step",
    "TracedModel",
    "UnsupportedOp",
    "as_rule",
    "box_rule",
    "list_presets",
    "preset_config",
    "propagate",
    "register_handler",
    "register_rule",
    "safe_inverse",
    "trace",
    "unregister_rule",
]
