"""LibraCAM: base maps against each class's references, filtered by the classifier's masked
scores, optionally calibrated per image."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsss.cam.core import HookedCAM, stacked_gradients, targets_2d
from wsss.cam.libra.filter import (
    calibrate_percentile,
    check_activation,
    filter_and_average,
    probabilities,
)
from wsss.cam.libra.library import ReferenceLibrary
from wsss.cam.postprocess import minmax_normalize


class LibraCAM(HookedCAM):
    """Libra-CAM maps (module docstring) at each layer of ``library``.

    ``cam(images, targets, present=None)``: images (B, ch, H, W) normalised as the classifier
    expects; targets (B,) or (B, K); present, optional (B, C) multi-hot: slots whose class is not
    present get zero maps and cost no masked forwards (the padding slots of
    ``present_targets``). Returns {layer: (B, K, h, w)} maps in [0, 1] (the mean of the kept
    normalised base maps), or at the input size (B, K, H, W) with ``calibrate=True``.

    activation: "sigmoid" (multi-label) or "softmax" for Δ; chunk: masked images per forward.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[str] | str,
        library: ReferenceLibrary,
        activation: str = "sigmoid",
        chunk: int = 64,
        calibrate: bool = False,
    ) -> None:
        super().__init__(model, layers)
        if not isinstance(library, ReferenceLibrary):
            raise TypeError(
                "LibraCAM needs library=ReferenceLibrary (see wsss.cam.libra.build_library)"
            )
        missing = [layer for layer in self.layers if layer not in library.activations]
        if missing:
            raise ValueError(
                f"the reference library has no activations at {missing}; it was built for "
                f"{list(library.layers)}"
            )
        check_activation(activation)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.library = library
        self.activation = activation
        self.chunk = chunk
        self.calibrate = calibrate

    def __call__(
        self, images: Tensor, targets: Tensor, present: Tensor | None = None
    ) -> dict[str, Tensor]:
        targets = targets_2d(targets, images)
        valid = self._valid_slots(targets, present)
        base_maps, ref_valid, base = self.base_maps(images, targets, valid)
        out = {}
        for layer in self.layers:
            normalised = minmax_normalize(base_maps[layer])
            maps, _, _ = filter_and_average(
                self.model,
                images,
                normalised,
                targets,
                base,
                ref_valid[layer],
                self.activation,
                self.chunk,
            )
            if self.calibrate:
                maps = calibrate_percentile(
                    self.model, images, maps, targets, base, valid, self.activation, self.chunk
                )
            out[layer] = maps * valid[:, :, None, None]
        return out

    def _valid_slots(self, targets: Tensor, present: Tensor | None) -> Tensor:
        if present is None:
            return torch.ones_like(targets, dtype=torch.bool)
        if present.dim() != 2 or present.shape[0] != targets.shape[0]:
            raise ValueError(f"present must be (B, C) multi-hot, got {tuple(present.shape)}")
        return present.to(targets.device).bool().gather(1, targets)

    def base_maps(
        self, images: Tensor, targets: Tensor, valid: Tensor | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Raw B_r per layer, (B, K, R, h, w) (before min–max), the (B, K, R) mask of the slots
        holding a reference, and the (B, K) scores of the plain images."""
        targets = targets_2d(targets, images)
        valid = torch.ones_like(targets, dtype=torch.bool) if valid is None else valid.bool()
        if int(targets.max()) >= self.library.num_classes or int(targets.min()) < 0:
            raise ValueError(
                f"targets must be class indices below {self.library.num_classes} "
                "(the library's classes)"
            )
        logits, acts, grads = self.target_gradients(images, targets)  # each target's own logit
        base = probabilities(logits.detach(), self.activation).gather(1, targets)
        counts = self.library.counts.to(targets.device)
        r = self.library.spec.references
        ref_valid = (torch.arange(r, device=targets.device) < counts[targets][..., None]) & valid[
            ..., None
        ]
        empty = valid & (counts[targets] == 0)
        if bool(empty.any()):
            classes = sorted({int(c) for c in targets[empty]})
            raise ValueError(
                f"the reference library has no references for classes {classes}: no "
                f"training image {self.library.spec.describe()}"
            )
        raw, masks = {}, {}
        for i, layer in enumerate(self.layers):
            a = acts[layer].detach().float()  # (B, ch, h, w)
            g = stacked_gradients(grads, i, torch.float32)  # (B, K, ch, h, w)
            raw[layer] = self._layer_base_maps(layer, a, g, targets, valid, r)
            masks[layer] = ref_valid
        return raw, masks, base

    def _layer_base_maps(
        self, layer: str, a: Tensor, g: Tensor, targets: Tensor, valid: Tensor, r: int
    ) -> Tensor:
        b, k, _, h, w = g.shape
        out = a.new_zeros(b, k, r, h, w)
        own = (g * a.unsqueeze(1)).sum(2)  # Σ_k G_k A_k, (B, K, h, w)
        for cls in sorted({int(c) for c in targets[valid]}):
            refs = self.library.references(cls, (h, w), layer).to(a.device)  # (n, ch, h, w)
            pairs = (valid & (targets == cls)).nonzero()  # (P, 2)
            bi, ki = pairs.unbind(1)
            out[bi, ki, : refs.shape[0]] = own[bi, ki, None] - torch.einsum(
                "pchw,rchw->prhw", g[bi, ki], refs
            )
        return out
