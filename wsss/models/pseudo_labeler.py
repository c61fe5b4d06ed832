"""The pseudo-mask stage as Lightning predict: ``PseudoMaskModule`` turns classifier attributions
into label maps, and ``wsss.models.pseudo_writer.PseudoMaskWriter`` writes them, so multi-GPU DDP
comes from Lightning.

Per batch: maps for every class present in each image, all classes in one call, at each scale
(and flipped), fused over layers and scales, then thresholded into a label map. Seeds (fixed
threshold, no ignore band) are written beside the pseudo-masks, so both are scored from files
and a resumed run scores the whole split.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning as L
import torch
from torch import Tensor, nn

from wsss.cam import build_cam
from wsss.cam.expansion import MapExpansion
from wsss.cam.libra import ReferenceLibrary
from wsss.cam.methods import METHODS
from wsss.cam.postprocess import aggregate_scales, fuse_layers
from wsss.pseudo.distribution import (
    confidence_levels,
    distribution_labels,
    ignore_uncertain,
    slot_distribution,
)
from wsss.pseudo.labels import scores_to_labels
from wsss.pseudo.pixels import pixel_mask
from wsss.pseudo.refine import check_refine_method, refine_scores

IMAGE_REFINEMENTS = ("par", "crf")  # refinements the pseudo-mask module applies itself


def present_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C) multi-hot labels -> (B, K) class indices of the present classes, K = the most in any
    image, and a (B, K) validity mask (padding slots repeat class 0 and are invalid)."""
    present = labels > 0.5
    k = max(1, int(present.sum(1).max()))
    order = torch.argsort(present.float(), dim=1, descending=True, stable=True)[:, :k]
    valid = torch.gather(present, 1, order)
    return torch.where(valid, order, torch.zeros_like(order)), valid


class PseudoMaskModule(L.LightningModule):
    """Classifier -> fused maps -> label maps. Run with ``Trainer(inference_mode=False)``."""

    def __init__(
        self,
        model: nn.Module,
        method: str = "relevance",
        layers: Sequence[str] = ("layer4",),
        preset: str = "default",
        layer_weights: Optional[Sequence[float]] = None,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        normalize: str = "centred",
        thresholds: Optional[Tensor] = None,
        seed_threshold: float = 0.25,
        ignore_band: float = 0.0,
        refine: str = "none",
        refine_options: Optional[dict[str, Any]] = None,
        affinity_labels: Optional[str] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        library: Optional[ReferenceLibrary] = None,
        expansion: Optional[MapExpansion] = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.method = method
        self.layers = list(layers)
        self.options: dict[str, Any] = {"preset": preset} if method == "relevance" else {}
        if method == "libra":
            if library is None:
                raise ValueError(
                    "method='libra' needs library= (a ReferenceLibrary built from the training split)"
                )
            self.options["library"] = library
        self.layer_weights = list(layer_weights) if layer_weights is not None else None
        self.scales = list(scales)
        self.flip = flip
        self.normalize = normalize
        num_classes = self._num_outputs(model)
        if thresholds is None:
            thresholds = torch.full((num_classes,), float(seed_threshold))
        self.register_buffer("thresholds", thresholds.float().clone(), persistent=False)
        self.seed_threshold = seed_threshold
        self.ignore_band = ignore_band
        self.refine = check_refine_method(refine)
        self.refine_options = dict(refine_options or {})
        if affinity_labels is not None and affinity_labels not in IMAGE_REFINEMENTS:
            raise ValueError(
                f"affinity_labels={affinity_labels!r}: expected one of {', '.join(IMAGE_REFINEMENTS)}"
            )
        self.affinity_labels = affinity_labels
        self.mean, self.std = mean, std
        self.expansion = expansion or MapExpansion()

    def on_predict_start(self) -> None:
        if "library" in self.options:  # Libra's references beside the model, not copied per batch
            self.options["library"] = self.options["library"].to(self.device)

    @staticmethod
    def _num_outputs(model: nn.Module) -> int:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("the classifier needs a final nn.Linear head")
        return linears[-1].out_features

    def train(self, mode: bool = True) -> "PseudoMaskModule":
        super().train(mode)
        self.model.eval()  # BatchNorm statistics stay frozen whatever Lightning asks
        return self

    def fused_maps(
        self, images: Tensor, labels: Tensor, sizes: Optional[Tensor] = None
    ) -> dict[str, Any]:
        """Maps of the present classes: per layer and fused, (B, K, H, W) each in [0, 1].

        sizes: (B, 2) true (h, w) of images padded to a common canvas (``batch["size"]``). Each
        size group is computed on its own pixels, so padding never enters a map or its
        normalisation (centring would otherwise count it); maps are zero outside each image.
        """
        targets, valid = present_targets(labels)
        present = labels > 0.5
        b, k = targets.shape
        height, width = images.shape[-2:]
        per_layer: dict[str, Tensor] = {}
        groups = self._size_groups(sizes, b, (height, width))
        for index, (h, w) in groups:
            maps = self._layer_maps(images[index, :, :h, :w], targets[index], present[index])
            for name, m in maps.items():
                canvas = per_layer.setdefault(name, m.new_zeros(b, k, height, width))
                canvas[index, :, :h, :w] = m
        fused_layers = {name: per_layer[name] for name in self.layers}
        fused = fuse_layers(fused_layers, (height, width), self.layer_weights)
        if self.expansion.active:  # the gate and the erasing, on each group's own pixels
            for index, (h, w) in groups:
                fused[index, :, :h, :w] = self.expansion.apply(
                    self._fused_group,
                    self.model,
                    images[index, :, :h, :w],
                    fused[index, :, :h, :w],
                    {name: m[index, :, :h, :w] for name, m in per_layer.items()},
                    (targets[index], valid[index], present[index]),
                )
        mask = valid[:, :, None, None].float()
        return {
            "targets": targets,
            "valid": valid,
            "fused": fused * mask,
            "layers": {name: m * mask for name, m in fused_layers.items()},
        }

    def _fused_group(self, images: Tensor, targets: Tensor, present: Tensor) -> Tensor:
        """Fused (and gated) maps of images of one size, from scratch: an erased image's evidence."""
        maps = self._layer_maps(images, targets, present)
        fused = fuse_layers(
            {n: maps[n] for n in self.layers}, images.shape[-2:], self.layer_weights
        )
        return self.expansion.gate(fused, maps)

    def _layer_maps(self, images: Tensor, targets: Tensor, present: Tensor) -> dict[str, Tensor]:
        """Normalised per-layer maps at the images' size, aggregated over scales and flips."""
        kwargs = {"present": present} if METHODS[self.method].takes_present else {}
        layers = self.expansion.cam_layers(self.layers)
        with build_cam(self.method, self.model, layers, **self.options) as cam:
            return aggregate_scales(
                cam,
                images,
                self.scales,
                self.flip,
                targets=targets,
                normalize=self.normalize,
                **kwargs,
            )

    @staticmethod
    def _size_groups(
        sizes: Optional[Tensor], batch: int, canvas: tuple[int, int]
    ) -> list[tuple[Tensor, tuple[int, int]]]:
        """[(indices, (h, w))] of the images sharing each true size; one group without sizes."""
        if sizes is None:
            return [(torch.arange(batch), canvas)]
        sizes = sizes.cpu().long()
        if (
            sizes.shape != (batch, 2)
            or bool((sizes <= 0).any())
            or bool((sizes > torch.tensor(canvas)).any())
        ):
            raise ValueError(
                f"sizes must be (B, 2) = ({batch}, 2) true sizes within the canvas {canvas}, "
                f"got {sizes.tolist()}"
            )
        unique = sorted({(int(h), int(w)) for h, w in sizes.tolist()})
        return [
            (((sizes[:, 0] == h) & (sizes[:, 1] == w)).nonzero().flatten(), (h, w))
            for h, w in unique
        ]

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Any]:
        """Seeds (fixed threshold, no band), then the calibrated distribution over {background,
        present classes}, refined in the image (``refine``: par or crf; the learned affinity
        walk is a stage of its own), labelled, and its uncertain pixels set to 255: those whose
        two best classes are within ``ignore_band`` of each other. Without refinement the labels
        are ``scores_to_labels``'s; with it, ``calibrated`` holds the unrefined masks too.
        ``confidence`` is each pixel's top-two margin of the final distribution (uint8), the
        weight a confidence-weighted segmenter loss gives the pixel."""
        images = batch["image"]
        maps = self.fused_maps(images, batch["labels"], batch.get("size"))
        targets, valid, fused = maps["targets"], maps["valid"], maps["fused"]
        classes = targets + 1  # mask values: 0 = background
        seeds = scores_to_labels(fused, classes, valid, self.seed_threshold, 0.0)
        inside = pixel_mask(batch.get("size"), *fused.shape[-2:], device=fused.device)
        probs = slot_distribution(fused, valid, self.thresholds[targets])
        band = self.ignore_band if self.ignore_band > 0 else None

        def labelled(distribution: Tensor) -> Tensor:
            labels = distribution_labels(distribution, classes, valid)
            return ignore_uncertain(labels, distribution, margin=band, pixel_mask=inside)

        def refined_by(method: str) -> Tensor:
            return refine_scores(
                method,
                probs,
                images,
                valid=inside,
                mean=self.mean,
                std=self.std,
                **self.refine_options,
            )

        out = {
            "seeds": seeds,
            "fused": fused,
            "layers": maps["layers"],
            "targets": targets,
            "valid": valid,
        }
        if self.refine in IMAGE_REFINEMENTS:
            refined = refined_by(self.refine)
            out.update(calibrated=labelled(probs), pseudo=labelled(refined))
            out["confidence"] = confidence_levels(refined)
        else:
            out["pseudo"] = labelled(probs)
            out["confidence"] = confidence_levels(probs)
        if self.affinity_labels is not None:
            out["affinity_labels"] = labelled(refined_by(self.affinity_labels))
        return out
