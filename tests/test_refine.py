"""Refinement maths: pair labels, the random walk, PAR, the confidence-ignore rule, the dense CRF
behind the common interface."""

import math
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsss.pseudo.labels import scores_to_labels
from wsss.pseudo.refine import (
    CRF_MISSING,
    REFINE_METHODS,
    Affinities,
    affinity_labels,
    crf_probabilities,
    dense_crf,
    distribution_labels,
    downsample_labels,
    ignore_uncertain,
    neighbour_offsets,
    pairwise_affinity,
    par,
    par_affinity,
    pixel_mask,
    random_walk,
    random_walk_refine,
    refine_scores,
    slot_distribution,
    top2_margin,
    transition_weights,
    walk_offsets,
)

torch.set_num_threads(2)


def pairs(seeds, radius, stride=1):
    """{kind: {frozenset({(y, x), (y', x')})}} of the labelled pairs of one seed map."""
    labels = affinity_labels(torch.tensor(seeds)[None], radius, stride)
    offsets = neighbour_offsets(radius)
    out = {}
    for kind in ("bg_pos", "fg_pos", "neg"):
        out[kind] = set()
        for k, y, x in labels[kind][0].nonzero().tolist():
            dy, dx = offsets[k]
            out[kind].add(frozenset({(y, x), (y + dy, x + dx)}))
    return out


def P(a, b):
    return frozenset({a, b})


# ---------------------------------------------------------------------------------------------
# pair labels


def test_offsets_cover_each_pair_once_within_the_radius():
    assert neighbour_offsets(2) == ((0, 1), (1, -1), (1, 0), (1, 1))
    for radius in (2, 3, 5):
        half = set(neighbour_offsets(radius))
        every = {
            (dy, dx)
            for dy in range(-radius, radius + 1)
            for dx in range(-radius, radius + 1)
            if 0 < dy * dy + dx * dx < radius * radius
        }
        assert half | {(-dy, -dx) for dy, dx in half} == every
        assert not half & {(-dy, -dx) for dy, dx in half}
    assert len(neighbour_offsets(5)) == 34
    with pytest.raises(ValueError, match="radius"):
        neighbour_offsets(1)


def test_pair_labels_match_the_hand_computed_list():
    seeds = [[0, 0, 1], [0, 255, 1], [2, 2, 1]]
    got = pairs(seeds, radius=2)  # the 8-neighbourhood
    assert got["bg_pos"] == {P((0, 0), (0, 1)), P((0, 0), (1, 0)), P((0, 1), (1, 0))}
    assert got["fg_pos"] == {P((2, 0), (2, 1)), P((0, 2), (1, 2)), P((1, 2), (2, 2))}
    assert got["neg"] == {
        P((0, 1), (0, 2)),
        P((2, 1), (2, 2)),
        P((1, 0), (2, 0)),
        P((0, 1), (1, 2)),
        P((1, 0), (2, 1)),
        P((1, 2), (2, 1)),
    }
    # every pair touching the 255 cell (1, 1) is ignored: 8 of the 20 pairs
    labelled = got["bg_pos"] | got["fg_pos"] | got["neg"]
    assert len(labelled) == 12 and not any((1, 1) in pair for pair in labelled)


def test_pair_labels_radius_is_a_strict_euclidean_bound():
    # radius 3 adds the pairs at distance 2 and sqrt(8), never 3
    got = pairs([[0, 0, 1], [0, 255, 1], [2, 2, 1]], radius=3)
    assert P((0, 0), (2, 2)) in got["neg"] and P((0, 0), (0, 2)) in got["neg"]
    assert P((0, 2), (2, 2)) in got["fg_pos"] and P((0, 0), (2, 0)) in got["neg"]
    row = pairs([[0, 0, 0, 0]], radius=3)
    assert row["bg_pos"] == {
        P((0, 0), (0, 1)),
        P((0, 1), (0, 2)),
        P((0, 2), (0, 3)),
        P((0, 0), (0, 2)),
        P((0, 1), (0, 3)),
    }  # (0,0)-(0,3) is at 3: out
    assert not row["neg"] and not row["fg_pos"]


def test_seeds_reach_the_feature_grid_by_block_purity():
    seeds = torch.tensor([[[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [0, 3, 255, 1, 2], [0, 0, 1, 1, 2]]])
    assert downsample_labels(seeds, 2).tolist() == [[[0, 1, 255], [255, 255, 255]]]
    # with a stride, pairs are those of the reduced map
    got = affinity_labels(seeds, 2, stride=2)
    assert got["neg"].shape == (1, 4, 2, 3)
    assert int(got["neg"].sum()) == 1 and bool(got["neg"][0, 0, 0, 0])  # cells (0,0)-(0,1): 0 vs 1
    assert not got["bg_pos"].any() and not got["fg_pos"].any()


# ---------------------------------------------------------------------------------------------
# the random walk


def dense_walk(scores, affinity, radius, beta, steps):
    """The walk with an explicit (hw x hw) matrix: A from the pair list (both ways), identity on
    the diagonal, rows normalised, x <- T x."""
    b, c, h, w = scores.shape
    out = []
    for i in range(b):
        a = torch.eye(h * w, dtype=torch.float64)
        for k, (dy, dx) in enumerate(neighbour_offsets(radius)):
            for y in range(h):
                for x in range(w):
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        v = float(affinity[i, k, y, x]) ** beta
                        a[y * w + x, (y + dy) * w + x + dx] = v
                        a[(y + dy) * w + x + dx, y * w + x] = v
        t = a / a.sum(1, keepdim=True)
        x = scores[i].double().reshape(c, -1).T
        for _ in range(steps):
            x = t @ x
        out.append(x.T.reshape(c, h, w))
    return torch.stack(out).float()


def random_affinity(b, h, w, radius, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(b, len(neighbour_offsets(radius)), h, w, generator=gen)


def random_distribution(b, c, h, w, seed=1):
    s = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))
    return s / s.sum(1, keepdim=True)


def test_random_walk_is_the_dense_transition_matrix_walk():
    radius, beta, steps = 3, 2.0, 4
    affinity = random_affinity(2, 5, 6, radius)
    scores = random_distribution(2, 3, 5, 6)
    got = random_walk(scores, affinity, radius, beta=beta, steps=steps)
    assert torch.allclose(got, dense_walk(scores, affinity, radius, beta, steps), atol=1e-5)
    weights = transition_weights(affinity, radius, beta)
    assert weights.shape[1] == len(walk_offsets(radius)) == 2 * len(neighbour_offsets(radius)) + 1
    assert torch.allclose(weights.sum(1), torch.ones(2, 5, 6))


def test_random_walk_keeps_each_pixel_a_distribution_and_mixes():
    affinity = random_affinity(2, 12, 10, 5)
    scores = random_distribution(2, 4, 12, 10)
    out = random_walk(scores, affinity, 5, beta=1.0, steps=20)
    assert torch.allclose(out.sum(1), torch.ones(2, 12, 10), atol=1e-5)
    assert out.min() >= 0
    # it did something: the maps flattened towards their mean
    assert out.std(dim=(2, 3)).max() < 0.5 * scores.std(dim=(2, 3)).min()


def test_identity_affinities_change_nothing():
    scores = random_distribution(2, 3, 9, 7)
    out = random_walk(scores, torch.zeros(2, len(neighbour_offsets(4)), 9, 7), 4, steps=30)
    assert torch.equal(out, scores)


def test_cells_outside_valid_keep_their_scores_and_never_feed_the_others():
    radius = 3
    affinity = random_affinity(1, 8, 8, radius)
    scores = random_distribution(1, 2, 8, 8)
    valid = torch.zeros(1, 8, 8, dtype=torch.bool)
    valid[:, :5, :6] = True
    out = random_walk(scores, affinity, radius, beta=1.0, steps=5, valid=valid)
    assert torch.equal(out[..., ~valid[0]], scores[..., ~valid[0]])
    alone = random_walk(scores[..., :5, :6], affinity[..., :5, :6], radius, beta=1.0, steps=5)
    assert torch.allclose(out[..., :5, :6], alone, atol=1e-6)


def two_regions(h=16, w=16, edge=8):
    """Embedding that is 0 left of the edge and 10 right of it: affinity 1 within, ~0 across."""
    emb = torch.zeros(1, 1, h, w)
    emb[..., edge:] = 10.0
    return emb


def test_random_walk_moves_a_blurred_map_onto_the_edge():
    radius, h, w, edge = 4, 16, 16, 8
    affinity = pairwise_affinity(two_regions(h, w, edge), radius)
    xs = torch.arange(w).float()
    fg = torch.sigmoid((xs - 10.0) / 3.0).expand(1, 1, h, w)  # blurred, centred 2 px too far right
    scores = torch.cat([1 - fg, fg], 1)
    truth = (xs >= edge).expand(h, w)
    before = scores.argmax(1)[0].bool()
    assert not torch.equal(before, truth)
    out = random_walk(scores, affinity, radius, beta=8.0, steps=64)
    assert torch.equal(out.argmax(1)[0].bool(), truth)
    # sharp: the step at the edge holds nearly all of the map's change across the image
    profile = out[0, 1, 0]
    assert profile[edge] - profile[edge - 1] > 0.9 * (profile[-1] - profile[0])


def test_random_walk_refine_works_at_image_resolution_and_ignores_padding():
    radius, stride = 3, 4
    scores = random_distribution(1, 3, 32, 32)
    affinity = random_affinity(1, 8, 8, radius)
    valid = pixel_mask(torch.tensor([[22, 27]]), 32, 32)
    out = random_walk_refine(
        scores, Affinities(affinity, radius, stride), valid=valid, beta=1.0, steps=5
    )
    assert out.shape == scores.shape
    assert torch.equal(out[..., ~valid[0]], scores[..., ~valid[0]])
    crop = random_walk_refine(
        scores[..., :22, :27], Affinities(affinity[..., :6, :7], radius, stride), beta=1.0, steps=5
    )
    assert torch.allclose(out[..., :22, :27], crop, atol=1e-5)
    assert torch.allclose(out.sum(1), torch.ones(1, 32, 32), atol=1e-5)
    with pytest.raises(ValueError, match="ceil"):
        random_walk_refine(scores, Affinities(affinity[..., :7, :], radius, stride))


# ---------------------------------------------------------------------------------------------
# PAR


def square_scene(h=48, w=48, seed=0):
    """An image with a square of its own colour, and a map blurred from a square 4 px too big."""
    gen = torch.Generator().manual_seed(seed)
    square = torch.zeros(h, w, dtype=torch.bool)
    square[14:34, 14:34] = True
    image = torch.where(
        square,
        torch.tensor([0.8, 0.6, 0.2])[:, None, None],
        torch.tensor([0.2, 0.3, 0.4])[:, None, None],
    )
    image = image + 0.03 * torch.randn(3, h, w, generator=gen)
    big = torch.zeros(1, 1, h, w)
    big[..., 10:38, 10:38] = 1.0
    kernel = torch.exp(-(torch.arange(-6, 7.0) ** 2) / 18)
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(F.pad(big, (6, 6, 6, 6), mode="replicate"), kernel.view(1, 1, 1, -1))
    blurred = F.conv2d(blurred, kernel.view(1, 1, -1, 1))
    return image[None], torch.cat([1 - blurred, blurred], 1), square


def iou(a, b):
    return float((a & b).sum()) / float((a | b).sum())


def test_par_snaps_a_blurred_square_to_its_edge():
    image, scores, square = square_scene()
    before = iou(scores.argmax(1)[0] == 1, square)
    out = par(scores, image)
    after = iou(out.argmax(1)[0] == 1, square)
    assert before < 0.6
    assert after - before > 0.35 and after > 0.95
    assert torch.allclose(out.sum(1), torch.ones_like(out[:, 0]), atol=1e-5)
    weights = par_affinity(image)  # each pixel: a convex combination of its 48 neighbours
    assert weights.shape == (1, 48, 48, 48) and weights.min() >= 0
    assert torch.allclose(weights.sum(1), torch.ones(1, 48, 48), atol=1e-5)


def test_par_does_not_care_whether_images_are_normalised():
    image, scores, _ = square_scene()
    plain = par(scores, image * 255)
    normalised = par(scores, (image - torch.tensor([0.4, 0.4, 0.3])[:, None, None]) / 0.2)
    assert torch.allclose(plain, normalised, atol=1e-4)


def test_par_keeps_padding_out():
    image, scores, _ = square_scene()
    canvas_image = F.pad(image, (0, 10, 0, 6), value=5.0)  # padding of a colour of its own
    canvas_scores = F.pad(scores, (0, 10, 0, 6), value=0.5)
    valid = pixel_mask(torch.tensor([[48, 48]]), 54, 58)
    out = par(canvas_scores, canvas_image, valid=valid, dilations=(1, 2, 4), iterations=3)
    alone = par(scores, image, dilations=(1, 2, 4), iterations=3)
    assert torch.allclose(out[..., :48, :48], alone, atol=1e-5)
    assert torch.equal(out[..., ~valid[0]], canvas_scores[..., ~valid[0]])


def test_par_refuses_maps_of_another_size():
    image, scores, _ = square_scene()
    with pytest.raises(ValueError, match="resize the scores"):
        par(scores[..., ::2, ::2], image)


# ---------------------------------------------------------------------------------------------
# distributions, labels and the confidence-ignore rule


def test_slot_distribution_argmax_is_the_label_rule():
    gen = torch.Generator().manual_seed(3)
    fused = torch.rand(3, 4, 6, 5, generator=gen)
    classes = torch.randint(1, 21, (3, 4), generator=gen)
    valid = torch.rand(3, 4, generator=gen) > 0.3
    valid[2] = False
    thresholds = torch.rand(3, 4, generator=gen) * 0.6
    probs = slot_distribution(fused, valid, thresholds)
    assert probs.shape == (3, 5, 6, 5)
    assert torch.allclose(probs.sum(1), torch.ones(3, 6, 5))
    assert (probs[:, 1:][~valid] == 0).all()
    assert torch.equal(
        distribution_labels(probs, classes, valid),
        scores_to_labels(fused, classes, valid, thresholds),
    )


def test_margin_band_and_quantile_band():
    # one image, one class: p(class) along a row; margin |2p - 1|
    p = torch.tensor([0.5, 0.52, 0.6, 0.9, 0.1, 0.45, 1.0, 0.0])
    probs = torch.stack([1 - p, p])[None, :, None, :]
    labels = distribution_labels(probs, torch.tensor([[7]]), torch.tensor([[True]]))
    assert labels.tolist() == [[[0, 7, 7, 7, 0, 0, 7, 0]]]
    assert torch.allclose(top2_margin(probs)[0, 0], (2 * p - 1).abs())
    fixed = ignore_uncertain(labels, probs, margin=0.25)  # margins .0 .04 .2 .8 .8 .1 1 1
    assert fixed.tolist() == [[[255, 255, 255, 7, 0, 255, 7, 0]]]
    quantile = ignore_uncertain(labels, probs, quantile=0.3)  # band 0.112: the 3 least certain
    assert quantile.tolist() == [[[255, 255, 7, 7, 0, 255, 7, 0]]]
    both = ignore_uncertain(labels, probs, margin=0.05, quantile=0.3)  # the smaller band
    assert both.tolist() == [[[255, 255, 7, 7, 0, 0, 7, 0]]]
    assert torch.equal(ignore_uncertain(labels, probs), labels)
    with pytest.raises(ValueError, match="quantile"):
        ignore_uncertain(labels, probs, quantile=1.5)


def test_quantile_band_is_per_image_and_inside_the_pixel_mask():
    gen = torch.Generator().manual_seed(4)
    sharp = torch.rand(1, 40, 40, generator=gen) * 0.2  # p in [0, .2]: confident
    flat = 0.4 + torch.rand(1, 40, 40, generator=gen) * 0.2  # p in [.4, .6]: unsure
    p = torch.cat([sharp, flat])
    probs = torch.stack([1 - p, p], 1)
    labels = torch.zeros(2, 40, 40, dtype=torch.uint8)
    inside = pixel_mask(torch.tensor([[40, 40], [40, 20]]), 40, 40)
    out = ignore_uncertain(labels, probs, quantile=0.25, pixel_mask=inside)
    ignored = out == 255
    assert abs(ignored[0].float().mean() - 0.25) < 0.01
    assert abs(ignored[1, :, :20].float().mean() - 0.25) < 0.02 and not ignored[1, :, 20:].any()
    # a fixed band instead ignores almost nothing in the sharp image and most of the flat one
    fixed = ignore_uncertain(labels, probs, margin=0.3) == 255
    assert fixed[0].float().mean() < 0.01 and fixed[1].float().mean() > 0.9


# ---------------------------------------------------------------------------------------------
# the common interface and the dense CRF


def test_refine_scores_none_and_unknown_method():
    scores = random_distribution(1, 2, 4, 4)
    assert torch.equal(refine_scores("none", scores), scores)
    with pytest.raises(ValueError) as info:
        refine_scores("pamr", scores, torch.zeros(1, 3, 4, 4))
    assert all(name in str(info.value) for name in REFINE_METHODS)
    with pytest.raises(ValueError, match="needs affinities"):
        refine_scores("affinity", scores, torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="needs the images"):
        refine_scores("par", scores)


def test_refine_scores_dispatches_to_par_and_the_walk():
    image, scores, _ = square_scene()
    assert torch.equal(
        refine_scores("par", scores, image, iterations=3), par(scores, image, iterations=3)
    )
    affinities = Affinities(random_affinity(1, 12, 12, 3), 3, 4)
    assert torch.equal(
        refine_scores("affinity", scores, affinities=affinities, steps=3),
        random_walk_refine(scores, affinities, steps=3),
    )


def crf_installed():
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(crf_installed(), reason="pydensecrf2 is installed")
def test_crf_without_the_extra_names_the_extra():
    with pytest.raises(ImportError) as info:
        dense_crf(np.zeros((4, 4, 3), np.uint8), np.ones((2, 4, 4), np.float32))
    assert str(info.value) == CRF_MISSING
    assert "pip install -e '.[crf]'" in CRF_MISSING and "pydensecrf2" in CRF_MISSING
    with pytest.raises(ImportError, match=r"pip install -e '\.\[crf\]'"):
        refine_scores("crf", random_distribution(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))


@pytest.fixture
def fake_crf(monkeypatch):
    """A stand-in for pydensecrf whose 'inference' is the softmax of the unary: checks the
    width/height order, the unary (-log p, flattened per label) and the reshape back to (H, W)."""
    calls = {"rgbim": []}

    class FakeCRF:
        def __init__(self, width, height, labels):
            calls["size"] = (width, height, labels)

        def setUnaryEnergy(self, unary):
            assert unary.dtype == np.float32 and unary.flags["C_CONTIGUOUS"]
            calls["unary"] = unary

        def addPairwiseGaussian(self, **kwargs):
            pass

        def addPairwiseBilateral(self, **kwargs):
            calls["rgbim"].append(kwargs["rgbim"])

        def inference(self, iterations):
            e = np.exp(-calls["unary"])
            return e / e.sum(0, keepdims=True)

    package = types.ModuleType("pydensecrf")
    module = types.ModuleType("pydensecrf.densecrf")
    module.DenseCRF2D = FakeCRF
    package.densecrf = module
    monkeypatch.setitem(sys.modules, "pydensecrf", package)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", module)
    return calls


def test_crf_plumbing_with_a_stand_in_module(fake_crf):
    h, w = 3, 5  # not square, so a swapped width/height shows
    probs = np.random.default_rng(0).random((3, h, w)).astype(np.float32)
    out = dense_crf(np.zeros((h, w), np.uint8), probs)  # grey image is repeated to RGB
    assert fake_crf["size"] == (w, h, 3) and fake_crf["unary"].shape == (3, h * w)
    assert fake_crf["rgbim"][-1].shape == (h, w, 3)
    assert out.shape == (h, w) and np.array_equal(out, probs.argmax(0))
    q = crf_probabilities(np.zeros((h, w, 3), np.uint8), probs)
    assert np.allclose(q, probs / probs.sum(0, keepdims=True), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(L, H, W\)"):
        dense_crf(np.zeros((h, w, 3), np.uint8), probs[:, :, :2])


def test_refine_scores_crf_denormalises_and_crops_each_image(fake_crf):
    scores = random_distribution(2, 3, 6, 8)
    images = torch.full((2, 3, 6, 8), -1.0)  # mean 127, std 64 (0..255 units): colour 63
    valid = pixel_mask(torch.tensor([[6, 8], [4, 5]]), 6, 8)
    out = refine_scores("crf", scores, images, valid=valid, mean=[127.0] * 3, std=[64.0] * 3)
    shapes = [im.shape for im in fake_crf["rgbim"]]
    assert shapes == [(6, 8, 3), (4, 5, 3)]
    assert all(int(im.min()) == int(im.max()) == 63 for im in fake_crf["rgbim"])
    assert torch.allclose(out, scores, atol=1e-5)  # the stand-in returns the normalised unary
    assert math.isclose(float(out.sum(1).mean()), 1.0, abs_tol=1e-5)
