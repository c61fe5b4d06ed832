"""Libra-CAM: closed-form base maps, the library's contents, the keep rule, batching."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsss.cam import build_cam, minmax_normalize
from wsss.cam.libra import (
    LibraCAM,
    LibrarySettings,
    ReferenceLibrary,
    build_library,
    calibrate_percentile,
    keep_references,
    library_for,
    model_fingerprint,
)

C = 5


def small_net() -> nn.Module:
    """conv-relu-pool-conv-bn-relu-GAP-linear: layer "5" feeds a linear head."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, C),
    )
    with torch.no_grad():
        net[4].running_mean.uniform_(-0.2, 0.2)
        net[4].running_var.uniform_(0.5, 1.5)
    return net.eval()


def random_library(
    model: nn.Module, r: int = 6, size: tuple[int, int] = (8, 8), counts=None, seed: int = 1
) -> ReferenceLibrary:
    """A library of random non-negative activations at layer "5" (16 channels)."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(C, r, 16, *size, generator=g)
    scores = torch.rand(C, r, generator=g) * 0.05
    if counts is not None:
        for cls, n in enumerate(counts):
            scores[cls, n:] = float("inf")
    indices = torch.where(torch.isfinite(scores), torch.arange(C * r).view(C, r), -1)
    return ReferenceLibrary(LibrarySettings(("5",), references=r), {"5": acts}, scores, indices)


def official_keep(delta: np.ndarray) -> np.ndarray:
    """The keep rule as Libra_cam.py writes it, for one vector (numpy, population std)."""
    positive = np.maximum(delta, 0) > 0
    keep = np.zeros(len(delta), dtype=bool)
    if positive.sum():
        values = delta[positive]
        chosen = values >= values.mean() - values.std()
        keep[np.flatnonzero(positive)[chosen]] = True
        return keep
    chosen = delta > delta.mean() + delta.std()
    return chosen if chosen.sum() else np.ones(len(delta), dtype=bool)


X = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_base_map_is_cam_difference_for_a_linear_head():
    model = small_net()
    library = random_library(model)
    with torch.no_grad():
        logits = model(X)
        a = model[:6](X)  # (2, 16, 8, 8)
    # second-ranked and last-ranked classes: the official top-1 gradient would be wrong here
    order = logits.argsort(1, descending=True)
    targets = torch.stack([order[:, 1], order[:, -1]], 1)
    with LibraCAM(model, "5", library=library) as cam:
        raw, valid, base = cam.base_maps(X, targets)
    hw = 64
    for b in range(2):
        for k in range(2):
            t = int(targets[b, k])
            w = model[8].weight[t].detach()
            cam_x = torch.einsum("c,chw->hw", w, a[b]) / hw
            cam_refs = torch.einsum("c,rchw->rhw", w, library.activations["5"][t]) / hw
            torch.testing.assert_close(raw["5"][b, k], cam_x - cam_refs, rtol=1e-4, atol=1e-6)
    assert bool(valid["5"].all())
    torch.testing.assert_close(base, logits.sigmoid().gather(1, targets))


def test_references_of_another_size_are_resized_bilinearly():
    model = small_net()
    library = random_library(model, size=(4, 4))
    t = torch.tensor([2, 3])
    with torch.no_grad():
        a = model[:6](X)
    with LibraCAM(model, "5", library=library) as cam:
        raw, _, _ = cam.base_maps(X, t)
    refs = F.interpolate(
        library.activations["5"][2], size=(8, 8), mode="bilinear", align_corners=False
    )
    w = model[8].weight[2].detach()
    want = (torch.einsum("c,chw->hw", w, a[0]) - torch.einsum("c,rchw->rhw", w, refs)) / 64
    torch.testing.assert_close(raw["5"][0, 0], want, rtol=1e-4, atol=1e-6)


def test_libra_map_is_mean_of_kept_normalised_maps_one_forward_each():
    """End to end for one (image, class), each masked copy forwarded alone."""
    model = small_net()
    library = random_library(model, r=8)
    x, t = X[:1], torch.tensor([3])
    with LibraCAM(model, ["5"], library=library, chunk=3) as cam:
        got = cam(x, t)["5"][0, 0]
        raw, _, _ = cam.base_maps(x, t)
    with torch.no_grad():
        base = torch.sigmoid(model(x))[0, 3]
        maps = []
        deltas = []
        for r in range(8):
            m = raw["5"][0, 0, r]
            m = (m - m.min()) / (m.max() - m.min())
            maps.append(m)
            up = F.interpolate(m[None, None], size=(16, 16), mode="bilinear", align_corners=False)
            deltas.append(float(torch.sigmoid(model(x * up))[0, 3] - base))
    keep = official_keep(np.array(deltas))
    want = torch.stack([maps[r] for r in np.flatnonzero(keep)]).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_batched_equals_per_image_per_class():
    model = small_net()
    library = random_library(model, counts=[6, 6, 3, 6, 6])  # class 2 has only 3 references
    targets = torch.tensor([[2, 4], [0, 2]])
    with build_cam("libra", model, ["2", "5"], library=_two_layers(library), chunk=5) as cam:
        batched = cam(X, targets)
        for b in range(2):
            for k in range(2):
                single = cam(X[b : b + 1], targets[b, k : k + 1])
                for layer in ("2", "5"):
                    torch.testing.assert_close(
                        batched[layer][b, k], single[layer][0, 0], rtol=1e-5, atol=1e-6
                    )
        # a slot whose class is absent gets a zero map and leaves the others unchanged
        present = torch.zeros(2, C, dtype=torch.bool)
        present[0, [2, 4]] = True
        present[1, 2] = True
        partial = cam(X, targets, present=present)
    assert float(partial["5"][1, 0].abs().max()) == 0.0
    torch.testing.assert_close(partial["5"][1, 1], batched["5"][1, 1])
    torch.testing.assert_close(partial["2"][0], batched["2"][0])


def _two_layers(library: ReferenceLibrary) -> ReferenceLibrary:
    """The same library with random references at layer "2" (8 channels, 8x8) added."""
    g = torch.Generator().manual_seed(5)
    acts = {
        "5": library.activations["5"],
        "2": torch.rand(C, library.scores.shape[1], 8, 8, 8, generator=g),
    }
    return ReferenceLibrary(
        LibrarySettings(("2", "5"), references=library.scores.shape[1]),
        acts,
        library.scores,
        library.indices,
    )


def test_keep_rule_hand_made_deltas():
    delta = torch.tensor(
        [
            [
                0.5,
                0.4,
                0.01,
                -0.1,
            ],  # positives {0.5, 0.4, 0.01}: mean 0.303, std 0.211 -> 0.01 dropped
            [-0.01, -0.5, -0.4, -0.45],  # none positive: mean + std = -0.146 -> only -0.01
            [-0.1, -0.5, -0.2, -0.15],  # none positive, none above mean + std = -0.082 -> all
            [0.0, 0.0, 0.0, 0.0],  # no change at all -> all
        ]
    )
    want = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(keep_references(delta), want)
    # invalid slots take no part: the 9.0 would otherwise be the only positive kept
    masked = keep_references(
        torch.tensor([0.5, 0.4, 0.01, 9.0]), torch.tensor([True, True, True, False])
    )
    assert masked.tolist() == [True, True, False, False]
    # against the official code's rule on random vectors, some with no positive value
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(200, 30, generator=g) * 0.1 - torch.rand(200, 1, generator=g) * 0.3
    ours = keep_references(rows)
    for row, got in zip(rows, ours):
        assert got.tolist() == official_keep(row.numpy().astype(np.float64)).tolist()


class ChannelMeans(nn.Module):
    """logit_c = 10 · mean(x_c) − 5: each image's scores are set by its channel means."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 3, 1, bias=False)
        self.head = nn.Linear(3, 3)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
            self.head.weight.copy_(10 * torch.eye(3))
            self.head.bias.fill_(-5.0)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def toy_data(n: int = 40):
    g = torch.Generator().manual_seed(3)
    means = torch.rand(n, 3, generator=g)
    images = means[:, :, None, None] * (0.5 + torch.rand(n, 3, 4, 4, generator=g))
    labels = (torch.rand(n, 3, generator=g) < 0.4).float()
    return images, labels


def test_library_holds_the_lowest_scored_absent_images_below_the_bound():
    model = ChannelMeans().eval()
    images, labels = toy_data()
    settings = LibrarySettings(("features",), references=4, bound=0.2, bound_mode="absolute")
    batches = [(images[i : i + 8], labels[i : i + 8]) for i in range(0, 40, 8)]
    library = build_library(model, batches, settings)
    with torch.no_grad():
        scores = model(images).sigmoid()
    for c in range(3):
        candidates = [
            (float(scores[i, c]), i) for i in range(40) if labels[i, c] == 0 and scores[i, c] < 0.2
        ]
        want = [i for _, i in sorted(candidates)[:4]]
        n = int(library.counts[c])
        assert n == min(4, len(candidates)) and n > 0
        got = library.indices[c, :n].tolist()
        assert got == want
        assert bool((library.scores[c, :n] < 0.2).all()) and bool((labels[got, c] == 0).all())
        torch.testing.assert_close(library.activations["features"][c, :n], images[got])
    # data-module dicts with padded canvases: each image is cropped to its true size first
    padded = torch.zeros(40, 3, 6, 6)
    padded[:, :, :4, :4] = images
    dicts = [
        {
            "image": padded[i : i + 8],
            "labels": labels[i : i + 8],
            "size": torch.tensor([[4, 4]] * 8),
        }
        for i in range(0, 40, 8)
    ]
    again = build_library(model, dicts, settings)
    assert torch.equal(again.indices, library.indices)
    # equal scores: the images seen first are kept, whatever the batch boundaries
    same = images[:1].expand(7, -1, -1, -1)
    tied = build_library(
        model,
        [(same[i : i + 3], torch.zeros(len(same[i : i + 3]), 3)) for i in range(0, 7, 3)],
        LibrarySettings(("features",), references=4, bound=1.0, bound_mode="absolute"),
    )
    assert tied.indices.tolist() == [[0, 1, 2, 3]] * 3


def test_relative_bound_takes_the_lowest_quantile_of_each_class_negatives():
    """bound_mode="relative": per class, the lowest ceil(q * N_c) negatives (at most R), ordered
    by score, whatever the score scale; a classifier scoring every image above 0.5 still gets
    references, where the absolute bound finds none."""
    model = ChannelMeans().eval()
    with torch.no_grad():
        model.head.bias.fill_(5.0)  # every sigmoid score above 0.99
    images, labels = toy_data()
    with torch.no_grad():
        scores = model(images).sigmoid()
    assert bool((scores > 0.5).all())
    batches = [(images[i : i + 8], labels[i : i + 8]) for i in range(0, 40, 8)]
    for q, r in [(0.5, 30), (0.1, 30), (1.0, 4)]:
        settings = LibrarySettings(("features",), references=r, negative_quantile=q)
        library = build_library(model, batches, settings)
        for c in range(3):
            negatives = sorted((float(scores[i, c]), i) for i in range(40) if labels[i, c] == 0)
            quota = min(r, max(1, math.ceil(q * len(negatives))))
            n = int(library.counts[c])
            assert n == quota
            assert library.indices[c, :n].tolist() == [i for _, i in negatives[:quota]]
            assert bool((library.indices[c, n:] == -1).all())
            assert bool((library.activations["features"][c, n:] == 0).all())
    absolute = build_library(
        model, batches, LibrarySettings(("features",), bound=0.5, bound_mode="absolute")
    )
    assert absolute.counts.tolist() == [0, 0, 0]


def test_relative_bound_is_empty_only_without_negative_images():
    model = ChannelMeans().eval()
    images, labels = toy_data(8)
    labels[:, 1] = 1.0  # every image holds class 1
    library = build_library(
        model, [(images, labels)], LibrarySettings(("features",), negative_quantile=0.01)
    )
    assert library.counts[1] == 0 and bool((library.counts[[0, 2]] == 1).all())
    with pytest.raises(ValueError, match=r"no references for classes \[1\]: no training image is "):
        with LibraCAM(model, "features", library=library) as cam:
            cam(images[:1], torch.tensor([1]))


def test_library_settings_refuse_an_unknown_bound_mode_or_quantile():
    with pytest.raises(ValueError, match="bound_mode must be one of"):
        LibrarySettings(("features",), bound_mode="percent")
    with pytest.raises(ValueError, match="negative_quantile must be in"):
        LibrarySettings(("features",), negative_quantile=0.0)


def test_a_library_stored_before_the_relative_bound_loads_as_absolute():
    model = ChannelMeans().eval()
    images, labels = toy_data()
    settings = LibrarySettings(("features",), references=3, bound=0.3, bound_mode="absolute")
    state = build_library(model, [(images, labels)], settings).state_dict()
    for key in ("bound_mode", "negative_quantile"):
        del state["settings"][key]
    assert ReferenceLibrary.from_state_dict(state).spec.bound_mode == "absolute"


def test_library_reused_only_for_the_same_classifier_and_settings():
    model = ChannelMeans().eval()
    images, labels = toy_data()
    settings = LibrarySettings(("features",), references=3, bound=0.3)
    batches = [(images, labels)]
    first, built = library_for(model, batches, settings, model_fingerprint(model))
    assert built
    stored = first.state_dict()
    restored = ReferenceLibrary.from_state_dict(stored)
    assert restored.settings == settings.as_dict() and torch.equal(restored.indices, first.indices)

    def fail():
        raise AssertionError("the data must not be read when the library is reused")

    same, built = library_for(model, fail, settings, model_fingerprint(model), stored)
    assert not built and torch.equal(same.activations["features"], first.activations["features"])
    changed = ChannelMeans().eval()
    with torch.no_grad():
        changed.head.bias[1] = -3.0  # another classifier: other scores, maybe other references
    assert model_fingerprint(changed) != model_fingerprint(model)
    _, built = library_for(changed, lambda: batches, settings, model_fingerprint(changed), stored)
    assert built
    _, built = library_for(
        model,
        lambda: batches,
        LibrarySettings(("features",), references=2, bound=0.3),
        model_fingerprint(model),
        stored,
    )
    assert built


def test_calibration_returns_the_cut_it_scored():
    """The score rises as pixels are removed, so the best cut is the last (90 %): the official
    code would return an empty map (100 % zeroed)."""
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]]))
        model[2].bias.zero_()
    images = torch.ones(1, 3, 10, 10)
    maps = torch.randperm(100).float().view(1, 1, 10, 10) / 99
    with torch.no_grad():
        base = model(images).sigmoid()[:, :1]
    out = calibrate_percentile(model, images, maps, torch.tensor([[0]]), base)
    assert int((out > 0).sum()) == 10
    torch.testing.assert_close(out[out > 0].sort().values, maps[maps >= 90 / 99].sort().values)


def test_errors_name_the_problem():
    model = small_net()
    with pytest.raises(TypeError, match="library"):
        build_cam("libra", model, ["5"])
    with pytest.raises(ValueError, match="no activations at"):
        LibraCAM(model, ["2"], library=random_library(model))
    library = random_library(model, counts=[6, 0, 6, 6, 6])
    with pytest.raises(ValueError, match="no references for classes \\[1\\]"):
        with LibraCAM(model, ["5"], library=library) as cam:
            cam(X, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="eval mode"):
        build_library(small_net().train(), [(X, torch.zeros(2, C))], LibrarySettings(("5",)))


def test_minmax_of_a_constant_map_is_zero():
    assert float(minmax_normalize(torch.full((1, 1, 3, 3), 2.0)).abs().max()) == 0.0


def test_cost_is_one_forward_plus_r_masked_copies_per_present_slot():
    from wsss.metrics import ForwardCounter

    model = small_net()
    library = random_library(model, r=6, counts=[6, 6, 4, 6, 6])
    present = torch.zeros(2, C, dtype=torch.bool)
    present[0, [0, 2]] = True
    present[1, 2] = True
    with ForwardCounter(model) as counter, LibraCAM(model, "5", library=library, chunk=4) as cam:
        cam(X, torch.tensor([[0, 2], [2, 0]]), present=present)  # slot (1, 1) is padding
    assert counter.images == 2 + 6 + 4 + 4


def test_same_maps_under_inference_mode():
    """The pseudo stage may call it under a caller's inference_mode or no_grad."""
    model = small_net()
    with LibraCAM(model, "5", library=random_library(model), calibrate=True) as cam:
        plain = cam(X, torch.tensor([1, 2]))["5"]
        with torch.inference_mode():
            inside = cam(X, torch.tensor([1, 2]))["5"]
    assert plain.shape == (2, 1, 16, 16)  # calibrated maps come at the input size
    assert torch.equal(plain, inside)
