"""Baseline class activation maps with the RelevanceCAM calling convention.

cam = GradCAM(model, layers=["layer4"]); maps = cam(images, targets) -> {layer: (B, K, h, w)}
Maps are raw (no ReLU, no normalisation, no resizing). Gradient methods switch gradients on
themselves, so they also work when the caller is under no_grad or inference_mode. Hooks only
exist during a call, and never change what the model computes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn

from wsss.cam.lrp.graph import evaluate_node, head_after, trace
from wsss.cam.lrp.ops import node_rule
from wsss.cam.lrp.rules import compute_dtype
from wsss.cam.relevance import check_layer_names


def _targets_2d(targets: Tensor, images: Tensor) -> Tensor:
    targets = targets.unsqueeze(1) if targets.dim() == 1 else targets
    if targets.dim() != 2 or targets.shape[0] != images.shape[0]:
        raise ValueError(f"targets must be (B,) or (B, K) with B={images.shape[0]}")
    return targets.to(images.device, torch.long)


def _check_layers(model: nn.Module, layers: list[str]) -> dict[str, nn.Module]:
    names = dict(model.named_modules())
    missing = [layer for layer in layers if layer not in names]
    if missing:
        raise ValueError(f"model has no module named {missing}")
    return {layer: names[layer] for layer in layers}


class _LayerCAM:
    """Shared plumbing: layer lookup, context manager, output shape."""

    def __init__(self, model: nn.Module, layers: list[str] | str):
        self.model = model
        self.layers = check_layer_names(layers)
        self.modules = _check_layers(model, self.layers)

    def __enter__(self) -> "_LayerCAM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Hooks never outlive a call, so there is nothing to release."""

    def _forward(self, images: Tensor, keep_graph: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the model, returning logits and the requested layers' outputs.

        Without keep_graph the outputs are detached copies taken when each module returns. With
        keep_graph they are the autograd tensors themselves (for d logit / dA), and the model
        continues on a copy. Either way, in-place ops later in the model cannot change them.
        """
        activations: dict[str, Tensor] = {}

        def hook(name: str):
            def keep(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
                if not keep_graph:
                    activations[name] = output.detach().clone()
                    return None
                activations[name] = output
                return output.clone()
            return keep

        handles = [module.register_forward_hook(hook(name)) for name, module in self.modules.items()]
        try:
            logits = self.model(images)
        finally:
            for handle in handles:
                handle.remove()
        return logits, activations


class _GradientCAM(_LayerCAM):
    """Methods built from d logit_t / dA at each layer."""

    def __call__(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        targets = _targets_2d(targets, images)
        with torch.inference_mode(False), torch.enable_grad():
            # clones made here are normal tensors even if the caller made them in inference mode
            x = images.clone().requires_grad_(True)
            targets = targets.clone()
            logits, acts = self._forward(x, keep_graph=True)
            tensors = [acts[layer] for layer in self.layers]
            k = targets.shape[1]
            grads: list[tuple[Tensor, ...]] = []
            for j in range(k):
                score = logits.gather(1, targets[:, j:j + 1]).sum()
                grads.append(torch.autograd.grad(score, tensors, retain_graph=j < k - 1))
        out = {}
        for i, layer in enumerate(self.layers):
            dtype = compute_dtype(acts[layer])
            a = acts[layer].detach().to(dtype)
            g = torch.stack([grads[j][i] for j in range(k)], 1).to(dtype)  # (B, K, C, h, w)
            out[layer] = self._combine(a, g)
        return out

    def _combine(self, a: Tensor, g: Tensor) -> Tensor:
        raise NotImplementedError


class GradCAM(_GradientCAM):
    """Grad-CAM: w_kc = spatial mean of d y_k / dA_c; map_k = Σ_c w_kc A_c (no ReLU)."""

    def _combine(self, a: Tensor, g: Tensor) -> Tensor:
        return torch.einsum("bkc,bchw->bkhw", g.mean((-2, -1)), a)


class GradCAMPlusPlus(_GradientCAM):
    """Grad-CAM++ (Chattopadhay et al.), closed form with the exponential score."""

    def _combine(self, a: Tensor, g: Tensor) -> Tensor:
        g2, g3 = g.pow(2), g.pow(3)
        sum_a = a.sum((-2, -1))[:, None, :, None, None]
        denom = 2 * g2 + sum_a * g3
        alpha = torch.where(denom != 0, g2 / torch.where(denom != 0, denom, 1.0), 0.0)
        weights = (alpha * g.clamp(min=0)).sum((-2, -1))
        return torch.einsum("bkc,bchw->bkhw", weights, a)


def _final_linear(model: nn.Module) -> nn.Linear:
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return model.fc
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("CAM needs a model whose head ends in nn.Linear")
    return linears[-1]


class CAM(_LayerCAM):
    """Class Activation Mapping for GAP + linear heads: map_k = Σ_c W_{t_k c} A_c."""

    def __call__(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        targets = _targets_2d(targets, images)
        fc = _final_linear(self.model)
        with torch.no_grad():
            _, acts = self._forward(images, keep_graph=False)
            out = {}
            for layer in self.layers:
                dtype = compute_dtype(acts[layer])
                a = acts[layer].to(dtype)
                weight = fc.weight.detach().to(dtype)[targets]  # (B, K, C)
                if a.shape[1] != weight.shape[-1]:
                    raise ValueError(f"CAM: layer {layer!r} has {a.shape[1]} channels but the "
                                     f"final Linear takes {weight.shape[-1]}; use the last conv layer")
                out[layer] = torch.einsum("bkc,bchw->bkhw", weight, a)
        return out


# --------------------------------------------------------------------------------------------
# LIFT-CAM
# --------------------------------------------------------------------------------------------


class _Head:
    """The part of the traced model after a layer, y = F(A), with each op's DeepLIFT kind."""

    def __init__(self, traced, layer: str):
        self.traced = traced
        self.start, self.nodes = head_after(traced, layer)
        self.kinds = {}
        for node in self.nodes:
            rule = node_rule(node, traced.modules) if node.op.startswith("call") else None
            kind = rule.kind if rule is not None else "other"
            if kind == "linear" and self._multiplies_signals(node):
                kind = "other"
            if kind == "other" and not self._metadata(node):
                raise ValueError(f"LIFT-CAM at {layer!r}: the head contains graph node "
                                 f"{node.name!r} ({node.op} {node.target}), which the DeepLIFT "
                                 "rescale rule does not cover (supported: linear ops, element-"
                                 "wise activations, pooling, reshapes)")
            self.kinds[node] = kind

    def _multiplies_signals(self, node: fx.Node) -> bool:
        """A product (or quotient) of two values that both depend on the layer: not linear."""
        if node.target not in ("mul", "mul_", "div", "div_") and getattr(
                node.target, "__name__", "") not in ("mul", "imul", "truediv", "itruediv", "div"):
            return False
        inside = set(self.nodes) | {self.start}
        return sum(isinstance(a, fx.Node) and a in inside for a in node.args[:2]) == 2

    def _metadata(self, node: fx.Node) -> bool:
        """Shape queries (x.size(), x.shape) that feed reshapes: no values flow through them."""
        return node.op == "call_method" and node.target in ("size", "dim") or (
            node.op == "call_function" and getattr(node.target, "__name__", "") == "getattr")

    def run(self, a: Tensor, reference: dict[fx.Node, Any] | None) -> tuple[Tensor, dict]:
        """The logits from activation a. Without a reference: plain values (all kept). With the
        reference's values: DeepLIFT's rescale multipliers wired into the autograd graph, while
        the values themselves stay exact."""
        env: dict[fx.Node, Any] = {self.start: a}
        for node in self.nodes:
            self._constants(node, env)
            if reference is None or self.kinds[node] in ("linear", "other"):
                env[node] = evaluate_node(node, env, self.traced)
            elif self.kinds[node] == "elementwise":
                env[node] = _rescaled(node, env, reference, self.traced)
            else:
                env[node] = _RescaleMaxPool.apply(
                    env[node.args[0]], reference[node.args[0]],
                    lambda v, node=node: evaluate_node(node, {**env, node.args[0]: v}, self.traced))
        return env[self.traced.logits], env

    def _constants(self, node: fx.Node, env: dict[fx.Node, Any]) -> None:
        for i in node.all_input_nodes:
            if i not in env:
                self._constants(i, env)
                env[i] = evaluate_node(i, env, self.traced)


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
                evaluate_node(node, {**env, node.args[0]: v}, traced).sum(), v)
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
            routed, plain = torch.autograd.grad(y, v, m * dy, retain_graph=True)[0], \
                torch.autograd.grad(y, v, m)[0]
        dx = u - u_ref
        moved = dx.abs() > 1e-7
        return torch.where(moved, routed / torch.where(moved, dx, 1.0), plain), None, None


class LiftCAM(_LayerCAM):
    """LIFT-CAM: φ_c = DeepLIFT (rescale rule, zero reference) contribution of A_c to logit t.

    map_k = Σ_c φ_kc A_c (raw). For a GAP + linear head φ_c = W_tc·mean(A_c) exactly; for deeper
    heads (VGG's MLP, or the stages after an inner layer) the rescale rule runs through the
    activations, max pools and linear ops of the traced graph after the layer.
    """

    def __init__(self, model: nn.Module, layers: list[str] | str):
        super().__init__(model, layers)
        traced = trace(model)
        self.heads = {layer: _Head(traced, layer) for layer in self.layers}

    def __call__(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        targets = _targets_2d(targets, images)
        with torch.no_grad():
            _, acts = self._forward(images, keep_graph=False)
        out = {}
        with torch.inference_mode(False), torch.enable_grad():
            targets = targets.clone()
            for layer in self.layers:
                a = acts[layer].to(compute_dtype(acts[layer])).clone()
                phi = self._contributions(self.heads[layer], a, targets)  # (B, K, C, h, w)
                out[layer] = torch.einsum("bkc,bchw->bkhw", phi.sum((-2, -1)), a)
        return out

    @staticmethod
    def _contributions(head: _Head, a: Tensor, targets: Tensor) -> Tensor:
        """φ (B, K, *A.shape[1:]): multipliers from each target logit times A - 0."""
        with torch.no_grad():
            _, reference = head.run(torch.zeros_like(a), None)
        x = a.detach().clone().requires_grad_(True)
        logits, _ = head.run(x, reference)
        k = targets.shape[1]
        multipliers = [torch.autograd.grad(logits.gather(1, targets[:, j:j + 1]).sum(), x,
                                           retain_graph=j < k - 1)[0] for j in range(k)]
        return torch.stack(multipliers, 1) * a.unsqueeze(1)


METHODS = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "liftcam": LiftCAM, "cam": CAM}
