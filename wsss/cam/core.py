"""What every CAM method shares: the calling convention, the context-manager lifetime, the
target handling and, for the methods that read layer outputs with forward hooks, the recording
forward pass and the gradient of each target's logit.

    with SomeCAM(model, layers=["layer3", "layer4"]) as cam:
        maps = cam(images, targets)   # {layer: (B, K, h, w)}

Hooks only exist during a call (removed in a ``finally``, so also after an exception), so a CAM
object never changes what the model computes and leaves nothing behind when it is closed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def check_layer_names(layers: list[str] | str) -> list[str]:
    """The requested layers as a list: at least one, none twice."""
    layers = [layers] if isinstance(layers, str) else list(layers)
    if not layers:
        raise ValueError("at least one layer is needed")
    seen = set()
    for layer in layers:
        if layer in seen:
            raise ValueError(f"layer {layer!r} is listed twice in {layers}")
        seen.add(layer)
    return layers


def targets_2d(targets: Tensor, images: Tensor) -> Tensor:
    """Target classes as a (B, K) LongTensor on the images' device, from (B,) or (B, K)."""
    targets = targets.unsqueeze(1) if targets.dim() == 1 else targets
    if targets.dim() != 2 or targets.shape[0] != images.shape[0]:
        raise ValueError(
            f"targets must be (B,) or (B, K) with B={images.shape[0]}, got {tuple(targets.shape)}"
        )
    return targets.to(images.device, torch.long)


def named_layers(model: nn.Module, layers: list[str]) -> dict[str, nn.Module]:
    """The modules of `layers` by name, as in ``model.named_modules()``."""
    names = dict(model.named_modules())
    missing = [layer for layer in layers if layer not in names]
    if missing:
        raise ValueError(f"model has no module named {missing}")
    return {layer: names[layer] for layer in layers}


def record_layers(
    model: nn.Module, modules: dict[str, nn.Module], images: Tensor, keep_graph: bool
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run the model, returning the logits and the outputs of `modules` ({name: module}).

    Without keep_graph the outputs are detached copies taken when each module returns. With
    keep_graph they are the autograd tensors themselves (for d logit / dA), and the model
    continues on a copy. Either way, in-place ops later in the model cannot change them.
    """
    activations: dict[str, Tensor] = {}

    def hook(name: str):
        def keep(module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
            if not isinstance(output, Tensor):
                raise ValueError(
                    f"cannot read layer {name!r}: its output is a {type(output).__name__}, not "
                    "one tensor (e.g. HRNet's stages return a list of branch maps); request a "
                    "module that returns one (B, C, h, w) map"
                )
            if not keep_graph:
                activations[name] = output.detach().clone()
                return None
            activations[name] = output
            return output.clone()

        return keep

    handles = [module.register_forward_hook(hook(name)) for name, module in modules.items()]
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits, activations


class LayerCAM:
    """The base of every CAM method: the model, the checked layer names and the context
    manager. Subclasses implement ``__call__(images, targets) -> {layer: (B, K, h, w)}``."""

    def __init__(self, model: nn.Module, layers: list[str] | str):
        self.model = model
        self.layers = check_layer_names(layers)

    def __enter__(self) -> "LayerCAM":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Hooks and recorded values never outlive a call, so there is nothing to release."""


class HookedCAM(LayerCAM):
    """A CAM method that reads the layers' outputs through forward hooks during each call."""

    def __init__(self, model: nn.Module, layers: list[str] | str):
        super().__init__(model, layers)
        self.modules = named_layers(model, self.layers)

    def record(self, images: Tensor, keep_graph: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """The logits and the requested layers' outputs (see `record_layers`)."""
        return record_layers(self.model, self.modules, images, keep_graph)

    def target_gradients(
        self, images: Tensor, targets: Tensor
    ) -> tuple[Tensor, dict[str, Tensor], list[tuple[Tensor, ...]]]:
        """One forward with gradients on, whatever the caller's mode, then d logit_t / dA for
        each target slot: (logits, {layer: A}, [per slot k: (dA per layer in self.layers)]).

        The target's own logit is differentiated (not the top-1 class). Gradient methods switch
        gradients on themselves, so they also work under no_grad or inference_mode.
        """
        with torch.inference_mode(False), torch.enable_grad():
            # clones made here are normal tensors even if the caller made them in inference mode
            x = images.detach().clone().requires_grad_(True)
            targets = targets.clone()
            logits, acts = self.record(x, keep_graph=True)
            tensors = [acts[layer] for layer in self.layers]
            k = targets.shape[1]
            grads: list[tuple[Tensor, ...]] = []
            for j in range(k):
                score = logits.gather(1, targets[:, j : j + 1]).sum()
                grads.append(torch.autograd.grad(score, tensors, retain_graph=j < k - 1))
        return logits, acts, grads


def stacked_gradients(grads: list[tuple[Tensor, ...]], index: int, dtype: torch.dtype) -> Tensor:
    """The gradients of layer number `index` for every target slot, (B, K, C, h, w)."""
    return torch.stack([grads[j][index] for j in range(len(grads))], 1).to(dtype)
