"""Baseline class activation maps with the RelevanceCAM calling convention.

cam = GradCAM(model, layers=["layer4"]); maps = cam(images, targets) -> {layer: (B, K, h, w)}
Maps are raw (no ReLU, no normalisation, no resizing). Gradient methods switch gradients on
themselves, so they also work when the caller is under no_grad or inference_mode. Hooks only
exist during a call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.cam.lrp import (AvgPoolNode, BatchNormNode, Flatten, Leaf, LinearNode, MaxPoolNode,
                          Node, Residual, Sequence, Unsupported, build_tree, safe_inverse)


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
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        self.modules = _check_layers(model, self.layers)

    def __enter__(self) -> "_LayerCAM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Hooks never outlive a call, so there is nothing to release."""

    def _forward(self, images: Tensor, keep_graph: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """Run the model, returning logits and the requested layers' outputs."""
        activations: dict[str, Tensor] = {}

        def hook(name: str):
            def keep(module: nn.Module, args: Any, output: Tensor) -> Tensor:
                # a clone, so later in-place ops in the model cannot touch the stored tensor
                activations[name] = output.clone() if keep_graph else output.detach().clone()
                return activations[name]
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
            x = images.clone().requires_grad_(True)
            logits, acts = self._forward(x, keep_graph=True)
            tensors = [acts[layer] for layer in self.layers]
            k = targets.shape[1]
            grads: list[list[Tensor]] = []
            for j in range(k):
                score = logits.gather(1, targets[:, j:j + 1]).sum()
                grads.append(torch.autograd.grad(score, tensors, retain_graph=j < k - 1))
        out = {}
        for i, layer in enumerate(self.layers):
            a = acts[layer].detach().float()
            g = torch.stack([grads[j][i] for j in range(k)], 1).float()  # (B, K, C, h, w)
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
            weight = fc.weight.detach().float()[targets]  # (B, K, C)
            out = {}
            for layer in self.layers:
                a = acts[layer].float()
                if a.shape[1] != weight.shape[-1]:
                    raise ValueError(f"CAM: layer {layer!r} has {a.shape[1]} channels but the "
                                     f"final Linear takes {weight.shape[-1]}; use the last conv layer")
                out[layer] = torch.einsum("bkc,bchw->bkhw", weight, a)
        return out


# --------------------------------------------------------------------------------------------
# LIFT-CAM
# --------------------------------------------------------------------------------------------


def _head_after(tree: Node, layer: str) -> list[Node]:
    """The steps that follow `layer` on the model's main path (the head F with y = F(A))."""
    steps: list[Node] = []

    def flatten(node: Node) -> None:
        if isinstance(node, Sequence) and node.path != layer:
            for child in node.children:
                flatten(child)
        else:
            steps.append(node)

    flatten(tree)
    paths = [s.path for s in steps]
    if layer not in paths:
        raise ValueError(f"LIFT-CAM: {layer!r} is not on the model's top-level path")
    return steps[paths.index(layer) + 1:]


class LiftCAM(_LayerCAM):
    """LIFT-CAM: φ_c = DeepLIFT (rescale rule, zero reference) contribution of A_c to logit t.

    map_k = Σ_c φ_kc A_c (raw). For a GAP + linear head φ_c = W_tc·mean(A_c) exactly; for MLP
    heads (VGG) the rescale rule runs through the ReLUs, pools and Linear layers after the layer.
    """

    _HEAD_TYPES = (LinearNode, Leaf, Flatten, AvgPoolNode, MaxPoolNode, BatchNormNode)

    def __init__(self, model: nn.Module, layers: list[str] | str):
        super().__init__(model, layers)
        tree = build_tree(model)
        self.heads = {layer: _head_after(tree, layer) for layer in self.layers}
        for layer, head in self.heads.items():
            for node in head:
                if isinstance(node, (Residual, Unsupported, Sequence)) or not isinstance(
                        node, self._HEAD_TYPES):
                    raise ValueError(f"LIFT-CAM at {layer!r}: the head contains {node.describe()}; "
                                     "only Linear, ReLU, Dropout, pooling and Flatten are supported")

    def __call__(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        targets = _targets_2d(targets, images)
        with torch.no_grad():
            _, acts = self._forward(images, keep_graph=False)
        out = {}
        with torch.inference_mode(False), torch.enable_grad():
            for layer in self.layers:
                a = acts[layer].float().clone()
                phi = self._contributions(self.heads[layer], a, targets)  # (B, K, C, h, w)
                out[layer] = torch.einsum("bkc,bchw->bkhw", phi.sum((-2, -1)), a)
        return out

    @staticmethod
    def _contributions(head: list[Node], a: Tensor, targets: Tensor) -> Tensor:
        b, k = targets.shape
        x, x_ref = a, torch.zeros_like(a)
        trace = []
        for node in head:
            y, y_ref = _head_step(node, x), _head_step(node, x_ref)
            trace.append((node, x, x_ref, y, y_ref))
            x, x_ref = y, y_ref
        m = torch.zeros(b, k, x.shape[1], device=a.device)
        m.scatter_(2, targets.unsqueeze(2), 1.0)
        m = m.flatten(0, 1)  # multipliers at the logits, (B*K, C)
        for node, x, x_ref, y, y_ref in reversed(trace):
            m = _head_multiplier(node, m, x, x_ref, y, y_ref, k)
        return m.view(b, k, *a.shape[1:]) * a.unsqueeze(1)


def _head_step(node: Node, x: Tensor) -> Tensor:
    if isinstance(node, Flatten):
        return x.flatten(1)
    if isinstance(node.module, (nn.ReLU, nn.LeakyReLU)):
        return F.relu(x) if isinstance(node.module, nn.ReLU) else F.leaky_relu(
            x, node.module.negative_slope)
    return node.module(x)


def _vjp(fn, x: Tensor, m: Tensor, k: int) -> Tensor:
    """m (B*K, out) pulled back through fn at x (B, in), per class."""
    xr = x.detach().repeat_interleave(k, 0).requires_grad_(True)
    (g,) = torch.autograd.grad(fn(xr), xr, m)
    return g


def _head_multiplier(node: Node, m: Tensor, x: Tensor, x_ref: Tensor, y: Tensor, y_ref: Tensor,
                     k: int) -> Tensor:
    """DeepLIFT rescale multipliers through one head step."""
    if isinstance(node, Flatten):
        return m.reshape(m.shape[0], *x.shape[1:])
    if isinstance(node.module, (nn.ReLU, nn.LeakyReLU)):
        dx, dy = x - x_ref, y - y_ref
        slope = torch.where(dx.abs() > 1e-7, dy * safe_inverse(torch.where(dx.abs() > 1e-7, dx, 1.0)),
                            (x > 0).float())
        return m * slope.repeat_interleave(k, 0)
    if isinstance(node, MaxPoolNode):
        dx = (x - x_ref).repeat_interleave(k, 0)
        dy = (y - y_ref).repeat_interleave(k, 0)
        routed = _vjp(node.module, x, m * dy, k)
        plain = _vjp(node.module, x, m, k)
        return torch.where(dx.abs() > 1e-7, routed / torch.where(dx.abs() > 1e-7, dx, 1.0), plain)
    return _vjp(node.module, x, m, k)  # linear steps: Linear, pools, BN (eval), Dropout (eval)


METHODS = {"gradcam": GradCAM, "gradcampp": GradCAMPlusPlus, "liftcam": LiftCAM, "cam": CAM}
