"""What the pseudo-mask maps go through after layer fusion: the fine-scale gate and the
erasing-style expansion, as one settings record (both off by default: the maps are then the
fused maps, bit for bit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from torch import Tensor, nn

from wsss.cam.erasing import erase_expand
from wsss.cam.fine import fine_gate


@dataclass(frozen=True)
class MapExpansion:
    """fine_layer: the shallow layer (or "input") whose map gates the fused deep map, taken from
    the same call as the deep layers; fine_power, fine_smooth: the gate's power and smoothing
    window. erase_steps: erasing steps (0 = none); erase_score_floor: the fraction of the class
    score the erased image must keep; erase_threshold: the map level counted as found."""

    fine_layer: Optional[str] = None
    fine_power: float = 1.0
    fine_smooth: int = 1
    erase_steps: int = 0
    erase_score_floor: float = 0.5
    erase_threshold: float = 0.5

    @property
    def active(self) -> bool:
        return self.fine_layer is not None or self.erase_steps > 0

    def cam_layers(self, layers: Sequence[str]) -> list[str]:
        """The layers to compute in one call: the fused ones, then the fine one if not among them."""
        layers = list(layers)
        if self.fine_layer is not None and self.fine_layer not in layers:
            layers.append(self.fine_layer)
        return layers

    def gate(self, fused: Tensor, maps: Mapping[str, Tensor]) -> Tensor:
        """The fused maps gated by the fine layer's map (unchanged without a fine layer)."""
        if self.fine_layer is None:
            return fused
        return fine_gate(fused, maps[self.fine_layer], self.fine_power, self.fine_smooth)

    def apply(
        self,
        fused_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
        model: nn.Module,
        images: Tensor,
        fused: Tensor,
        maps: Mapping[str, Tensor],
        slots: tuple[Tensor, Tensor, Tensor],
    ) -> Tensor:
        """The gated, then expanded, maps (B, K, H, W) of images of one size.

        fused / maps: the fused maps and every computed layer's map of ``images``; slots:
        (targets (B, K), valid (B, K), present (B, C)); ``fused_fn(images, targets (S, 1),
        present (S, C))`` computes the gated fused maps of other (erased) images the same way.
        """
        targets, valid, present = slots
        gated = self.gate(fused, maps)
        if self.erase_steps == 0:
            return gated

        def evidence(erased: Tensor, classes: Tensor, rows: Tensor) -> Tensor:
            return fused_fn(erased, classes[:, None], present[rows])[:, 0]

        return erase_expand(
            evidence,
            model,
            images,
            gated,
            targets,
            valid,
            self.erase_steps,
            self.erase_score_floor,
            self.erase_threshold,
        )
