"""Libra-CAM (Lee & Han, IJCAI'22) as an attribution method, batched (maths in docs/ALGORITHMS.md).

    library = build_library(model, train_batches, LibrarySettings(layers=("layer4",)))
    with LibraCAM(model, ["layer4"], library=library) as cam:
        maps = cam(images, targets)        # {layer: (B, K, h, w)}

1. **Reference library** (not released by the authors; reconstructed). For each class c, the
   R activations (default 30) of training images whose label does not contain c, inside the
   bound: by default (``bound_mode="relative"``) among the lowest ``negative_quantile`` of the
   class's scores over its N_c negative images (ceil(q·N_c), at least one), or
   (``bound_mode="absolute"``) scored below ``bound`` for c (sigmoid by default). Among the
   candidates the R with the *lowest* score are kept, ties going to the image seen first, so the library is a
   deterministic function of the classifier and the order of the batches. One forward per batch,
   on the model's device, with the model in eval mode. Every layer of the library stores the same
   images. Activations are stored at the size of the first batch's activation at that layer;
   activations of other sizes are resized to it bilinearly (align_corners=False), and at use time
   the stored references are resized bilinearly to the input's activation size. A class with fewer
   than R candidates keeps what it found (``counts``); its missing slots take no part.
2. **Base maps**: B_r(i,j) = Σ_k G_k(i,j)·(A_k(i,j) − A^r_k(i,j)) with G = ∂z_t/∂A the
   gradient of the *target* class's logit at every location, then min–max normalised per reference.
   For a GAP + linear head this is CAM_t(A) − CAM_t(A^r) with CAM_t = (1/hw) Σ_k W_tk A_k.
3. **Filtering**: each normalised map, upsampled bilinearly to the input, is multiplied into
   the (normalised) input tensor, so removed pixels take the data set's mean colour; one batched
   forward of these masked copies (in chunks of ``chunk`` images) gives Δ_r = s_t(x ⊙ B̂_r) − s_t(x),
   s = sigmoid (multi-label) or softmax. ``keep_references`` applies the official keep rule and the
   map is the mean of the kept normalised maps (values in [0, 1], at the layer's resolution).
4. Optional per-image **threshold calibration** (``calibrate=True``): percentile cuts
   q = 0, 0.1, …, 0.9 of the map at the input size, soft values kept, scored by
   max(0, s_t(x ⊙ M_q) − s_t(x)); the best cut (first on ties) is returned, at the input size.

The official code's known problems, fixed here:
- the gradient is of the top-1 logit (``logits.max()``) while masking and scoring use the label:
  here G is the gradient of each target's own logit, so every class gets its own map;
- the calibration returns the map cut one step (10 %) beyond the cut it scored, and an empty map
  when the best cut is the last one: here the scored cut is returned;
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

from wsss.cam.libra.cam import LibraCAM
from wsss.cam.libra.filter import (
    ACTIVATIONS,
    CALIBRATION_CUTS,
    calibrate_percentile,
    check_activation,
    filter_and_average,
    keep_references,
    masked_score_changes,
    probabilities,
)
from wsss.cam.libra.library import (
    BOUND_MODES,
    DTYPES,
    LibrarySettings,
    ReferenceLibrary,
    build_library,
    device_of,
    library_for,
    model_fingerprint,
)

__all__ = [
    "ACTIVATIONS",
    "BOUND_MODES",
    "CALIBRATION_CUTS",
    "DTYPES",
    "LibraCAM",
    "LibrarySettings",
    "ReferenceLibrary",
    "build_library",
    "calibrate_percentile",
    "check_activation",
    "device_of",
    "filter_and_average",
    "keep_references",
    "library_for",
    "masked_score_changes",
    "model_fingerprint",
    "probabilities",
]
