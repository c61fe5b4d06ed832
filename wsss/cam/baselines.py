"""Baseline class activation maps with the RelevanceCAM calling convention: CAM, Grad-CAM and
Grad-CAM++ (LIFT-CAM lives in liftcam.py).

cam = GradCAM(model, layers=["layer4"]); maps = cam(images, targets) -> {layer: (B, K, h, w)}
Maps are raw (no ReLU, no normalisation, no resizing). Gradient methods switch gradients on
themselves, so they also work when the caller is under no_grad or inference_mode. Hooks only
exist during a call, and never change what the model computes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsss.cam.core import HookedCAM, stacked_gradients, targets_2d
from wsss.cam.lrp.rules import compute_dtype
from wsss.cam.tokens import TokenLayout, to_grid, token_layout


class GradientCAM(HookedCAM):
    """Methods built from d logit_t / dA at each layer; subclasses combine A and the gradients.

    Transformer tokens (B, N, C) are reshaped to the patch grid (B, C, h, w), prefix tokens
    dropped, before combining (pytorch-grad-cam's reshape transform); `tokens` gives the layout,
    read from the model by default (see wsss.cam.tokens).
    """

    def __init__(
        self, model: nn.Module, layers: list[str] | str, tokens: TokenLayout | None = None
    ):
        super().__init__(model, layers)
        self.tokens = tokens if tokens is not None else token_layout(model)

    def __call__(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        targets = targets_2d(targets, images)
        _, acts, grads = self.target_gradients(images, targets)
        out = {}
        hw = tuple(images.shape[-2:])
        for i, layer in enumerate(self.layers):
            dtype = compute_dtype(acts[layer])
            a = to_grid(acts[layer].detach().to(dtype), hw, self.tokens)
            g = to_grid(stacked_gradients(grads, i, dtype), hw, self.tokens, lead=2)
            out[layer] = self.combine(a, g)  # g: (B, K, C, h, w)
        return out

    def combine(self, a: Tensor, g: Tensor) -> Tensor:
        """The map (B, K, h, w) from activations (B, C, h, w) and gradients (B, K, C, h, w)."""
        raise NotImplementedError


class GradCAM(GradientCAM):
    """Grad-CAM: w_kc = spatial mean of d y_k / dA_c; map_k = Σ_c w_kc A_c (no ReLU)."""

    def combine(self, a: Tensor, g: Tensor) -> Tensor:
        return torch.einsum("bkc,bchw->bkhw", g.mean((-2, -1)), a)


class GradCAMPlusPlus(GradientCAM):
    """Grad-CAM++ (Chattopadhay et al.), closed form with the exponential score."""

    def combine(self, a: Tensor, g: Tensor) -> Tensor:
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


class CAM(HookedCAM):
    """Class Activation Mapping for GAP + linear heads: map_k = Σ_c W_{t_k c} A_c."""

    def __call__(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        targets = targets_2d(targets, images)
        fc = _final_linear(self.model)
        with torch.no_grad():
            _, acts = self.record(images, keep_graph=False)
            out = {}
            for layer in self.layers:
                dtype = compute_dtype(acts[layer])
                a = acts[layer].to(dtype)
                weight = fc.weight.detach().to(dtype)[targets]  # (B, K, C)
                if a.shape[1] != weight.shape[-1]:
                    raise ValueError(
                        f"CAM: layer {layer!r} has {a.shape[1]} channels but the "
                        f"final Linear takes {weight.shape[-1]}; use the last conv layer"
                    )
                out[layer] = torch.einsum("bkc,bchw->bkhw", weight, a)
        return out
