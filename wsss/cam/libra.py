"""Libra-CAM (Lee & Han, IJCAI'22) as an attribution method, batched (ALGORITHMS.md §3).

    library = build_library(model, train_batches, LibrarySettings(layers=("layer4",)))
    with LibraCAM(model, ["layer4"], library=library) as cam:
        maps = cam(images, targets)        # {layer: (B, K, h, w)}

1. **Reference library** (§3.2, not released by the authors; reconstructed). For each class c, the
   R activations (default 30) of training images whose label does not contain c and that the
   classifier scores below ``bound`` for c (sigmoid by default). Among the candidates the R with
   the *lowest* score are kept, ties going to the image seen first, so the library is a
   deterministic function of the classifier and the order of the batches. One forward per batch,
   on the model's device, with the model in eval mode. Every layer of the library stores the same
   images. Activations are stored at the size of the first batch's activation at that layer;
   activations of other sizes are resized to it bilinearly (align_corners=False), and at use time
   the stored references are resized bilinearly to the input's activation size. A class with fewer
   than R candidates keeps what it found (``counts``); its missing slots take no part.
2. **Base maps** (§3.1): B_r(i,j) = Σ_k G_k(i,j)·(A_k(i,j) − A^r_k(i,j)) with G = ∂z_t/∂A the
   gradient of the *target* class's logit at every location, then min–max normalised per reference.
   For a GAP + linear head this is CAM_t(A) − CAM_t(A^r) with CAM_t = (1/hw) Σ_k W_tk A_k.
3. **Filtering** (§3.3): each normalised map, upsampled bilinearly to the input, is multiplied into
   the (normalised) input tensor, so removed pixels take the data set's mean colour; one batched
   forward of these masked copies (in chunks of ``chunk`` images) gives Δ_r = s_t(x ⊙ B̂_r) − s_t(x),
   s = sigmoid (multi-label) or softmax. ``keep_references`` applies the official keep rule and the
   map is the mean of the kept normalised maps (values in [0, 1], at the layer's resolution).
4. Optional per-image **threshold calibration** (``calibrate=True``, §3.4): percentile cuts
   q = 0, 0.1, …, 0.9 of the map at the input size, soft values kept, scored by
   max(0, s_t(x ⊙ M_q) − s_t(x)); the best cut (first on ties) is returned, at the input size.

The official code's known problems, fixed here:
- the gradient is of the top-1 logit (``logits.max()``) while masking and scoring use the label:
  here G is the gradient of each target's own logit (ALGORITHMS §6 item 12);
- the calibration returns the map cut one step (10 %) beyond the cut it scored, and an empty map
  when the best cut is the last one: here the scored cut is returned (§3.4);
- softmax scores for a multi-label classifier: ``activation="sigmoid"`` is the default;
- min–max divides by zero on a constant base map (NaN): a constant map becomes all zeros;
- batch size 1 and one class per image (``squeeze``): here any B and K, all in one gradient pass;
- the library build is not released and the prototype sampled references from the evaluation
  split: here it is built from the batches the caller passes (the training split);
- the deprecated ``register_backward_hook`` on a container: here ``autograd.grad`` on the hooked
  output.

Cost per (image, class, layer): R masked forwards (+10 with ``calibrate``), plus one forward and
one backward per batch shared by all classes and layers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsss.cam.baselines import _LayerCAM, _targets_2d

ACTIVATIONS = ("sigmoid", "softmax")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CALIBRATION_CUTS = tuple(round(0.1 * i, 1) for i in range(10))


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _probabilities(logits: Tensor, activation: str) -> Tensor:
    logits = logits.float()
    return logits.sigmoid() if activation == "sigmoid" else logits.softmax(1)


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# The reference library
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LibrarySettings:
    """What a library is built with. ``as_dict()`` is what a caller stores and compares (with the
    classifier's hash) to decide between reuse and rebuild.

    layers: module names, as in ``model.named_modules()``; references: R per class; bound: a
    candidate's score for the class must be below it; activation: "sigmoid" or "softmax" for that
    score; dtype: storage precision of the activations ("float16" halves the memory).
    """

    layers: tuple[str, ...]
    references: int = 30
    bound: float = 0.1
    activation: str = "sigmoid"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", (self.layers,) if isinstance(self.layers, str) else tuple(self.layers))
        if not self.layers:
            raise ValueError("LibrarySettings needs at least one layer")
        if self.references < 1:
            raise ValueError(f"references must be >= 1, got {self.references}")
        if not 0.0 < self.bound <= 1.0:
            raise ValueError(f"bound must be in (0, 1], got {self.bound}")
        _check_activation(self.activation)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    def as_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "references": self.references, "bound": self.bound,
                "activation": self.activation, "dtype": self.dtype}


class ReferenceLibrary:
    """Per class, R reference activations at each layer (see the module docstring).

    activations: {layer: (C, R, ch, h, w)}; scores: (C, R) each reference's score for its class,
    +inf on empty slots; indices: (C, R) the reference's position in the batches it was built from
    (-1 on empty slots); classifier_hash: whatever the caller identifies the classifier by.
    ``spec`` is the LibrarySettings, ``settings`` its dict (what ``state_dict()`` stores).
    """

    def __init__(self, settings: LibrarySettings, activations: Mapping[str, Tensor], scores: Tensor,
                 indices: Tensor, classifier_hash: str | None = None) -> None:
        missing = [layer for layer in settings.layers if layer not in activations]
        if missing:
            raise ValueError(f"library activations lack the layers {missing}")
        shape = tuple(scores.shape)
        for layer in settings.layers:
            if tuple(activations[layer].shape[:2]) != shape or activations[layer].dim() != 5:
                raise ValueError(f"library layer {layer!r}: activations {tuple(activations[layer].shape)} "
                                 f"do not match scores {shape} as (C, R, ch, h, w)")
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
        return ReferenceLibrary(self.spec, {k: v.to(device) for k, v in self.activations.items()},
                                self.scores.to(device), self.indices.to(device), self.classifier_hash)

    def state_dict(self) -> dict[str, Any]:
        """Tensors on the CPU plus settings: ``torch.save`` it, ``from_state_dict`` it back."""
        return {"settings": self.settings, "classifier_hash": self.classifier_hash,
                "scores": self.scores.cpu(), "indices": self.indices.cpu(),
                "activations": {k: v.cpu() for k, v in self.activations.items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device | str = "cpu") -> ReferenceLibrary:
        settings = dict(state["settings"])
        settings["layers"] = tuple(settings["layers"])
        return cls(LibrarySettings(**settings), {k: v.to(device) for k, v in state["activations"].items()},
                   state["scores"].to(device), state["indices"].to(device), state.get("classifier_hash"))

    def matches(self, settings: LibrarySettings, classifier_hash: str | None) -> bool:
        """Whether this library was built with these settings for this classifier."""
        return self.settings == settings.as_dict() and self.classifier_hash == classifier_hash

    def references(self, cls: int, size: tuple[int, int], layer: str, dtype: torch.dtype = torch.float32
                   ) -> Tensor:
        """Class `cls`'s found references at `layer`, (n, ch, *size), resized bilinearly if needed."""
        refs = self.activations[layer][cls, : int(self.counts[cls])].to(dtype)
        if tuple(refs.shape[-2:]) != tuple(size) and refs.shape[0] > 0:
            refs = F.interpolate(refs, size=size, mode="bilinear", align_corners=False)
        return refs


def model_fingerprint(model: nn.Module) -> str:
    """SHA-1 of the model's parameters and buffers (names, shapes, values): a classifier hash for
    callers that have none (a trained checkpoint's own hash works as well)."""
    digest = hashlib.sha1()
    for name, tensor in list(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


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
        self.seen = 0

    def add(self, acts: Mapping[str, Tensor], scores: Tensor, labels: Tensor, positions: Tensor) -> None:
        """acts: {layer: (n, ch, h, w)}; scores (n, C); labels (n, C) multi-hot; positions (n,)."""
        n, c = scores.shape
        r = self.settings.references
        if self.scores is None:
            self.scores = torch.full((c, r), float("inf"), device=self.device)
            self.indices = torch.full((c, r), -1, dtype=torch.long, device=self.device)
            for layer, a in acts.items():
                self.activations[layer] = torch.zeros(c, r, *a.shape[1:], dtype=self.dtype, device=self.device)
        elif scores.shape[1] != self.scores.shape[0]:
            raise ValueError(f"the classifier gave {scores.shape[1]} scores, earlier batches {self.scores.shape[0]}")
        if labels.shape != scores.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must be (B, C) multi-hot with C = {c} "
                             f"(the classifier's outputs)")
        candidate = (labels.to(self.device) < 0.5) & (scores < self.settings.bound)
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
        by_position = torch.sort(torch.where(self.indices < 0, self.seen, self.indices), dim=1, stable=True).indices
        scores = self.scores.gather(1, by_position)
        order = by_position.gather(1, torch.sort(scores, dim=1, stable=True).indices)
        acts = {}
        for layer, a in self.activations.items():
            acts[layer] = a[torch.arange(a.shape[0], device=a.device)[:, None], order]
        return ReferenceLibrary(self.settings, acts, self.scores.gather(1, order), self.indices.gather(1, order),
                                classifier_hash)


@torch.no_grad()
def build_library(model: nn.Module, batches: Iterable[Any], settings: LibrarySettings,
                  classifier_hash: str | None = None, progress: bool = False) -> ReferenceLibrary:
    """One pass over `batches` ((images, multi-hot labels) pairs, or data-module dicts with
    "image", "labels" and optionally "size" for padded canvases) collecting, per class, the R
    images the classifier scores lowest among those labelled without the class and scored below
    ``settings.bound``. Images go to the model's device. The model must be in eval mode (a
    training-mode BatchNorm would make the scores depend on the batch). Pass batches without
    random augmentation for a reproducible library."""
    from tqdm.auto import tqdm

    if model.training:
        raise ValueError("build_library: put the model in eval mode first (model.eval())")
    device = _device_of(model)
    builder = _LibraryBuilder(settings, device)
    hooks = _LayerCAM(model, list(settings.layers))
    iterator = tqdm(batches, desc="Libra reference library", leave=False, disable=not progress)
    for batch in iterator:
        images, labels, sizes = _unpack(batch)
        for index, group in _size_groups(images.to(device), sizes):
            logits, acts = hooks._forward(group, keep_graph=False)
            scores = _probabilities(logits, settings.activation)
            builder.add(acts, scores, labels[index.to(labels.device)], builder.seen + index.to(device))
        builder.seen += images.shape[0]
    return builder.finish(classifier_hash)


def library_for(model: nn.Module, batches: Callable[[], Iterable[Any]] | Iterable[Any],
                settings: LibrarySettings, classifier_hash: str | None,
                stored: Mapping[str, Any] | None = None, progress: bool = False
                ) -> tuple[ReferenceLibrary, bool]:
    """The stored library (a ``state_dict()``) when it was built with `settings` for
    `classifier_hash`, else a new one from `batches` (a callable is only called when building).
    Returns (library on the model's device, whether it was built)."""
    if stored is not None:
        library = ReferenceLibrary.from_state_dict(stored, _device_of(model))
        if library.matches(settings, classifier_hash):
            return library, False
    source = batches() if callable(batches) else batches
    return build_library(model, source, settings, classifier_hash, progress), True


# --------------------------------------------------------------------------------------------
# Filtering: the keep rule and the masked forwards
# --------------------------------------------------------------------------------------------


def keep_references(delta: Tensor, valid: Tensor | None = None) -> Tensor:
    """The official keep rule (§3.3) on score changes Δ (..., R); returns a bool mask (..., R).

    If some valid Δ_r > 0: keep the positive ones with Δ_r >= mean_P − std_P (population std over
    the positive set P). Otherwise keep those with Δ_r > mean + std over all valid references,
    and all valid references if none qualify. Invalid slots are never kept.
    """
    valid = torch.ones_like(delta, dtype=torch.bool) if valid is None else valid.bool()
    delta = delta.float()

    def mean_std(selected: Tensor) -> tuple[Tensor, Tensor]:
        count = selected.sum(-1, keepdim=True).clamp(min=1)
        mean = torch.where(selected, delta, 0.0).sum(-1, keepdim=True) / count
        var = torch.where(selected, (delta - mean) ** 2, 0.0).sum(-1, keepdim=True) / count
        return mean, var.sqrt()

    positive = valid & (delta > 0)
    mean_p, std_p = mean_std(positive)
    keep_positive = positive & (delta >= mean_p - std_p)
    mean_a, std_a = mean_std(valid)
    above = valid & (delta > mean_a + std_a)
    keep_other = torch.where(above.any(-1, keepdim=True), above, valid)
    return torch.where(positive.any(-1, keepdim=True), keep_positive, keep_other)


@torch.no_grad()
def masked_score_changes(model: nn.Module, images: Tensor, masks: Tensor, targets: Tensor,
                         base: Tensor, valid: Tensor | None = None, activation: str = "sigmoid",
                         chunk: int = 64) -> Tensor:
    """Δ[b, k, n] = s_t(images[b] ⊙ masks[b, k, n]) − base[b, k] for t = targets[b, k].

    images: (B, ch, H, W), already normalised (masking fades to the mean colour); masks
    (B, K, N, h, w) in [0, 1], upsampled bilinearly to H×W chunk by chunk; base (B, K) the scores
    of the plain images. Invalid (b, k, n) (``valid`` (B, K, N)) cost no forward and get Δ = 0.
    At most `chunk` masked images go through the model at once.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    b, k, n = masks.shape[:3]
    valid = torch.ones(b, k, n, dtype=torch.bool, device=masks.device) if valid is None else valid
    delta = torch.zeros(b, k, n, device=images.device)
    rows = valid.nonzero()  # (P, 3): image, slot, candidate
    for start in range(0, rows.shape[0], chunk):
        bi, ki, ni = rows[start:start + chunk].unbind(1)
        mask = masks[bi, ki, ni].unsqueeze(1).float()
        if mask.shape[-2:] != images.shape[-2:]:
            mask = F.interpolate(mask, size=images.shape[-2:], mode="bilinear", align_corners=False)
        probs = _probabilities(model(images[bi] * mask.to(images.dtype)), activation)
        score = probs.gather(1, targets[bi, ki].unsqueeze(1)).squeeze(1)
        delta[bi, ki, ni] = score - base[bi, ki].float()
    return delta


def filter_and_average(model: nn.Module, images: Tensor, candidates: Tensor, targets: Tensor,
                       base: Tensor, valid: Tensor | None = None, activation: str = "sigmoid",
                       chunk: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Libra's filter on any candidate maps: (B, K, N, h, w) in [0, 1] -> (mean of the kept maps
    (B, K, h, w), keep (B, K, N), Δ (B, K, N)). Used on the references' base maps, and usable on
    other candidates (e.g. several layers' maps, ALGORITHMS §3.5 item 7)."""
    delta = masked_score_changes(model, images, candidates, targets, base, valid, activation, chunk)
    keep = keep_references(delta, valid)
    weights = keep.float()[..., None, None]
    mean = (candidates.float() * weights).sum(2) / weights.sum(2).clamp(min=1)
    return mean, keep, delta


def _minmax(maps: Tensor, eps: float = 1e-12) -> Tensor:
    """Per-map min–max over the last two dims; a constant map becomes zeros (the official code
    divides 0 by 0)."""
    low = maps.amin((-2, -1), keepdim=True)
    high = maps.amax((-2, -1), keepdim=True)
    return (maps - low) / (high - low).clamp(min=eps)


@torch.no_grad()
def calibrate_percentile(model: nn.Module, images: Tensor, maps: Tensor, targets: Tensor, base: Tensor,
                         valid: Tensor | None = None, activation: str = "sigmoid", chunk: int = 64,
                         cuts: Sequence[float] = CALIBRATION_CUTS) -> Tensor:
    """Libra's per-image calibration (§3.4) with the off-by-one fixed: for each cut q, the lowest
    ⌊q·N⌋ pixels of the map (upsampled to the input) are zeroed, the rest keep their soft values;
    the cut with the largest max(0, s_t(x ⊙ M_q) − s_t(x)) (the first on ties) is returned.
    maps (B, K, h, w) -> (B, K, H, W)."""
    size = images.shape[-2:]
    maps = maps.float()
    if maps.shape[-2:] != size:
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    b, k = maps.shape[:2]
    pixels = size[0] * size[1]
    order = maps.flatten(-2).argsort(dim=-1, stable=True)  # ascending
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(pixels, device=order.device).expand_as(order))
    rank = rank.view(b, k, *size)
    cut_maps = torch.stack([maps * (rank >= math.floor(q * pixels + 1e-9)) for q in cuts], 2)  # (B, K, Q, H, W)
    slot_valid = None if valid is None else valid[..., None].expand(b, k, len(cuts))
    delta = masked_score_changes(model, images, cut_maps, targets, base, slot_valid, activation, chunk)
    best = delta.clamp(min=0).argmax(-1)  # first maximum
    return cut_maps.gather(2, best[:, :, None, None, None].expand(b, k, 1, *size)).squeeze(2)


# --------------------------------------------------------------------------------------------
# LibraCAM
# --------------------------------------------------------------------------------------------


class LibraCAM(_LayerCAM):
    """Libra-CAM maps (module docstring) at each layer of ``library``.

    ``cam(images, targets, present=None)``: images (B, ch, H, W) normalised as the classifier
    expects; targets (B,) or (B, K); present, optional (B, C) multi-hot: slots whose class is not
    present get zero maps and cost no masked forwards (the padding slots of
    ``present_targets``). Returns {layer: (B, K, h, w)} maps in [0, 1] (the mean of the kept
    normalised base maps), or at the input size (B, K, H, W) with ``calibrate=True``.

    activation: "sigmoid" (multi-label) or "softmax" for Δ; chunk: masked images per forward.
    """

    def __init__(self, model: nn.Module, layers: list[str] | str, library: ReferenceLibrary,
                 activation: str = "sigmoid", chunk: int = 64, calibrate: bool = False) -> None:
        super().__init__(model, layers)
        if not isinstance(library, ReferenceLibrary):
            raise TypeError("LibraCAM needs library=ReferenceLibrary (see wsss.cam.libra.build_library)")
        missing = [layer for layer in self.layers if layer not in library.activations]
        if missing:
            raise ValueError(f"the reference library has no activations at {missing}; it was built for "
                             f"{list(library.layers)}")
        _check_activation(activation)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.library = library
        self.activation = activation
        self.chunk = chunk
        self.calibrate = calibrate

    def __call__(self, images: Tensor, targets: Tensor, present: Tensor | None = None) -> dict[str, Tensor]:
        targets = _targets_2d(targets, images)
        valid = self._valid_slots(targets, present)
        base_maps, ref_valid, base = self.base_maps(images, targets, valid)
        out = {}
        for layer in self.layers:
            normalised = _minmax(base_maps[layer])
            maps, _, _ = filter_and_average(self.model, images, normalised, targets, base,
                                            ref_valid[layer], self.activation, self.chunk)
            if self.calibrate:
                maps = calibrate_percentile(self.model, images, maps, targets, base, valid,
                                            self.activation, self.chunk)
            out[layer] = maps * valid[:, :, None, None]
        return out

    def _valid_slots(self, targets: Tensor, present: Tensor | None) -> Tensor:
        if present is None:
            return torch.ones_like(targets, dtype=torch.bool)
        if present.dim() != 2 or present.shape[0] != targets.shape[0]:
            raise ValueError(f"present must be (B, C) multi-hot, got {tuple(present.shape)}")
        return present.to(targets.device).bool().gather(1, targets)

    def base_maps(self, images: Tensor, targets: Tensor, valid: Tensor | None = None
                  ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Raw B_r per layer, (B, K, R, h, w) (before min–max), the (B, K, R) mask of the slots
        holding a reference, and the (B, K) scores of the plain images."""
        targets = _targets_2d(targets, images)
        valid = torch.ones_like(targets, dtype=torch.bool) if valid is None else valid.bool()
        if int(targets.max()) >= self.library.num_classes or int(targets.min()) < 0:
            raise ValueError(f"targets must be class indices below {self.library.num_classes} "
                             "(the library's classes)")
        with torch.inference_mode(False), torch.enable_grad():
            # clones: tensors made under a caller's inference_mode cannot enter autograd
            x = images.detach().clone().requires_grad_(True)
            index = targets.clone()
            logits, acts = self._forward(x, keep_graph=True)
            tensors = [acts[layer] for layer in self.layers]
            k = targets.shape[1]
            grads = []
            for j in range(k):
                score = logits.gather(1, index[:, j:j + 1]).sum()  # the target's own logit
                grads.append(torch.autograd.grad(score, tensors, retain_graph=j < k - 1))
        base = _probabilities(logits.detach(), self.activation).gather(1, targets)
        counts = self.library.counts.to(targets.device)
        r = self.library.spec.references
        ref_valid = (torch.arange(r, device=targets.device) < counts[targets][..., None]) & valid[..., None]
        empty = valid & (counts[targets] == 0)
        if bool(empty.any()):
            classes = sorted({int(c) for c in targets[empty]})
            raise ValueError(f"the reference library has no references for classes {classes}: no "
                             f"training image scored below bound={self.library.settings['bound']}")
        raw, masks = {}, {}
        for i, layer in enumerate(self.layers):
            a = acts[layer].detach().float()  # (B, ch, h, w)
            g = torch.stack([grads[j][i] for j in range(k)], 1).float()  # (B, K, ch, h, w)
            raw[layer] = self._layer_base_maps(layer, a, g, targets, valid, r)
            masks[layer] = ref_valid
        return raw, masks, base

    def _layer_base_maps(self, layer: str, a: Tensor, g: Tensor, targets: Tensor, valid: Tensor,
                         r: int) -> Tensor:
        b, k, _, h, w = g.shape
        out = a.new_zeros(b, k, r, h, w)
        own = (g * a.unsqueeze(1)).sum(2)  # Σ_k G_k A_k, (B, K, h, w)
        for cls in sorted({int(c) for c in targets[valid]}):
            refs = self.library.references(cls, (h, w), layer).to(a.device)  # (n, ch, h, w)
            pairs = (valid & (targets == cls)).nonzero()  # (P, 2)
            bi, ki = pairs.unbind(1)
            out[bi, ki, : refs.shape[0]] = own[bi, ki, None] - torch.einsum("pchw,rchw->prhw", g[bi, ki], refs)
        return out
