"""LIFT-CAM (Jung & Oh, ICCV 2021): each channel's weight is its DeepLIFT contribution to the
target logit, with the zero activation as the reference.

For a GAP + linear head the contribution is exact (W_tc · mean A_c); for deeper heads (VGG's MLP,
or the stages after an inner layer) the rescale rule runs through the activations, max pools and
linear ops of the traced graph after the layer (`DeepLiftHead`). LayerNorms in the head get the
multiplier of the normalisation with σ held constant, so a ViT's head (final norm, class token
or patch-token mean, linear) is exact at the last block; token layers (B, N, C) give maps on
the patch grid (`wsss.cam.tokens`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from wsss.cam.core import HookedCAM, targets_2d
from wsss.cam.lrp.ops import node_rule
from wsss.cam.lrp.rules import compute_dtype
from wsss.cam.lrp.tracing import TracedModel, evaluate_node, head_after, trace
from wsss.cam.tokens import TokenLayout, to_grid, token_layout

# --------------------------------------------------------------------------------------------


class DeepLiftHead:
    """The part of the traced model after a layer, y = F(A), with each op's DeepLIFT kind.

    LayerNorms ("layernorm") pass the multiplier of the normalisation with σ held constant.
    Ops with no rescale rule ("other": products of two signals as in squeeze-excitation gates,
    other normalisations, stacks, reductions other than pooling) pass their ordinary gradient,
    as Captum's DeepLift does for every op it has no rule for."""

    def __init__(self, traced: TracedModel, layer: str):
        self.traced = traced
        self.start, self.nodes = head_after(traced, layer)
        self.kinds = {}
        for node in self.nodes:
            rule = node_rule(node, traced.modules) if node.op.startswith("call") else None
            kind = rule.kind if rule is not None else "other"
            if kind == "linear" and self._multiplies_signals(node):
                kind = "other"
            if layer_norm_arguments(node, traced) is not None:
                kind = "layernorm"
            self.kinds[node] = kind

    def _multiplies_signals(self, node: fx.Node) -> bool:
        """A product (or quotient) of two values that both depend on the layer: not linear."""
        if node.target not in ("mul", "mul_", "div", "div_") and getattr(
            node.target, "__name__", ""
        ) not in ("mul", "imul", "truediv", "itruediv", "div"):
            return False
        inside = set(self.nodes) | {self.start}
        return sum(isinstance(a, fx.Node) and a in inside for a in node.args[:2]) == 2

    def run(self, a: Tensor, reference: dict[fx.Node, Any] | None) -> tuple[Tensor, dict]:
        """The logits from activation a. Without a reference: plain values (all kept). With the
        reference's values: DeepLIFT's rescale multipliers wired into the autograd graph, while
        the values themselves stay exact."""
        env: dict[fx.Node, Any] = {self.start: a}
        for node in self.nodes:
            self._constants(node, env)
            if reference is None or self.kinds[node] in ("linear", "other"):
                env[node] = evaluate_node(node, env, self.traced)
            elif self.kinds[node] == "layernorm":
                env[node] = _sigma_held_layer_norm(node, env, self.traced)
            elif self.kinds[node] == "elementwise":
                env[node] = _rescaled(node, env, reference, self.traced)
            else:
                env[node] = _RescaleMaxPool.apply(
                    env[node.args[0]],
                    reference[node.args[0]],
                    lambda v, node=node: evaluate_node(node, {**env, node.args[0]: v}, self.traced),
                )
        return env[self.traced.logits], env

    def _constants(self, node: fx.Node, env: dict[fx.Node, Any]) -> None:
        for i in node.all_input_nodes:
            if i not in env:
                self._constants(i, env)
                env[i] = evaluate_node(i, env, self.traced)


def layer_norm_arguments(node: fx.Node, traced: TracedModel) -> tuple | None:
    """(input node, normalized_shape, weight, bias, eps) of an nn.LayerNorm module or an
    F.layer_norm call (weight and bias: tensors, graph nodes or None); None for other nodes."""
    if node.op == "call_module":
        module = traced.modules[node.target]
        if type(module).forward is not nn.LayerNorm.forward:
            return None
        return (node.args[0], module.normalized_shape, module.weight, module.bias, module.eps)
    if node.op == "call_function" and node.target in (F.layer_norm, torch.layer_norm):
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        values = dict(zip(names, (None, None, None, None, 1e-5)))
        values.update(zip(names, node.args))
        values.update({k: v for k, v in node.kwargs.items() if k in names})
        return tuple(values[k] for k in names)
    return None


def _sigma_held_layer_norm(node: fx.Node, env: dict, traced: TracedModel) -> Tensor:
    """The LayerNorm's exact value, with the gradient of γ ⊙ (x − μ(x))/σ + β where σ is held
    constant (an affine map of x: its DeepLIFT multipliers are this Jacobian)."""
    x_node, shape, weight, bias, eps = layer_norm_arguments(node, traced)
    x = env[x_node]
    weight, bias = (env[w] if isinstance(w, fx.Node) else w for w in (weight, bias))
    dims = tuple(range(-len(tuple(shape)), 0))
    mu = x.mean(dims, keepdim=True)
    sigma = (x.var(dims, unbiased=False, keepdim=True) + eps).sqrt().detach()
    held = (x - mu) / sigma
    if weight is not None:
        held = held * weight
    if bias is not None:
        held = held + bias
    with torch.no_grad():
        exact = evaluate_node(node, env, traced)
    return exact + (held - held.detach())


def _rescaled(node: fx.Node, env: dict, reference: dict, traced) -> Tensor:
    """f(u) as f(u_ref) + slope·(u - u_ref), slope = Δf/Δu held constant (the rescale rule);
    where Δu is tiny, the slope is the derivative f'(u)."""
    u, u_ref = env[node.args[0]], reference[node.args[0]]
    with torch.no_grad():
        y = evaluate_node(node, env, traced)
        y_ref = reference[node]
        du = (u - u_ref).detach()
        tiny = du.abs() <= 1e-7
    if bool(tiny.any()):
        with torch.enable_grad():
            v = u.detach().clone().requires_grad_(True)
            (derivative,) = torch.autograd.grad(
                evaluate_node(node, {**env, node.args[0]: v}, traced).sum(), v
            )
    else:
        derivative = torch.zeros_like(du)
    slope = torch.where(tiny, derivative, (y - y_ref) / torch.where(tiny, 1.0, du))
    return y_ref + slope * (u - u_ref)


class _RescaleMaxPool(torch.autograd.Function):
    """Max pooling with DeepLIFT's multipliers: m_in = Pᵀ(m·Δy)/Δx where Δx != 0, else Pᵀm."""

    @staticmethod
    def forward(ctx, u: Tensor, u_ref: Tensor, pool) -> Tensor:
        ctx.save_for_backward(u, u_ref)
        ctx.pool = pool
        return pool(u)

    @staticmethod
    def backward(ctx, m: Tensor):
        u, u_ref = ctx.saved_tensors
        with torch.enable_grad():
            v = u.detach().requires_grad_(True)
            y = ctx.pool(v)
            dy = (y - ctx.pool(u_ref)).detach()
            routed, plain = (
                torch.autograd.grad(y, v, m * dy, retain_graph=True)[0],
                torch.autograd.grad(y, v, m)[0],
            )
        dx = u - u_ref
        moved = dx.abs() > 1e-7
        return torch.where(moved, routed / torch.where(moved, dx, 1.0), plain), None, None


class LiftCAM(HookedCAM):
    """LIFT-CAM: φ_c = DeepLIFT (rescale rule, zero reference) contribution of A_c to logit t.

    map_k = Σ_c φ_kc A_c (raw). For a GAP + linear head φ_c = W_tc·mean(A_c) exactly; for deeper
    heads (VGG's MLP, or the stages after an inner layer) the rescale rule runs through the
    activations, max pools and linear ops of the traced graph after the layer, LayerNorms with
    σ held constant. Transformer tokens (B, N, C) (or Swin's (B, H, W, C)): φ_kc sums over every
    token, prefix tokens included, and the map is drawn on the patch grid (B, K, h, w); `tokens`
    gives the layout, read from the model by default (see wsss.cam.tokens).
    """

    def __init__(
        self, model: nn.Module, layers: list[str] | str, tokens: TokenLayout | None = None
    ):
        super().__init__(model, layers)
        traced = trace(model)
        self.heads = {layer: DeepLiftHead(traced, layer) for layer in self.layers}
        self.tokens = tokens if tokens is not None else token_layout(model)

    def __call__(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        targets = targets_2d(targets, images)
        with torch.no_grad():
            _, acts = self.record(images, keep_graph=False)
        out = {}
        with torch.inference_mode(False), torch.enable_grad():
            targets = targets.clone()
            for layer in self.layers:
                a = acts[layer].to(compute_dtype(acts[layer])).clone()
                phi = self._contributions(self.heads[layer], a, targets)  # (B, K, *A.shape[1:])
                out[layer] = self._map(phi, a, tuple(images.shape[-2:]))
        return out

    def _map(self, phi: Tensor, a: Tensor, image_hw: tuple[int, int]) -> Tensor:
        """Σ_c φ_kc A_c: φ summed over every position (all tokens), A on its (h, w) grid."""
        tokens = a.dim() == 3 or (a.dim() == 4 and self.tokens.channels_last)
        if a.dim() != 4 and not tokens:
            raise ValueError(
                f"LIFT-CAM needs (B, C, h, w) activations or (B, N, C) tokens, got {tuple(a.shape)}"
            )
        positions = tuple(range(2, phi.dim() - 1)) if tokens else (-2, -1)
        weights = phi.sum(positions)  # (B, K, C)
        grid = to_grid(a, image_hw, self.tokens) if tokens else a
        return torch.einsum("bkc,bchw->bkhw", weights, grid)

    @staticmethod
    def _contributions(head: DeepLiftHead, a: Tensor, targets: Tensor) -> Tensor:
        """φ (B, K, *A.shape[1:]): multipliers from each target logit times A - 0."""
        with torch.no_grad():
            _, reference = head.run(torch.zeros_like(a), None)
        x = a.detach().clone().requires_grad_(True)
        logits, _ = head.run(x, reference)
        k = targets.shape[1]
        multipliers = [
            torch.autograd.grad(
                logits.gather(1, targets[:, j : j + 1]).sum(), x, retain_graph=j < k - 1
            )[0]
            for j in range(k)
        ]
        return torch.stack(multipliers, 1) * a.unsqueeze(1)
