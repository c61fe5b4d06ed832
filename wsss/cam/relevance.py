"""Relevance-CAM: multi-layer, multi-class maps from one forward pass and one relevance sweep.

map_k = Σ_c α_kc A_c with α_kc = Σ_ij R_kc(i,j), where A is the activation at a layer's output
and R_k the LRP relevance of target class k at that same tensor (ALGORITHMS.md §1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from wsss.cam.lrp import LRPConfig, Rule, Sweep, as_float, build_tree, run

PRESETS: dict[str, dict[str, Any]] = {
    # The official Relevance-CAM code, exactly (ALGORITHMS.md §1.2-1.3).
    "reference": dict(conv=Rule("zplus", bias=2.0), linear=Rule("zplus", bias=0.0),
                      batchnorm="identity", residual="signed", start="clrp", weights="sum"),
    # Plain LRP-z⁺: one-hot start, conservative everywhere on bias-free nets.
    "lrp": dict(conv=Rule("zplus", bias=0.0), linear=Rule("zplus", bias=0.0),
                batchnorm="identity", residual="signed", start="lrp", weights="sum"),
    # Stable variants: BN folded into the conv, residual split by positive parts, contrast only
    # against absent classes, bias ignored (conservative).
    "stable": dict(conv=Rule("zplus", bias=0.0), linear=Rule("zplus", bias=0.0),
                   batchnorm="fold", residual="positive", start="clrp_absent", weights="sum"),
    "stable_gamma": dict(conv=Rule("gamma", gamma=0.25, bias=0.0), linear=Rule("zplus", bias=0.0),
                         batchnorm="fold", residual="positive", start="clrp_absent",
                         weights="sum"),
    "sglrp": dict(conv=Rule("zplus", bias=0.0), linear=Rule("zplus", bias=0.0),
                  batchnorm="fold", residual="positive", start="sglrp", weights="sum"),
}
# The project's default, chosen by measurement (docs/benchmarks_cam.md): the reference rules with
# the residual split by positive parts (same seed IoU as "reference" on the synthetic toy, and no
# negative or amplified relevance). Swap it here once the trained-classifier comparison is in.
PRESETS["default"] = dict(PRESETS["reference"], residual="positive")

DEFAULT_PRESET = "default"


def list_presets() -> dict[str, LRPConfig]:
    """All named presets with their full options."""
    return {name: LRPConfig(**options) for name, options in PRESETS.items()}


def preset_config(preset: str = DEFAULT_PRESET, **options: Any) -> LRPConfig:
    """The LRPConfig of a named preset, with keyword options overriding its fields."""
    if preset not in PRESETS:
        raise ValueError(f"unknown Relevance-CAM preset {preset!r}; choose one of {sorted(PRESETS)}")
    return LRPConfig(**PRESETS[preset]).updated(**options)


def start_relevance(logits: Tensor, targets: Tensor, start: str,
                    present: Tensor | None = None) -> Tensor:
    """Initial relevance over the logits, shape (B, K, C), for (B, K) target classes.

    - lrp: one-hot e_t;
    - clrp: R_t = 1, R_j = -1/C for j != t (the official code's CLRP);
    - clrp_absent: as clrp but only absent classes are contrasted (-1/C each), so another class
      present in the same image is not erased. `present` is a (B, C) multi-hot mask; without it
      the image's own target classes are taken as its present set;
    - sglrp: the gradient of softmax p_t: R_t = p_t(1 - p_t), R_j = -p_t p_j.
    """
    b, c = logits.shape
    one_hot = torch.zeros(b, targets.shape[1], c, device=logits.device, dtype=torch.float32)
    one_hot.scatter_(2, targets.unsqueeze(2), 1.0)
    if start == "lrp":
        return one_hot
    if start == "clrp":
        return one_hot - (1.0 - one_hot) / c
    if start == "clrp_absent":
        if present is None:
            present = torch.zeros(b, c, device=logits.device, dtype=torch.bool)
            present.scatter_(1, targets, True)
        absent = ~present.to(device=logits.device, dtype=torch.bool)
        return one_hot - (1.0 - one_hot) * absent.unsqueeze(1).float() / c
    if start == "sglrp":
        p = torch.softmax(as_float(logits), dim=1).unsqueeze(1)  # (B, 1, C)
        p_t = (p * one_hot).sum(2, keepdim=True)
        return p_t * (one_hot - p)
    raise ValueError(f"unknown start vector {start!r}")


class RelevanceCAM:
    """Relevance-CAM for torchvision-style CNNs.

    with RelevanceCAM(model, layers=["layer2", "layer3", "layer4"], preset="reference") as cam:
        maps = cam(images, targets)          # {layer: (B, K, h, w)} raw maps

    targets: (B,) or (B, K) class indices. All layers and classes come from one forward pass
    and one relevance sweep from the logits down to the lowest requested layer. Keyword options
    override the preset (see `LRPConfig`: conv, linear, batchnorm, residual, start, weights).
    Hooks only exist during a call, so the model is left untouched. Put the model in eval mode.
    """

    def __init__(self, model: nn.Module, layers: list[str] | str,
                 preset: str = DEFAULT_PRESET, **options: Any):
        self.model = model
        self.layers = [layers] if isinstance(layers, str) else list(layers)
        if not self.layers:
            raise ValueError("RelevanceCAM needs at least one layer")
        self.config = preset_config(preset, **options)
        self.tree = build_tree(model)
        self._check_layers()

    def _check_layers(self) -> None:
        names = dict(self.model.named_modules())
        for layer in self.layers:
            if layer not in names:
                sample = [n for n in names if n][:12]
                raise ValueError(f"model has no module named {layer!r}; names look like {sample}")
        plan = self._planned = self._plan()
        missing = [layer for layer in self.layers if layer not in plan.captured_nodes]
        if missing:
            raise ValueError(f"cannot capture relevance at {missing}: the module is not on the "
                             "model's main path or is called several times in its forward "
                             "(e.g. a shared ReLU); request its parent or a neighbouring module")

    def _plan(self) -> Sweep:
        sweep = Sweep(self.config, self.layers)
        sweep.plan_only = True
        run(self.tree, None, sweep)
        return sweep

    def __enter__(self) -> "RelevanceCAM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Nothing is kept between calls; present for symmetry with the baselines."""

    def __call__(self, images: Tensor, targets: Tensor, present: Tensor | None = None
                 ) -> dict[str, Tensor]:
        """Raw maps {layer: (B, K, h, w)} for target classes (B,) or (B, K).

        present: optional (B, C) multi-hot of the classes in each image (for start="clrp_absent").
        """
        activations, relevance, batch = self._run(images, targets, present)
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            return {layer: self._map(activations.pop(layer), relevance.pop(layer), batch)
                    for layer in self.layers}

    def relevance(self, images: Tensor, targets: Tensor, present: Tensor | None = None
                  ) -> dict[str, tuple[Tensor, Tensor]]:
        """{layer: (activation (B, C, h, w), relevance (B, K, C, h, w))}, for checks and analysis."""
        activations, relevance, batch = self._run(images, targets, present)
        return {layer: (activations[layer], relevance[layer].view(batch, -1, *relevance[layer].shape[1:]))
                for layer in self.layers}

    def _run(self, images: Tensor, targets: Tensor, present: Tensor | None
             ) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
        """One forward pass with recording hooks, then one relevance sweep."""
        single = targets.dim() == 1
        targets = (targets.unsqueeze(1) if single else targets).to(images.device, torch.long)
        if targets.dim() != 2 or targets.shape[0] != images.shape[0]:
            raise ValueError(f"targets must be (B,) or (B, K) with B={images.shape[0]}, "
                             f"got {tuple(targets.shape)}")
        plan = self._planned
        sweep = Sweep(self.config, self.layers)
        handles = []
        try:
            for node in plan.visited:
                handles += node.attach(sweep)
            for layer, node in plan.captured_nodes.items():
                handles.append(node.module.register_forward_hook(self._capture_hook(sweep, layer)))
            with torch.no_grad():
                logits = self.model(images)
        finally:
            for handle in handles:
                handle.remove()
        if logits.dim() != 2:
            raise ValueError(f"model must return (B, C) logits, got shape {tuple(logits.shape)}")
        if int(targets.max()) >= logits.shape[1] or int(targets.min()) < 0:
            raise ValueError(f"targets must lie in [0, {logits.shape[1]})")
        with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
            b, k = targets.shape
            r = start_relevance(logits, targets, self.config.start, present)
            run(self.tree, r.reshape(b * k, -1), sweep)
        sweep.saved.clear()
        return sweep.activations, sweep.relevance, b

    @staticmethod
    def _capture_hook(sweep: Sweep, layer: str):
        def capture(module: nn.Module, args: Any, output: Tensor) -> None:
            sweep.activations[layer] = output.detach().clone()

        return capture

    def _map(self, activation: Tensor, relevance: Tensor, batch: int) -> Tensor:
        a = as_float(activation)
        if a.dim() != 4:
            raise ValueError(f"Relevance-CAM needs (B, C, h, w) activations, got {tuple(a.shape)}")
        r = relevance.view(batch, -1, *a.shape[1:])
        alpha = r.sum((-2, -1))
        if self.config.weights == "mean":
            alpha = alpha / (a.shape[-2] * a.shape[-1])
        return torch.einsum("bkc,bchw->bkhw", alpha, a)

