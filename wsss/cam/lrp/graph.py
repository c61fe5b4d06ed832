"""The model as a traced graph (torch.fx), and relevance flowing back through its nodes.

`trace(model)` traces the forward like torchvision's feature extraction does: modules that
have an op rule (Conv2d, BatchNorm2d, ReLU, ...) and other torch.nn built-ins stay single
nodes, everything else (ResNet blocks, DenseNet layers, squeeze-excitation, ...) is traced
through into the functions it calls. Layers are named by module path as in
`model.named_modules()`; a module's output is the value its forward returned. The special
name "input" is the image itself.

`RelevanceGraph` is built once per (model, layers, composite):
- it walks the graph backwards from the logits, asking each node's op rule (ops.py) for its
  `Step`, down to the lowest requested layer; an op without a rule fails here, at
  construction, with the node, its op, its module and how to register a rule;
- it makes a recording copy of the forward (a GraphModule) that also returns the values the
  steps read, and nothing below the lowest requested layer. Values that an in-place op would
  overwrite later are cloned just before it;
- `sweep` runs the steps in reverse topological order; relevance reaching a node from several
  users (fan-out) is summed.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torchvision
from torch import Tensor, fx, nn

from wsss.cam.lrp.composites import LayerInfo, LRPConfig
from wsss.cam.lrp import ops
from wsss.cam.lrp.ops import (BATCHNORMS, CONVS, FUNCTIONAL_LAYERS, NodeContext, OpRule, Part,
                              Shape, Step, UnsupportedOp, module_rule, node_rule)
from wsss.cam.lrp.rules import compute_dtype

INPUT_LAYER = "input"

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_MULTI_OUTPUT = {torch.chunk, torch.split, "chunk", "split"}
_SHAPE_ONLY = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "expand", "expand_as",
               "contiguous", torch.flatten, torch.reshape, torch.unsqueeze, torch.squeeze}


class _PathTracer(fx.Tracer):
    """fx tracer that keeps rule-carrying modules as leaves and records each module's output."""

    def __init__(self) -> None:
        super().__init__(autowrap_modules=(math, torchvision.ops))
        self.module_outputs: dict[str, list[Any]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_rule(m) is not None:
            return True
        if isinstance(m, _CONTAINERS):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict
                    ) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        path = self.path_of_module(m)
        self.module_outputs.setdefault(path, []).append(
            out.node if isinstance(out, fx.Proxy) else None)
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
            raise ValueError(f"model has no module named {layer!r}; names look like {sample} "
                             f"(or {INPUT_LAYER!r} for the image)")
        outputs = self.module_outputs.get(layer, [])
        if len(outputs) != 1 or outputs[0] is None:
            why = ("never called in the forward" if not outputs else
                   "called several times in the forward (e.g. a shared ReLU)" if len(outputs) > 1
                   else "its output is not a single tensor")
            raise ValueError(f"cannot capture relevance at {layer!r}: the module is {why}; "
                             "request its parent or a neighbouring module")
        return outputs[0]


def trace(model: nn.Module) -> TracedModel:
    """Trace the model's forward in eval mode (see the module docstring)."""
    modes = {m: m.training for m in model.modules()}
    tracer = _PathTracer()
    try:
        model.eval()
        graph = tracer.trace(model)
    except Exception as exc:
        raise RuntimeError(
            f"RelevanceCAM could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
            f"{exc}). The forward must not branch on tensor values; a module that does can be made "
            "a single node with wsss.cam.register_rule(ModuleType, rule).") from exc
    finally:
        for m, mode in modes.items():
            m.training = mode
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"RelevanceCAM needs a model with one input, got {len(placeholders)}")
    output = next(n for n in graph.nodes if n.op == "output")
    logits = output.args[0]
    if not isinstance(logits, fx.Node):
        raise ValueError("RelevanceCAM needs a model that returns one logits tensor, got "
                         f"{type(logits).__name__}")
    modules = {name: m for name, m in model.named_modules() if name}
    return TracedModel(weakref.ref(model), type(model), graph, modules, tracer.module_outputs,
                       placeholders[0], logits)


def _target_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        kind = type(modules[node.target])
        return f"{kind.__module__}.{kind.__qualname__}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    return f"{getattr(target, '__module__', None) or ''}.{getattr(target, '__name__', target)}"


def _mutated(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The argument an in-place op overwrites, if any."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if node.op == "call_module":
        inplace = bool(getattr(modules[node.target], "inplace", False))
    else:
        inplace = bool(node.kwargs.get("inplace", False)) or (
            name.endswith("_") and not name.endswith("__")) or (
            node.op == "call_function" and name.startswith("i") and name[1:] in (
                "add", "sub", "mul", "truediv"))
    return node.args[0] if inplace else None


def _shape(value: Any) -> tuple[int, ...]:
    """A recorded value's shape (inserted into the recording graph)."""
    return tuple(value.shape)


class RelevanceGraph:
    """The relevance plan of one model for a set of layers and a composite (see module doc)."""

    def __init__(self, model: nn.Module, layers: list[str], config: LRPConfig):
        self.traced = t = trace(model)
        self.config = config
        self.layers = list(layers)
        self.captures = {layer: t.layer_node(layer) for layer in self.layers}
        nodes = list(t.graph.nodes)
        self._derived = self._depends_on_input(nodes)
        capture_set = set(self.captures.values())
        below: dict[fx.Node, bool] = {}
        for n in nodes:
            below[n] = any(i in capture_set or below[i] for i in n.all_input_nodes)
        self._folds = self._batchnorm_folds(nodes) if config.batchnorm == "fold" else {}
        self._layer_infos = self._linear_layers(nodes)

        self.steps: dict[fx.Node, Step] = {}
        reached = {t.logits}
        for n in reversed(nodes):
            if n not in reached or not below[n]:
                continue
            step = self._plan(n)
            self.steps[n] = step
            reached.update(s for s in step.sources if isinstance(s, fx.Node))
        for layer, node in self.captures.items():
            if node not in reached:
                raise ValueError(f"no relevance reaches {layer!r}: it is not on a path from the "
                                 "input to the logits that relevance follows (e.g. inside a "
                                 "squeeze-excitation gate, which is held constant)")
        self._useful = set(self.steps) | capture_set
        self.order = [n for n in reversed(nodes) if n in self._useful]
        self._build_recorder(nodes)

    # ---------------------------------------------------------------------------- planning

    def _depends_on_input(self, nodes: list[fx.Node]) -> dict[fx.Node, bool]:
        derived: dict[fx.Node, bool] = {}
        for n in nodes:
            derived[n] = n.op == "placeholder" or (
                n.op != "get_attr" and any(derived[i] for i in n.all_input_nodes))
        return derived

    def is_signal(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and self._derived.get(value, False)

    def is_gate(self, value: Any) -> bool:
        """Was this value produced by a gate op (possibly reshaped afterwards)?"""
        while isinstance(value, fx.Node):
            rule = node_rule(value, self.traced.modules) if value.op.startswith("call") else None
            if rule is not None and rule.gate:
                return True
            if value.target not in _SHAPE_ONLY or not value.args:
                return False
            value = value.args[0]
        return False

    def is_multi_output(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and value.op in ("call_function", "call_method") and \
            value.target in _MULTI_OUTPUT

    def _batchnorm_folds(self, nodes: list[fx.Node]) -> dict[fx.Node, tuple[nn.Module, fx.Node]]:
        """conv -> (BatchNorm, its node) for every conv whose only user is a BatchNorm."""
        folds = {}
        modules = self.traced.modules
        for n in nodes:
            if n.op != "call_module" or not isinstance(modules[n.target], CONVS):
                continue
            users = list(n.users)
            if len(users) == 1 and users[0].op == "call_module" and \
                    isinstance(modules[users[0].target], BATCHNORMS) and users[0].args[0] is n:
                folds[n] = (modules[users[0].target], users[0])
        return folds

    def _linear_layers(self, nodes: list[fx.Node]) -> dict[fx.Node, LayerInfo]:
        """Conv / Linear nodes (modules, or F.linear / F.conv*d inside a module) with their
        position and whether they read the image."""
        t = self.traced
        linear = [n for n in nodes if (n.op == "call_module" and isinstance(
            t.modules[n.target], CONVS + (nn.Linear,))) or (
            n.op == "call_function" and n.target in FUNCTIONAL_LAYERS)]
        reads_image: dict[fx.Node, bool] = {}
        for n in nodes:
            reads_image[n] = n.op == "placeholder" or (
                n not in linear and any(reads_image[i] for i in n.all_input_nodes))
        infos = {}
        for i, n in enumerate(linear):
            path, _ = t.owner(n)
            module = t.modules[path] if path in t.modules else t.model
            is_conv = isinstance(module, CONVS) or n.target in FUNCTIONAL_LAYERS[1:]
            infos[n] = LayerInfo(path, module, "conv" if is_conv else "linear",
                                 any(reads_image[a] for a in n.all_input_nodes if self._derived[a]),
                                 i / max(1, len(linear)))
        return infos

    def _plan(self, node: fx.Node) -> Step:
        t = self.traced
        rule: OpRule | None = node_rule(node, t.modules) if node.op.startswith("call") else None
        if rule is None:
            raise self._unsupported(node, None)
        path, _ = t.owner(node)
        info = self._layer_infos.get(node)
        fold = self._folds.get(node)
        ctx = NodeContext(node, t.modules.get(node.target) if node.op == "call_module" else None,
                          path, self.config, self.is_signal, self.is_gate, self.is_multi_output,
                          layer_rule=self.config.rule_for(info) if info is not None else None,
                          fold=fold[0] if fold else None, fold_node=fold[1] if fold else None)
        try:
            return rule.plan(ctx)
        except UnsupportedOp as exc:
            raise self._unsupported(node, str(exc)) from None

    def _unsupported(self, node: fx.Node, reason: str | None) -> NotImplementedError:
        t = self.traced
        path, kind = t.owner(node)
        kind_name = f"{kind.__module__}.{kind.__qualname__}"
        if node.op == "call_module":
            key = type(t.modules[node.target]).__qualname__
        elif node.op == "call_method":
            key = repr(node.target)
        else:
            key = _target_name(node, t.modules).lstrip(".")
        problem = f": {reason}" if reason else " (no rule is registered for this op)"
        return NotImplementedError(
            f"RelevanceCAM has no LRP rule for graph node {node.name!r} ({node.op} "
            f"{_target_name(node, t.modules)}) in module '{path}' of type {kind_name}{problem}. "
            "It lies between the logits and a requested layer. Request only layers above it, or "
            f"register a rule: wsss.cam.register_rule({key}, rule), or register_handler("
            f"{kind.__qualname__}, rule) to make the whole module one node; rule is 'identity', "
            "'gate' or fn(module, input, output, relevance) -> input relevance.")

    # ---------------------------------------------------------------------------- recording

    def _build_recorder(self, nodes: list[fx.Node]) -> None:
        """A copy of the forward that also returns every value the steps and captures read."""
        keys: list[Any] = []
        for layer_node in self.captures.values():
            if layer_node not in keys:
                keys.append(layer_node)
        for step in self.steps.values():
            for key in step.reads:
                if key not in keys:
                    keys.append(key)
        self.read_keys = keys
        modules = self.traced.modules
        first_mutation: dict[fx.Node, fx.Node] = {}
        for n in nodes:
            target = _mutated(n, modules)
            if target is not None and target not in first_mutation:
                first_mutation[target] = n
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        output = graph.graph_copy(self.traced.graph, env)
        records = []
        for key in keys:
            source = key.node if isinstance(key, Shape) else key
            value = env[source]
            if isinstance(key, Shape):
                with graph.inserting_after(value):
                    value = graph.call_function(_shape, (value,))
            elif source in first_mutation:
                with graph.inserting_before(env[first_mutation[source]]):
                    value = graph.call_method("clone", (value,))
            records.append(value)
        graph.output((output, *records))
        self.recorder = fx.GraphModule(self.traced.model, graph)
        # each recorded value is released after the last step that reads it
        self._last_reader: dict[int, fx.Node] = {}
        for n in self.order:
            for key in self.steps[n].reads if n in self.steps else ():
                self._last_reader[keys.index(key)] = n

    def forward(self, images: Tensor) -> tuple[Tensor, list[Any]]:
        """One forward pass: the logits and the recorded values (in `read_keys` order)."""
        with torch.no_grad():
            logits, *values = self.recorder(images)
        return logits, values

    def activation(self, values: list[Any], layer: str) -> Tensor:
        return values[self.read_keys.index(self.captures[layer])]

    # ---------------------------------------------------------------------------- the sweep

    def sweep(self, start: Tensor, values: list[Any]) -> dict[str, Tensor]:
        """Relevance (B*K, ...) at every requested layer, from `start` (B*K, C) at the logits.

        `values` (from `forward`) is consumed: it is emptied, and each recorded value is
        released after the last step that reads it, so memory shrinks as the sweep goes down.
        """
        index = {key: i for i, key in enumerate(self.read_keys)}
        wanted: dict[fx.Node, list[str]] = {}
        for layer, node in self.captures.items():  # two names can share a node (a 1-block stage)
            wanted.setdefault(node, []).append(layer)
        captured: dict[fx.Node, Any] = {}
        store = dict(enumerate(values))
        values.clear()
        relevance: dict[fx.Node, Any] = {self.traced.logits: start}
        dtype = compute_dtype(start)
        for node in self.order:
            r = relevance.pop(node, None)
            if r is None:
                continue
            if node in wanted:
                captured[node] = r
                if len(captured) == len(wanted):
                    break
            step = self.steps.get(node)
            if step is None:
                continue
            reads = [store[index[key]] for key in step.reads]
            outputs = step.backward(r, reads)
            for i in [index[key] for key in step.reads]:
                if self._last_reader.get(i) is node and self.read_keys[i] not in wanted:
                    store.pop(i, None)
            for source, out in zip(step.sources, outputs):
                if out is None or source not in self._useful:
                    continue
                _accumulate(relevance, source, out)
        missing = [layers for node, layers in wanted.items() if node not in captured]
        if missing:
            raise RuntimeError(f"no relevance reached {missing}")
        return {layer: (r if r.dtype == dtype else r.to(dtype))
                for node, r in captured.items() for layer in wanted[node]}


def _accumulate(relevance: dict[fx.Node, Any], node: fx.Node, out: Any) -> None:
    """Add relevance arriving at `node` from one of its users (fan-out sums)."""
    if isinstance(out, Part):
        parts = relevance.setdefault(node, {})
        parts[out.index] = parts[out.index] + out.relevance if out.index in parts else out.relevance
    elif node in relevance:
        relevance[node] = relevance[node] + out
    else:
        relevance[node] = out


def evaluate_node(node: fx.Node, env: dict[fx.Node, Any], traced: TracedModel) -> Any:
    """Run one graph node on the values in `env` (as fx's Interpreter does). An in-place op
    gets a copy of the value it would overwrite, so `env` is never changed."""
    mutated = _mutated(node, traced.modules)
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
    for n in nodes[nodes.index(start) + 1:]:
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
            n.op != "get_attr" and any(derived[i] for i in n.all_input_nodes))
    inside = set(head) | {start}
    for n in head:
        outside = [i.name for i in n.all_input_nodes if i not in inside and derived[i]]
        if outside:
            raise ValueError(f"the head after {layer!r} also reads {outside} (computed before it), "
                             "so the logits are not a function of that layer alone")
    return start, head


# Plans by model, then by (layers, composite, rule registry version). A plan reads weights at
# every call, so it stays valid while the model trains; it is rebuilt when a module is added,
# removed or replaced, when a tensor is (as .to(device) replaces buffers, which the recording
# graph may hold), or when an op rule is registered. Plans hold the model's submodules but not
# the model itself, so an entry goes away with its model.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict]]" = weakref.WeakKeyDictionary()


def relevance_graph(model: nn.Module, layers: list[str], config: LRPConfig) -> RelevanceGraph:
    """The model's RelevanceGraph for these layers and composite, built once and reused."""
    structure = (tuple((name, id(m)) for name, m in model.named_modules()),
                 tuple(id(t) for t in model.parameters()), tuple(id(t) for t in model.buffers()))
    entry = _PLANS.get(model)
    if entry is None or entry[0] != structure:
        entry = _PLANS[model] = (structure, {})
    key = (tuple(layers), config, ops.registry_version())
    if key not in entry[1]:
        entry[1][key] = RelevanceGraph(model, layers, config)
    return entry[1][key]
