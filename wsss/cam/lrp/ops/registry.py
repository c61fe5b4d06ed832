"""The op-rule registry: which rule a graph node gets, by its target (a module type for
call_module, a function for call_function, a method name for call_method)."""

from __future__ import annotations

import types
from typing import Any

from torch import fx, nn

from wsss.cam.lrp.ops.common import plan_custom, plan_pass
from wsss.cam.lrp.ops.types import OpRule

_MODULE_RULES: dict[type, OpRule] = {}
_FUNCTION_RULES: dict[Any, OpRule] = {}
_METHOD_RULES: dict[str, OpRule] = {}
_VERSION = [0]  # bumped by every (un)registration, so cached relevance plans are rebuilt


def registry_version() -> int:
    return _VERSION[0]


def bump_version() -> None:
    """Mark every cached relevance plan as stale (the rules changed)."""
    _VERSION[0] += 1


def leaf_functions() -> tuple[Any, ...]:
    """Registered plain Python functions from outside torch (e.g. timm's pad_same): the tracer
    keeps each call as one node instead of tracing into it, so its rule applies."""
    return tuple(
        f
        for f in _FUNCTION_RULES
        if isinstance(f, types.FunctionType)
        and not (f.__module__ or "").startswith(("torch", "operator"))
    )


def registry_for(target: Any) -> dict:
    if isinstance(target, str):
        return _METHOD_RULES
    if isinstance(target, type) and issubclass(target, nn.Module):
        return _MODULE_RULES
    if callable(target):
        return _FUNCTION_RULES
    raise TypeError(f"a rule target is a module type, a function or a method name, got {target!r}")


def register_rule(target: Any, rule: Any) -> None:
    """Teach RelevanceCAM how relevance crosses an op.

    target: a module type (its instances become single nodes of the traced graph), a function
    (e.g. torch.roll; a plain Python function from outside torch also becomes a single node, so
    the tracer does not trace into it, e.g. timm's pad_same) or a Tensor method name (e.g. "roll").
    rule: one of
    - "identity": relevance passes through to the first input unchanged (e.g. an activation);
    - "gate": like "identity", and the op's output counts as a gate when it multiplies another
      signal (the gated signal then receives all relevance);
    - fn(module, input, output, relevance) -> input relevance, for a single-input op: input and
      output are the recorded (B, ...) tensors in float32, relevance is (B, K, *output.shape[1:])
      and the result must be (B, K, *input.shape[1:]); module is None for functions and methods;
    - an `OpRule` (advanced: builds the node's `Step` itself).
    """
    registry = registry_for(target)
    _VERSION[0] += 1
    if isinstance(rule, OpRule):
        registry[target] = rule
    elif rule == "identity":
        registry[target] = OpRule(plan_pass, kind="elementwise")
    elif rule == "gate":
        registry[target] = OpRule(plan_pass, gate=True, kind="elementwise")
    elif callable(rule):
        registry[target] = OpRule(lambda ctx: plan_custom(ctx, rule))
    else:
        raise TypeError(
            "rule must be 'identity', 'gate', fn(module, input, output, relevance) or an OpRule"
        )


def unregister_rule(target: Any) -> None:
    """Remove the rule registered for `target` (built-in or not)."""
    _VERSION[0] += 1
    registry_for(target).pop(target, None)


def register_handler(module_type: type, handler: Any) -> None:
    """The earlier name of `register_rule`, for module types."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError("register_handler takes a module type; use register_rule for functions")
    register_rule(module_type, handler)


def _forward_overridden(module_type: type, base: type) -> bool:
    return module_type.forward is not base.forward


def module_rule(module: nn.Module) -> OpRule | None:
    """The rule for a module: by its exact type, or by a base class whose forward it keeps."""
    kind = type(module)
    if kind in _MODULE_RULES:
        return _MODULE_RULES[kind]
    for base in kind.__mro__[1:]:
        if base in _MODULE_RULES and not _forward_overridden(kind, base):
            return _MODULE_RULES[base]
    return None


def node_rule(node: fx.Node, modules: dict[str, nn.Module]) -> OpRule | None:
    """The rule for a graph node, or None."""
    if node.op == "call_module":
        return module_rule(modules[node.target])
    if node.op == "call_function":
        return _FUNCTION_RULES.get(node.target)
    if node.op == "call_method":
        return _METHOD_RULES.get(node.target)
    return None
