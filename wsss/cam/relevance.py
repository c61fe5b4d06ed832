"""Relevance-CAM: multi-layer, multi-class maps from one forward pass and one relevance sweep.

map_k = Σ_c α_kc A_c with α_kc = Σ_ij R_kc(i,j), where A is the activation at a layer's output
and R_k the LRP relevance of target class k at that same tensor (derived in docs/ALGORITHMS.md).
With weights="position" each position weights the channels by its own ratio R_kc(i,j)/A_c(i,j),
so map_k(i,j) = Σ_c R_kc(i,j): for signed activations (transformer tokens), where a channel-wide
α would flip with the sign of the channel's total.
The layer name "input" gives the pixel-level LRP heatmap Σ_c R_kc(i,j) instead (relevance at the
image; the input layers use the composite's `input` rule, z^B by default: see `box_rule`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from wsss.cam.core import LayerCAM, check_layer_names, targets_2d
from wsss.cam.lrp.composites import DEFAULT_PRESET, PRESETS, list_presets, preset_config
from wsss.cam.lrp.graph import relevance_graph
from wsss.cam.lrp.rules import as_compute, compute_dtype
from wsss.cam.lrp.tracing import INPUT_LAYER
from wsss.cam.tokens import TokenLayout, to_grid, token_layout

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "RelevanceCAM",
    "check_layer_names",
    "list_presets",
    "preset_config",
    "start_relevance",
]


def start_relevance(
    logits: Tensor, targets: Tensor, start: str, present: Tensor | None = None
) -> Tensor:
    """Initial relevance over the logits, shape (B, K, C), for (B, K) target classes.

    - lrp: one-hot e_t;
    - clrp: R_t = 1, R_j = -1/C for j != t (the official code's CLRP);
    - clrp_absent: as clrp but only classes absent from the image are contrasted (-1/C each),
      so another class present in the same image is not erased. `present` is a (B, C)
      multi-hot mask; without it no class is known to be present besides the target, and the
      start vector is clrp's. (It never depends on which other classes are requested.)
    - sglrp: the gradient of softmax p_t: R_t = p_t(1 - p_t), R_j = -p_t p_j.
    The vector is float32, or float64 for float64 logits.
    """
    b, c = logits.shape
    dtype = compute_dtype(logits)
    one_hot = torch.zeros(b, targets.shape[1], c, device=logits.device, dtype=dtype)
    one_hot.scatter_(2, targets.unsqueeze(2), 1.0)
    if start == "lrp":
        return one_hot
    if start == "clrp" or (start == "clrp_absent" and present is None):
        return one_hot - (1.0 - one_hot) / c
    if start == "clrp_absent":
        absent = ~present.to(device=logits.device, dtype=torch.bool)
        return one_hot - (1.0 - one_hot) * absent.unsqueeze(1).to(dtype) / c
    if start == "sglrp":
        p = torch.softmax(as_compute(logits, dtype), dim=1).unsqueeze(1)  # (B, 1, C)
        p_t = (p * one_hot).sum(2, keepdim=True)
        return p_t * (one_hot - p)
    raise ValueError(f"unknown start vector {start!r}")


class RelevanceCAM(LayerCAM):
    """Relevance-CAM for any traceable CNN or vision transformer (torchvision, timm, ...).

    with RelevanceCAM(model, layers=["layer2", "layer3", "layer4"], preset="reference") as cam:
        maps = cam(images, targets)          # {layer: (B, K, h, w)} raw maps

    targets: (B,) or (B, K) class indices. All layers and classes come from one forward pass
    and one relevance sweep from the logits down to the lowest requested layer. Layers are
    module paths as in model.named_modules(), or "input" for the pixel-level heatmap. Keyword
    options override the preset (see `LRPConfig`: conv, linear, input, lower, layer_rules,
    batchnorm, residual, start, weights). The model is traced here (torch.fx; the plan is cached
    per model, layers and options, and rebuilt when a module is replaced); an op without an LRP
    rule between the logits and a requested layer fails here, naming it. No hooks are added, so
    the model is left untouched. Put the model in eval mode, on its device, first.

    Transformer layers that output (B, N, C) tokens (or Swin's (B, H, W, C) grids) give maps on
    the (h, w) patch grid, the prefix tokens dropped from the map (their relevance still counts
    in α); `tokens` gives the layout, read from the model by default (see wsss.cam.tokens).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[str] | str,
        preset: str = DEFAULT_PRESET,
        *,
        tokens: TokenLayout | None = None,
        **options: Any,
    ):
        super().__init__(model, layers)
        self.tokens = tokens if tokens is not None else token_layout(model)
        self.config = preset_config(preset, **options)
        self.graph = relevance_graph(model, self.layers, self.config)

    def __call__(
        self, images: Tensor, targets: Tensor, present: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Raw maps {layer: (B, K, h, w)} for target classes (B,) or (B, K).

        present: optional (B, C) multi-hot of the classes in each image (for start="clrp_absent").
        """
        activations, relevance, batch = self._run(images, targets, present)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            return {
                layer: self._map(
                    layer, activations[layer], relevance.pop(layer), batch, images.shape[-2:]
                )
                for layer in self.layers
            }

    def relevance(
        self, images: Tensor, targets: Tensor, present: Tensor | None = None
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """{layer: (activation (B, C, h, w), relevance (B, K, C, h, w))}, for checks and analysis."""
        activations, relevance, batch = self._run(images, targets, present)
        return {
            layer: (
                activations[layer],
                relevance[layer].view(batch, -1, *relevance[layer].shape[1:]),
            )
            for layer in self.layers
        }

    def _run(
        self, images: Tensor, targets: Tensor, present: Tensor | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
        """One recording forward pass, then one relevance sweep."""
        targets = targets_2d(targets, images)
        logits, values = self.graph.forward(images)
        if logits.dim() != 2:
            raise ValueError(f"model must return (B, C) logits, got shape {tuple(logits.shape)}")
        if int(targets.max()) >= logits.shape[1] or int(targets.min()) < 0:
            raise ValueError(f"targets must lie in [0, {logits.shape[1]})")
        activations = {layer: self.graph.activation(values, layer) for layer in self.layers}
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            b, k = targets.shape
            r = start_relevance(logits, targets, self.config.start, present)
            relevance = self.graph.sweep(r.reshape(b * k, -1), values)
        return activations, relevance, b

    def _map(
        self, layer: str, activation: Tensor, relevance: Tensor, batch: int, image_hw: Any
    ) -> Tensor:
        a = as_compute(activation, relevance.dtype)
        r = relevance.view(batch, -1, *a.shape[1:])
        if layer == INPUT_LAYER and layer not in self.graph.traced.modules:
            return r.sum(2)  # the pixel-level heatmap: relevance summed over input channels
        tokens = a.dim() == 3 or (a.dim() == 4 and self.tokens.channels_last)
        if a.dim() != 4 and not tokens:
            raise ValueError(
                f"Relevance-CAM needs (B, C, h, w) activations or (B, N, C) tokens at {layer!r}, "
                f"got {tuple(a.shape)}"
            )
        if self.config.weights == "position":
            # per-position weights R/A: the map is the relevance itself, summed over channels
            grid_r = to_grid(r, tuple(image_hw), self.tokens, lead=2) if tokens else r
            return grid_r.sum(2)
        # α sums over every position (for tokens: the prefix tokens too); the map shows the grid
        positions = tuple(range(2, r.dim() - 1)) if tokens else (-2, -1)
        alpha = r.sum(positions)
        if self.config.weights == "mean":
            alpha = alpha / math.prod(r.shape[d] for d in positions)
        grid = to_grid(a, tuple(image_hw), self.tokens) if tokens else a
        return torch.einsum("bkc,bchw->bkhw", alpha, grid)
