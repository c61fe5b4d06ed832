"""The records an op rule works with: the node's context, the step it plans, and the requests
for recorded values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import Tensor, fx, nn

from wsss.cam.lrp.canonize import BatchNormFold
from wsss.cam.lrp.rules import Rule


class UnsupportedOp(Exception):
    """Raised by an op rule that cannot handle this particular node (the reason is the text)."""


@dataclass(frozen=True)
class Shape:
    """A request to record the shape of a node's value (not the value)."""

    node: fx.Node


@dataclass(frozen=True)
class Part:
    """Relevance for one element of a multi-output node (chunk / split)."""

    index: int
    relevance: Tensor


@dataclass
class Step:
    """How relevance crosses one node.

    sources: the input nodes that receive relevance, in the order `backward` returns them;
    reads: the values (fx.Node) or shapes (Shape) the forward must record;
    backward(r, values) -> one relevance (a Tensor, a Part or None) per source.
    """

    sources: tuple[fx.Node, ...]
    reads: tuple[Any, ...]
    backward: Callable[[Any, list[Any]], Sequence[Any]]


@dataclass
class NodeContext:
    """What an op rule may know about its node when the relevance plan is built."""

    node: fx.Node
    module: nn.Module | None
    path: str
    config: Any  # the LRPConfig (composite)
    is_signal: Callable[[Any], bool]  # does this argument depend on the input image?
    is_gate: Callable[[Any], bool]  # is this argument produced by a gate (sigmoid-like) op?
    is_multi_output: Callable[[Any], bool]
    layer_rule: Rule | None = None  # the composite's rule for a conv / linear node
    fold: BatchNormFold | None = None  # the BatchNorm the canonizer folded into this conv
    pad: Any = None  # the zero pad folded into this conv (ops.padding.PadFold)

    @property
    def args(self) -> tuple[Any, ...]:
        return self.node.args

    def bind(self, names: Sequence[str], **defaults: Any) -> dict[str, Any]:
        """The node's arguments by name (positional names in order, then keyword arguments)."""
        values = dict(defaults)
        values.update(zip(names, self.node.args))
        values.update(self.node.kwargs)
        return values

    def signal(self, value: Any, what: str = "input") -> fx.Node:
        if not self.is_signal(value):
            raise UnsupportedOp(f"its {what} does not depend on the image")
        return value


class OpRule:
    """An op rule: `plan(ctx)` returns the node's Step (or raises UnsupportedOp).

    gate: the op's output gates another signal when multiplied with it (sigmoid-like);
    kind: how LIFT-CAM's DeepLIFT treats the op: "linear" (exact: its own transpose),
    "elementwise" (a nonlinearity per element: the rescale rule), "maxpool", or "other";
    multi_output: the op returns a tuple (e.g. unbind, nn.MultiheadAttention), so relevance
    reaches it through `getitem` as one Part per element.
    """

    def __init__(
        self,
        plan: Callable[[NodeContext], Step],
        gate: bool = False,
        kind: str = "other",
        multi_output: bool = False,
    ):
        self._plan = plan
        self.gate = gate
        self.kind = kind
        self.multi_output = multi_output

    def plan(self, ctx: NodeContext) -> Step:
        return self._plan(ctx)
