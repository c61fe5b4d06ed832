"""The model as a traced graph (torch.fx), and running its nodes one by one.

`trace(model)` traces the forward like torchvision's feature extraction does: modules that
have an op rule (Conv2d, BatchNorm2d, ReLU, ...) and other torch.nn built-ins stay single
nodes, everything else (ResNet blocks, DenseNet layers, squeeze-excitation, ...) is traced
through into the functions it calls. Layers are named by module path as in
`model.named_modules()`; a module's output is the value its forward returned. The special
name "input" is the image itself.
"""

from __future__ import annotations

import inspect
import math
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torchvision
from torch import fx, nn

from wsss.cam.lrp.ops import leaf_functions, module_rule, register_optional_rules

INPUT_LAYER = "input"

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


class PathTracer(fx.Tracer):
    """fx tracer that keeps rule-carrying modules as leaves and records each module's output."""

    def __init__(self) -> None:
        super().__init__(
            autowrap_modules=(math, torchvision.ops), autowrap_functions=leaf_functions()
        )
        self.module_outputs: dict[str, list[Any]] = {}
        self.failed_in: nn.Module | None = None  # the innermost one when tracing failed

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_rule(m) is not None:
            return True
        if isinstance(m, _CONTAINERS):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict
    ) -> Any:
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module: its call fails first
                self.failed_in = m
            raise
        path = self.path_of_module(m)
        self.module_outputs.setdefault(path, []).append(
            out.node if isinstance(out, fx.Proxy) else None
        )
        return out


@dataclass
class TracedModel:
    """A model's traced graph with its module outputs by path.

    The root module is held weakly (`model`), so a cache of plans does not keep it alive;
    `modules` holds every submodule by path, the root under "".
    """

    root: weakref.ref
    root_type: type
    graph: fx.Graph
    modules: dict[str, nn.Module]
    module_outputs: dict[str, list[fx.Node | None]]
    placeholder: fx.Node
    logits: fx.Node

    @property
    def model(self) -> nn.Module:
        model = self.root()
        if model is None:
            raise RuntimeError("the traced model no longer exists")
        return model

    def owner(self, node: fx.Node) -> tuple[str, type]:
        """(module path, module type) of the innermost module the node was made in."""
        if node.op == "call_module":
            return node.target, type(self.modules[node.target])
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return "", self.root_type
        key, (_, kind) = list(stack.items())[-1]
        return re.sub(r"@\d+$", "", key), kind

    def layer_node(self, layer: str) -> fx.Node:
        """The node whose value is the output of module `layer` ("input": the image)."""
        if layer == INPUT_LAYER and layer not in self.modules:
            return self.placeholder
        if layer == "" or layer not in self.modules:
            sample = [n for n in self.modules if n][:12]
            raise ValueError(
                f"model has no module named {layer!r}; names look like {sample} "
                f"(or {INPUT_LAYER!r} for the image)"
            )
        outputs = self.module_outputs.get(layer, [])
        if len(outputs) != 1 or outputs[0] is None:
            why = (
                "the module is never called in the forward"
                if not outputs
                else "the module is called several times in the forward (e.g. a shared ReLU)"
                if len(outputs) > 1
                else "its output is not a single tensor (e.g. a list of branch maps)"
            )
            raise ValueError(
                f"cannot capture relevance at {layer!r}: {why}; "
                "request its parent or a neighbouring module"
            )
        return outputs[0]


def optional_arguments(model: nn.Module) -> dict[str, Any]:
    """The forward's arguments after the first that have defaults (e.g. timm's attn_mask=None,
    is_causal=False), at those defaults: the model is traced as a function of the image alone."""
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in parameters[1:]
        if p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def trace(model: nn.Module) -> TracedModel:
    """Trace the model's forward in eval mode (see the module docstring), its optional
    arguments held at their defaults."""
    register_optional_rules()
    modes = {m: m.training for m in model.modules()}
    tracer = PathTracer()
    try:
        model.eval()
        graph = tracer.trace(model, concrete_args=optional_arguments(model) or None)
    except Exception as exc:
        raise RuntimeError(untraceable_message(model, tracer, exc)) from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    # arguments held at their defaults stay placeholders (with those defaults), after the image
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs = len(placeholders) - len(optional_arguments(model))
    if inputs != 1:
        raise ValueError(f"RelevanceCAM needs a model with one input, got {inputs}")
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0]
    if not isinstance(logits, fx.Node):
        raise ValueError(
            "RelevanceCAM needs a model that returns one logits tensor, got "
            f"{type(logits).__name__}"
        )
    modules = {name: m for name, m in model.named_modules() if name}
    return TracedModel(
        weakref.ref(model),
        type(model),
        graph,
        modules,
        tracer.module_outputs,
        placeholders[0],
        logits,
    )


def untraceable_message(model: nn.Module, tracer: PathTracer, exc: Exception) -> str:
    """One line: which module torch.fx could not trace through, why, and what to do."""
    where = ""
    failed = tracer.failed_in
    if failed is not None and failed is not model:
        path = next((n for n, m in model.named_modules() if m is failed), "?")
        kind = type(failed)
        where = f" in module '{path}' ({kind.__module__}.{kind.__qualname__})"
        fix = (
            f"make it one node with a rule of its own: wsss.cam.register_rule({kind.__name__}, "
            "rule), or wrap it in a module that has one"
        )
    else:
        fix = "make the offending module one node with wsss.cam.register_rule(ModuleType, rule)"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return (
        f"RelevanceCAM could not trace {type(model).__name__} with torch.fx{where} "
        f"({type(exc).__name__}: {reason}): its forward branches on tensor values or sizes; {fix}."
    )


def mutated_argument(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The argument an in-place op overwrites, if any."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if node.op == "call_module":
        inplace = bool(getattr(modules[node.target], "inplace", False))
    else:
        inplace = (
            bool(node.kwargs.get("inplace", False))
            or (name.endswith("_") and not name.endswith("__"))
            or (
                node.op == "call_function"
                and name.startswith("i")
                and name[1:] in ("add", "sub", "mul", "truediv")
            )
        )
    return node.args[0] if inplace else None


def evaluate_node(node: fx.Node, env: dict[fx.Node, Any], traced: TracedModel) -> Any:
    """Run one graph node on the values in `env` (as fx's Interpreter does). An in-place op
    gets a copy of the value it would overwrite, so `env` is never changed."""
    mutated = mutated_argument(node, traced.modules)
    if mutated is not None:
        env = {**env, mutated: env[mutated].clone()}
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    if node.op == "call_module":
        return traced.modules[node.target](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_value, *rest = args
        return getattr(self_value, node.target)(*rest, **kwargs)
    if node.op == "get_attr":
        value: Any = traced.model
        for name in node.target.split("."):
            value = getattr(value, name)
        return value
    raise ValueError(f"cannot evaluate graph node {node.name!r} ({node.op})")


def head_after(traced: TracedModel, layer: str) -> tuple[fx.Node, list[fx.Node]]:
    """The layer's node and the nodes that compute the logits from it (the head y = F(A)), in
    graph order. Every head node reads only head values, the layer's value or constants."""
    start = traced.layer_node(layer)
    nodes = list(traced.graph.nodes)
    downstream = {start}
    head = []
    for n in nodes[nodes.index(start) + 1 :]:
        if any(i in downstream for i in n.all_input_nodes):
            downstream.add(n)
            head.append(n)
    needed = {traced.logits}
    for n in reversed(head):
        if n in needed:
            needed.update(n.all_input_nodes)
    head = [n for n in head if n in needed]
    if traced.logits not in head:
        raise ValueError(f"the logits do not depend on {layer!r}")
    derived: dict[fx.Node, bool] = {}
    for n in nodes:
        derived[n] = n.op == "placeholder" or (
            n.op != "get_attr" and any(derived[i] for i in n.all_input_nodes)
        )
    inside = set(head) | {start}
    for n in head:
        outside = [i.name for i in n.all_input_nodes if i not in inside and derived[i]]
        if outside:
            raise ValueError(
                f"the head after {layer!r} also reads {outside} (computed before it), "
                "so the logits are not a function of that layer alone"
            )
    return start, head
