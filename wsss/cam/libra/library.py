"""Libra-CAM's reference library: per class, the activations of the training images that the
classifier scores lowest among those labelled without the class.

Which of those images may enter is the bound: ``relative`` (the default) takes them from the
lowest ``negative_quantile`` of the class's own scores on its negative images, so a classifier
that ranks at all gets references whatever its score scale; ``absolute`` needs a score below
``bound``, a fixed sigmoid level that does not carry from one classifier to the next."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from wsss.cam.core import named_layers, record_layers
from wsss.cam.libra.filter import check_activation, probabilities

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BOUND_MODES = ("relative", "absolute")


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@dataclasses.dataclass(frozen=True)
class LibrarySettings:
    """What a library is built with. ``as_dict()`` is what a caller stores and compares (with the
    classifier's hash) to decide between reuse and rebuild.

    layers: module names, as in ``model.named_modules()``; references: R per class; bound_mode:
    "relative" (a reference ranks in the lowest ``negative_quantile`` of the class's scores over
    its negative images, at least the single lowest) or "absolute" (its score is below
    ``bound``); activation: "sigmoid" or "softmax" for that score; dtype: storage precision of
    the activations ("float16" halves the memory).
    """

    layers: tuple[str, ...]
    references: int = 30
    bound: float = 0.1
    activation: str = "sigmoid"
    dtype: str = "float32"
    bound_mode: str = "relative"
    negative_quantile: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "layers", (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
        )
        if not self.layers:
            raise ValueError("LibrarySettings needs at least one layer")
        if self.references < 1:
            raise ValueError(f"references must be >= 1, got {self.references}")
        if not 0.0 < self.bound <= 1.0:
            raise ValueError(f"bound must be in (0, 1], got {self.bound}")
        if self.bound_mode not in BOUND_MODES:
            raise ValueError(f"bound_mode must be one of {BOUND_MODES}, got {self.bound_mode!r}")
        if not 0.0 < self.negative_quantile <= 1.0:
            raise ValueError(f"negative_quantile must be in (0, 1], got {self.negative_quantile}")
        check_activation(self.activation)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "references": self.references,
            "bound": self.bound,
            "activation": self.activation,
            "dtype": self.dtype,
            "bound_mode": self.bound_mode,
            "negative_quantile": self.negative_quantile,
        }

    def describe(self) -> str:
        """The bound in words, for messages about classes without references."""
        if self.bound_mode == "absolute":
            return f"scored below bound={self.bound}"
        return f"is labelled without the class (negative_quantile={self.negative_quantile})"


class ReferenceLibrary:
    """Per class, R reference activations at each layer (see the module docstring).

    activations: {layer: (C, R, ch, h, w)}; scores: (C, R) each reference's score for its class,
    +inf on empty slots; indices: (C, R) the reference's position in the batches it was built from
    (-1 on empty slots); classifier_hash: whatever the caller identifies the classifier by.
    ``spec`` is the LibrarySettings, ``settings`` its dict (what ``state_dict()`` stores).
    """

    def __init__(
        self,
        settings: LibrarySettings,
        activations: Mapping[str, Tensor],
        scores: Tensor,
        indices: Tensor,
        classifier_hash: str | None = None,
    ) -> None:
        missing = [layer for layer in settings.layers if layer not in activations]
        if missing:
            raise ValueError(f"library activations lack the layers {missing}")
        shape = tuple(scores.shape)
        for layer in settings.layers:
            if tuple(activations[layer].shape[:2]) != shape or activations[layer].dim() != 5:
                raise ValueError(
                    f"library layer {layer!r}: activations {tuple(activations[layer].shape)} "
                    f"do not match scores {shape} as (C, R, ch, h, w)"
                )
        if tuple(indices.shape) != shape:
            raise ValueError(f"library indices {tuple(indices.shape)} do not match scores {shape}")
        self.spec = settings
        self.activations = {layer: activations[layer] for layer in settings.layers}
        self.scores = scores
        self.indices = indices
        self.classifier_hash = classifier_hash

    @property
    def settings(self) -> dict[str, Any]:
        return self.spec.as_dict()

    @property
    def layers(self) -> tuple[str, ...]:
        return self.spec.layers

    @property
    def num_classes(self) -> int:
        return int(self.scores.shape[0])

    @property
    def counts(self) -> Tensor:
        """(C,) the number of references found per class (<= R)."""
        return torch.isfinite(self.scores).sum(1)

    def to(self, device: torch.device | str) -> ReferenceLibrary:
        return ReferenceLibrary(
            self.spec,
            {k: v.to(device) for k, v in self.activations.items()},
            self.scores.to(device),
            self.indices.to(device),
            self.classifier_hash,
        )

    def state_dict(self) -> dict[str, Any]:
        """Tensors on the CPU plus settings: ``torch.save`` it, ``from_state_dict`` it back."""
        return {
            "settings": self.settings,
            "classifier_hash": self.classifier_hash,
            "scores": self.scores.cpu(),
            "indices": self.indices.cpu(),
            "activations": {k: v.cpu() for k, v in self.activations.items()},
        }

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], device: torch.device | str = "cpu"
    ) -> ReferenceLibrary:
        settings = dict(state["settings"])
        settings["layers"] = tuple(settings["layers"])
        settings.setdefault("bound_mode", "absolute")  # stored before the relative bound existed
        return cls(
            LibrarySettings(**settings),
            {k: v.to(device) for k, v in state["activations"].items()},
            state["scores"].to(device),
            state["indices"].to(device),
            state.get("classifier_hash"),
        )

    def matches(self, settings: LibrarySettings, classifier_hash: str | None) -> bool:
        """Whether this library was built with these settings for this classifier."""
        return self.settings == settings.as_dict() and self.classifier_hash == classifier_hash

    def references(
        self, cls: int, size: tuple[int, int], layer: str, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Class `cls`'s found references at `layer`, (n, ch, *size), resized bilinearly if needed."""
        refs = self.activations[layer][cls, : int(self.counts[cls])].to(dtype)
        if tuple(refs.shape[-2:]) != tuple(size) and refs.shape[0] > 0:
            refs = F.interpolate(refs, size=size, mode="bilinear", align_corners=False)
        return refs


def model_fingerprint(model: nn.Module) -> str:
    """The first 16 hex digits of the sha256 of the model's weights (every state_dict entry,
    sorted by name: the name, then the tensor's bytes). What artefacts computed from a
    classifier (its reference library) are tied to, so a retrained classifier rebuilds them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:16]


def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """(images, labels, sizes or None) from an (images, labels) pair or a data-module dict."""
    if isinstance(batch, Mapping):
        return batch["image"], batch["labels"], batch.get("size")
    images, labels = batch[0], batch[1]
    return images, labels, None


def _size_groups(images: Tensor, sizes: Tensor | None) -> list[tuple[Tensor, Tensor]]:
    """[(indices, images cropped to their true size)] for images padded to a common canvas."""
    if sizes is None:
        return [(torch.arange(images.shape[0]), images)]
    sizes = sizes.cpu().long()
    groups = []
    for h, w in sorted({(int(h), int(w)) for h, w in sizes.tolist()}):
        index = ((sizes[:, 0] == h) & (sizes[:, 1] == w)).nonzero().flatten()
        groups.append((index, images[index.to(images.device), :, :h, :w]))
    return groups


class _LibraryBuilder:
    """Keeps, per class, the R lowest-scoring candidates seen so far; on ties the one seen first.

    Slots are filled in place (no copy of the whole store per batch, so memory stays at the store
    plus one batch); ``finish`` orders each class's references by (score, position)."""

    def __init__(self, settings: LibrarySettings, device: torch.device) -> None:
        self.settings = settings
        self.device = device
        self.dtype = DTYPES[settings.dtype]
        self.scores: Tensor | None = None
        self.indices: Tensor | None = None
        self.activations: dict[str, Tensor] = {}
        self.negatives: Tensor | None = None  # (C,) images seen labelled without each class
        self.seen = 0

    def add(
        self, acts: Mapping[str, Tensor], scores: Tensor, labels: Tensor, positions: Tensor
    ) -> None:
        """acts: {layer: (n, ch, h, w)}; scores (n, C); labels (n, C) multi-hot; positions (n,)."""
        n, c = scores.shape
        r = self.settings.references
        if self.scores is None:
            self.scores = torch.full((c, r), float("inf"), device=self.device)
            self.indices = torch.full((c, r), -1, dtype=torch.long, device=self.device)
            self.negatives = torch.zeros(c, dtype=torch.long, device=self.device)
            for layer, a in acts.items():
                self.activations[layer] = torch.zeros(
                    c, r, *a.shape[1:], dtype=self.dtype, device=self.device
                )
        elif scores.shape[1] != self.scores.shape[0]:
            raise ValueError(
                f"the classifier gave {scores.shape[1]} scores, earlier batches {self.scores.shape[0]}"
            )
        if labels.shape != scores.shape:
            raise ValueError(
                f"labels {tuple(labels.shape)} must be (B, C) multi-hot with C = {c} "
                f"(the classifier's outputs)"
            )
        candidate = labels.to(self.device) < 0.5
        self.negatives += candidate.sum(0)
        if self.settings.bound_mode == "absolute":
            candidate &= scores < self.settings.bound
        if not bool(candidate.any()):
            return
        new = torch.where(candidate, scores, torch.full_like(scores, float("inf"))).T  # (C, n)
        # stored entries come first, so a stable sort keeps them over equal new ones
        kept = torch.sort(torch.cat([self.scores, new], 1), dim=1, stable=True).indices[:, :r]
        incoming = kept >= r
        acts = {layer: self._resized(layer, a) for layer, a in acts.items()}
        for cls in incoming.any(1).nonzero().flatten().tolist():
            rows = kept[cls][incoming[cls]] - r  # batch rows entering the store
            stays = torch.zeros(r, dtype=torch.bool, device=self.device)
            stays[kept[cls][~incoming[cls]]] = True
            free = (~stays).nonzero().flatten()[: len(rows)]  # slots they take
            self.scores[cls, free] = new[cls, rows]
            self.indices[cls, free] = positions.to(self.device)[rows]
            for layer, a in acts.items():
                self.activations[layer][cls, free] = a[rows.to(a.device)].to(self.device)

    def _resized(self, layer: str, a: Tensor) -> Tensor:
        size = self.activations[layer].shape[-2:]
        if a.shape[-2:] != size:
            a = F.interpolate(a.float(), size=size, mode="bilinear", align_corners=False)
        return a.to(self.dtype)

    def finish(self, classifier_hash: str | None) -> ReferenceLibrary:
        if self.scores is None:
            raise ValueError("the reference library got no images")
        # by score, then by position (empty slots, +inf and -1, go last)
        by_position = torch.sort(
            torch.where(self.indices < 0, self.seen, self.indices), dim=1, stable=True
        ).indices
        scores = self.scores.gather(1, by_position)
        order = by_position.gather(1, torch.sort(scores, dim=1, stable=True).indices)
        acts = {}
        for layer, a in self.activations.items():
            acts[layer] = a[torch.arange(a.shape[0], device=a.device)[:, None], order]
        scores, indices = self.scores.gather(1, order), self.indices.gather(1, order)
        if self.settings.bound_mode == "relative":
            beyond = torch.arange(scores.shape[1], device=scores.device) >= self._quota()[:, None]
            scores = scores.masked_fill(beyond, float("inf"))
            indices = indices.masked_fill(beyond, -1)
            acts = {layer: a * ~beyond[:, :, None, None, None] for layer, a in acts.items()}
        return ReferenceLibrary(self.settings, acts, scores, indices, classifier_hash)

    def _quota(self) -> Tensor:
        """(C,) how many of the lowest-scoring negatives each class keeps under the relative
        bound: ceil(negative_quantile * negatives), at least one where a negative exists."""
        quota = torch.ceil(self.negatives.double() * self.settings.negative_quantile).long()
        return torch.where(self.negatives > 0, quota.clamp(min=1), quota)


@torch.no_grad()
def build_library(
    model: nn.Module,
    batches: Iterable[Any],
    settings: LibrarySettings,
    classifier_hash: str | None = None,
    progress: bool = False,
) -> ReferenceLibrary:
    """One pass over `batches` ((images, multi-hot labels) pairs, or data-module dicts with
    "image", "labels" and optionally "size" for padded canvases) collecting, per class, the R
    images the classifier scores lowest among those labelled without the class and inside the
    bound (``settings.bound_mode``: the lowest ``negative_quantile`` of the class's negatives, or
    a score below ``settings.bound``). Images go to the model's device. The model must be in eval mode (a
    training-mode BatchNorm would make the scores depend on the batch). Pass batches without
    random augmentation for a reproducible library."""
    if model.training:
        raise ValueError("build_library: put the model in eval mode first (model.eval())")
    device = device_of(model)
    builder = _LibraryBuilder(settings, device)
    modules = named_layers(model, list(settings.layers))
    iterator = tqdm(batches, desc="Libra reference library", leave=False, disable=not progress)
    for batch in iterator:
        images, labels, sizes = _unpack(batch)
        for index, group in _size_groups(images.to(device), sizes):
            logits, acts = record_layers(model, modules, group, keep_graph=False)
            scores = probabilities(logits, settings.activation)
            builder.add(
                acts, scores, labels[index.to(labels.device)], builder.seen + index.to(device)
            )
        builder.seen += images.shape[0]
    return builder.finish(classifier_hash)


def library_for(
    model: nn.Module,
    batches: Callable[[], Iterable[Any]] | Iterable[Any],
    settings: LibrarySettings,
    classifier_hash: str | None,
    stored: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> tuple[ReferenceLibrary, bool]:
    """The stored library (a ``state_dict()``) when it was built with `settings` for
    `classifier_hash`, else a new one from `batches` (a callable is only called when building).
    Returns (library on the model's device, whether it was built)."""
    if stored is not None:
        library = ReferenceLibrary.from_state_dict(stored, device_of(model))
        if library.matches(settings, classifier_hash):
            return library, False
    source = batches() if callable(batches) else batches
    return build_library(model, source, settings, classifier_hash, progress), True
