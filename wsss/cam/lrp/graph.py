"""The relevance plan of a traced model (tracing.py), and relevance flowing back through it.

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

import weakref
from typing import Any

import torch
from torch import Tensor, fx, nn

from wsss.cam.lrp.canonize import CONVS, BatchNormFold, batchnorm_folds
from wsss.cam.lrp.composites import LayerInfo, LRPConfig
from wsss.cam.lrp.ops import (
    FUNCTIONAL_LAYERS,
    NodeContext,
    OpRule,
    Part,
    Shape,
    Step,
    UnsupportedOp,
    node_rule,
    padding_folds,
    register_optional_rules,
    registry_version,
)
from wsss.cam.lrp.rules import compute_dtype
from wsss.cam.lrp.tracing import (
    INPUT_LAYER,
    TracedModel,
    evaluate_node,
    head_after,
    mutated_argument,
    trace,
)

__all__ = [
    "INPUT_LAYER",
    "RelevanceGraph",
    "TracedModel",
    "evaluate_node",
    "head_after",
    "relevance_graph",
    "trace",
]
_MULTI_OUTPUT = {torch.chunk, torch.split, "chunk", "split"}
_SHAPE_ONLY = {
    "view",
    "reshape",
    "flatten",
    "unsqueeze",
    "squeeze",
    "expand",
    "expand_as",
    "contiguous",
    torch.flatten,
    torch.reshape,
    torch.unsqueeze,
    torch.squeeze,
}


def _reads_shape(node: fx.Node) -> bool:
    """x.shape / x.size() / x.dim(): a value that depends on the image's size, not its pixels."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1:2] in (("shape",), ("ndim",), ("dtype",), ("device",))
    return node.op == "call_method" and node.target in ("size", "dim")


def _target_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        kind = type(modules[node.target])
        return f"{kind.__module__}.{kind.__qualname__}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    return f"{getattr(target, '__module__', None) or ''}.{getattr(target, '__name__', target)}"


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
        # the canonizer pass: which BatchNorm is folded into which conv, decided once
        self._folds: dict[fx.Node, BatchNormFold] = (
            batchnorm_folds(nodes, t.modules) if config.batchnorm == "fold" else {}
        )
        self._layer_infos = self._linear_layers(nodes)
        # zero pads read only by a conv: padded inside the conv's map (ops/padding.py)
        self._pad_folds = padding_folds(nodes, t.modules, self._context, capture_set)

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
                raise ValueError(
                    f"no relevance reaches {layer!r}: it is not on a path from the "
                    "input to the logits that relevance follows (e.g. inside a "
                    "squeeze-excitation gate, which is held constant)"
                )
        self._useful = set(self.steps) | capture_set
        self.order = [n for n in reversed(nodes) if n in self._useful]
        self._build_recorder(nodes)

    # ---------------------------------------------------------------------------- planning

    def _depends_on_input(self, nodes: list[fx.Node]) -> dict[fx.Node, bool]:
        """Which values depend on the image. A shape read from a signal (x.shape, x.size())
        does not: e.g. a class token expanded to the batch size is a constant."""
        derived: dict[fx.Node, bool] = {}
        for n in nodes:
            derived[n] = (n is self.traced.placeholder) or (
                n.op not in ("get_attr", "placeholder")
                and not _reads_shape(n)
                and any(derived[i] for i in n.all_input_nodes)
            )
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
        if not isinstance(value, fx.Node) or not value.op.startswith("call"):
            return False
        if value.op != "call_module" and value.target in _MULTI_OUTPUT:
            return True
        rule = node_rule(value, self.traced.modules)
        return rule is not None and rule.multi_output

    def _linear_layers(self, nodes: list[fx.Node]) -> dict[fx.Node, LayerInfo]:
        """Conv / Linear nodes (modules, or F.linear / F.conv*d inside a module) with their
        position and whether they read the image."""
        t = self.traced
        linear = [
            n
            for n in nodes
            if (n.op == "call_module" and isinstance(t.modules[n.target], CONVS + (nn.Linear,)))
            or (n.op == "call_function" and n.target in FUNCTIONAL_LAYERS)
        ]
        reads_image: dict[fx.Node, bool] = {}
        for n in nodes:
            reads_image[n] = n is t.placeholder or (  # through values, not shapes read
                n not in linear
                and any(reads_image[i] for i in n.all_input_nodes if self._derived[i])
            )
        infos = {}
        for i, n in enumerate(linear):
            path, _ = t.owner(n)
            module = t.modules[path] if path in t.modules else t.model
            is_conv = isinstance(module, CONVS) or n.target in FUNCTIONAL_LAYERS[1:]
            if is_conv and n.op == "call_module" and self._is_conv_classifier(n):
                is_conv = False
            infos[n] = LayerInfo(
                path,
                module,
                "conv" if is_conv else "linear",
                any(reads_image[a] for a in n.all_input_nodes if self._derived[a]),
                i / max(1, len(linear)),
            )
        return infos

    def _is_conv_classifier(self, node: fx.Node) -> bool:
        """A pointwise conv (1×1, stride 1, one group, no padding) whose output is the logits up to
        reshapes (timm's conv heads, e.g. DPN): a Linear layer, so it gets the Linear rule."""
        conv = self.traced.modules[node.target]
        pointwise = (
            all(k == 1 for k in conv.kernel_size)
            and all(s == 1 for s in conv.stride)
            and conv.groups == 1
            and (conv.padding == "valid" or all(p == 0 for p in conv.padding))
        )
        while pointwise and node is not self.traced.logits:
            if len(node.users) != 1:
                return False
            node = next(iter(node.users))
            module = self.traced.modules.get(node.target) if node.op == "call_module" else None
            if not (node.target in _SHAPE_ONLY or isinstance(module, (nn.Flatten, nn.Identity))):
                return False
        return pointwise

    def _context(self, node: fx.Node) -> NodeContext:
        t = self.traced
        info = self._layer_infos.get(node)
        return NodeContext(
            node,
            t.modules.get(node.target) if node.op == "call_module" else None,
            t.owner(node)[0],
            self.config,
            self.is_signal,
            self.is_gate,
            self.is_multi_output,
            layer_rule=self.config.rule_for(info) if info is not None else None,
            fold=self._folds.get(node),
            pad=getattr(self, "_pad_folds", {}).get(node),
        )

    def _plan(self, node: fx.Node) -> Step:
        t = self.traced
        rule: OpRule | None = node_rule(node, t.modules) if node.op.startswith("call") else None
        if rule is None:
            raise self._unsupported(node, None)
        ctx = self._context(node)
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
            "'gate' or fn(module, input, output, relevance) -> input relevance."
        )

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
            target = mutated_argument(n, modules)
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
        return {
            layer: (r if r.dtype == dtype else r.to(dtype))
            for node, r in captured.items()
            for layer in wanted[node]
        }


def _accumulate(relevance: dict[fx.Node, Any], node: fx.Node, out: Any) -> None:
    """Add relevance arriving at `node` from one of its users (fan-out sums)."""
    if isinstance(out, Part):
        parts = relevance.setdefault(node, {})
        parts[out.index] = parts[out.index] + out.relevance if out.index in parts else out.relevance
    elif node in relevance:
        relevance[node] = relevance[node] + out
    else:
        relevance[node] = out


# Plans by model, then by (layers, composite, rule registry version). A plan reads weights at
# every call, so it stays valid while the model trains; it is rebuilt when a module is added,
# removed or replaced, when a tensor is (as .to(device) replaces buffers, which the recording
# graph may hold), or when an op rule is registered. Plans hold the model's submodules but not
# the model itself, so an entry goes away with its model.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict]]" = weakref.WeakKeyDictionary()


def relevance_graph(model: nn.Module, layers: list[str], config: LRPConfig) -> RelevanceGraph:
    """The model's RelevanceGraph for these layers and composite, built once and reused."""
    register_optional_rules()  # before the registry version enters the cache key
    structure = (
        tuple((name, id(m)) for name, m in model.named_modules()),
        tuple(id(t) for t in model.parameters()),
        tuple(id(t) for t in model.buffers()),
    )
    entry = _PLANS.get(model)
    if entry is None or entry[0] != structure:
        entry = _PLANS[model] = (structure, {})
    key = (tuple(layers), config, registry_version())
    if key not in entry[1]:
        entry[1][key] = RelevanceGraph(model, layers, config)
    return entry[1][key]
