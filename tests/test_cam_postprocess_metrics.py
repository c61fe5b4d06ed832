"""Post-processing of maps and the faithfulness metrics, on closed-form cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsss.cam import (
    NORMALIZATIONS,
    aggregate_scales,
    centred_normalize,
    fuse_layers,
    minmax_normalize,
    normalize_maps,
    relu_max_normalize,
    upsample,
)
from wsss.config import MAP_NORMALIZATIONS, Config
from wsss.metrics import average_drop_increase, class_scores, insertion_deletion_auc


def test_relu_max_normalize():
    m = torch.tensor([[[[-2.0, 1.0], [4.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    out = relu_max_normalize(m)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.25], [1.0, 0.0]]))
    assert (out[1] == 0).all()


def test_minmax_normalize():
    """(M - min) / (max - min) per map, negative evidence kept at the low end (no ReLU); a flat
    map gives zeros, not NaN."""
    m = torch.tensor([[[[-2.0, 1.0], [4.0, 0.0]], [[3.0, 3.0], [3.0, 3.0]]]])
    out = minmax_normalize(m)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.5], [1.0, 2.0 / 6.0]]))
    assert torch.equal(out[0, 1], torch.zeros(2, 2))
    assert torch.equal(normalize_maps(m, "minmax"), out)


def test_centred_normalize_removes_a_positive_floor():
    """A map that is a positive floor plus an object: relu_max keeps the floor (every pixel above
    0.25 would be foreground), centring leaves exactly the object at 1 and the rest at 0."""
    obj = torch.zeros(1, 1, 8, 8)
    obj[..., 2:5, 3:7] = 1.0
    raw = 3.0 + 2.0 * obj
    assert relu_max_normalize(raw).min() == pytest.approx(0.6)
    assert torch.equal(centred_normalize(raw), obj)
    assert torch.equal(normalize_maps(raw, "centred"), obj)
    # shifting a map by a constant changes nothing; a flat map gives all zeros, not NaN
    assert torch.allclose(centred_normalize(raw - 10.0), obj)
    assert torch.equal(centred_normalize(torch.full((1, 1, 4, 4), 7.0)), torch.zeros(1, 1, 4, 4))
    assert set(NORMALIZATIONS) == set(MAP_NORMALIZATIONS)
    with pytest.raises(ValueError, match="centred.*minmax.*relu_max"):
        normalize_maps(raw, "zscore")


def test_aggregate_scales_normalises_each_raw_map_before_summing():
    """Two flips of a floor-plus-object map: centring happens per raw map, before the sum."""
    obj = torch.zeros(1, 1, 6, 6)
    obj[..., 1:3, 0:2] = 1.0

    def maps_fn(images):
        flipped = bool(images[0, 0, 0, 0] < 0)  # the test marks flipped inputs
        return {"layer": 5.0 + (obj.flip(-1) if flipped else obj)}

    images = torch.ones(1, 3, 6, 6)
    images[..., :, 3:] = -1.0  # left half positive: flipped, the top-left pixel is negative
    out = aggregate_scales(maps_fn, images, flip=True, normalize="centred")
    assert torch.equal(out["layer"], obj)
    assert out["layer"].min() == 0 and relu_max_normalize(obj).min() == 0
    plain = aggregate_scales(maps_fn, images, flip=True, normalize="relu_max")  # keeps the floor
    assert plain["layer"].min() > 0.8


def test_fuse_layers_weights():
    a = torch.zeros(1, 1, 2, 2)
    a[..., 0, 0] = 5.0
    b = torch.zeros(1, 1, 4, 4)
    b[..., 3, 3] = 2.0
    fused = fuse_layers({"a": a, "b": b}, (4, 4), weights={"a": 0.0, "b": 1.0})
    torch.testing.assert_close(fused, relu_max_normalize(b))
    both = fuse_layers({"a": a, "b": b}, (4, 4))
    assert both.shape == (1, 1, 4, 4) and float(both.max()) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        fuse_layers({"a": a}, (4, 4), weights=[1.0, 2.0])


def test_aggregate_scales_unflips_and_restores_size():
    """A maps_fn that marks the left-most column: flipped maps must be flipped back."""

    def maps_fn(images):
        m = torch.zeros(images.shape[0], 1, images.shape[-2] // 2, images.shape[-1] // 2)
        m[..., :, 0] = images[:, :1, ::2, 0]  # depends on the image's left column only
        return {"x": m}

    images = torch.zeros(2, 3, 16, 16)
    images[..., :, 0] = 1.0  # left column bright
    out = aggregate_scales(maps_fn, images, scales=[1.0, 0.5, 1.5], flip=True)["x"]
    assert out.shape == (2, 1, 16, 16)
    # un-flipped correctly: the evidence stays on the left, so the left half dominates
    assert out[..., :8].sum() > 5 * out[..., 8:].sum()


def test_aggregate_scales_with_cam_object():
    class FakeCAM:
        def __call__(self, images, targets):
            return {"x": images[:, :1].unsqueeze(1).squeeze(2).repeat(1, targets.shape[1], 1, 1)}

    images = torch.rand(1, 3, 8, 8)
    targets = torch.tensor([[0, 1]])
    out = aggregate_scales(FakeCAM(), images, [1.0], targets=targets, normalize="relu_max")["x"]
    assert out.shape == (1, 2, 8, 8)
    torch.testing.assert_close(out[0, 0], relu_max_normalize(images[:, :1])[0, 0])


def test_normalisation_defaults_to_the_pipelines_centred():
    """normalize_maps and aggregate_scales default to cam.normalize's default (centred), so the
    CAM-only path gives the pipeline's maps; relu_max stays one argument away."""
    raw = torch.rand(2, 3, 5, 5) + 4.0  # a positive floor that only centring removes
    assert Config().cam.normalize == "centred"
    torch.testing.assert_close(normalize_maps(raw), centred_normalize(raw))
    assert not torch.allclose(normalize_maps(raw), normalize_maps(raw, "relu_max"))
    out = aggregate_scales(lambda images: {"x": raw}, torch.zeros(2, 3, 5, 5))["x"]
    torch.testing.assert_close(out, centred_normalize(raw))


def test_upsample_identity_when_same_size():
    m = torch.rand(1, 2, 5, 5)
    assert upsample(m, (5, 5)) is m
    assert upsample(m, (10, 10)).shape == (1, 2, 10, 10)


class MeanBrightness(nn.Module):
    """Logit 0 = mean brightness of the left half, logit 1 = right half, logit 2 = constant."""

    def forward(self, x):
        w = x.shape[-1] // 2
        left, right = x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))
        return torch.stack([left * 10, right * 10, torch.zeros_like(left)], 1)


def test_average_drop_closed_forms():
    model = MeanBrightness()
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) + 0.5
    targets = torch.zeros(4, dtype=torch.long)
    full = torch.ones(4, 8, 8)  # keeps the whole image
    full[:, 0, 0] = 0.999  # not constant (min-max) but ~1
    res = average_drop_increase(model, images, full, targets, activation="sigmoid")
    assert res["drop"] == pytest.approx(0.0, abs=0.5)
    # a map that keeps only the right half: target 0 (left) loses everything
    right = torch.zeros(4, 1, 8, 8)
    right[..., 4:] = 1.0
    res = average_drop_increase(model, images, right, targets[:, None], activation="sigmoid")
    y = class_scores(model, images, targets, activation="sigmoid")[:, 0]
    expected = 100 * ((y - 0.5) / y).mean()  # sigmoid(0) = 0.5 after masking the left half
    assert res["drop"] == pytest.approx(float(expected), rel=1e-5)
    assert res["increase"] == 0.0
    # keeping the left half keeps target 0 exactly: no drop, every image counts as increase
    res = average_drop_increase(
        model, images, 1 - right, targets[:, None], activation="sigmoid", protocol="relevancecam"
    )
    assert res["drop"] == 0.0 and res["increase"] == 100.0


def test_relevancecam_protocol_top_half_and_divisor():
    model = MeanBrightness()
    images = torch.ones(2, 3, 4, 4)
    maps = torch.arange(16.0).view(1, 1, 4, 4).repeat(2, 1, 1, 1)  # right columns brighter
    targets = torch.tensor([[0], [1]])
    res = average_drop_increase(
        model, images, maps, targets, protocol="relevancecam", activation="softmax"
    )
    # top 50% strict: the bottom two rows survive with their soft values
    soft = (torch.arange(16.0).view(4, 4) / 15) * (torch.arange(16.0).view(4, 4) > 7.5)
    masked = images * soft
    y = class_scores(model, images, targets[:, 0])[:, 0]
    o = class_scores(model, masked, targets[:, 0])[:, 0]
    d = (y - o).clamp(min=0) / y
    n_drop = int(((y - o) > 0).sum())
    assert res["drop"] == pytest.approx(100 * float(d.sum()) / n_drop, rel=1e-5)
    assert res["increase"] == pytest.approx(100 * (1 - n_drop / 2))


def test_insertion_deletion_auc_closed_form():
    model = MeanBrightness()
    images = torch.zeros(1, 1, 4, 4)
    images[..., :2] = 1.0  # left half bright, target 0 depends on it
    good = torch.zeros(1, 1, 4, 4)
    good[..., :2] = 1.0
    good = good + torch.arange(16.0).view(1, 1, 4, 4) * 1e-3  # strict order within halves
    bad = 1.0 - good
    t = torch.tensor([0])
    kw = dict(activation="sigmoid", steps=4)
    del_good = insertion_deletion_auc(model, images, good, t, mode="deletion", **kw)
    del_bad = insertion_deletion_auc(model, images, bad, t, mode="deletion", **kw)
    assert float(del_good) < float(del_bad)
    ins_good = insertion_deletion_auc(
        model, images, good, t, mode="insertion", baseline="zero", **kw
    )
    ins_bad = insertion_deletion_auc(model, images, bad, t, mode="insertion", baseline="zero", **kw)
    assert float(ins_good) > float(ins_bad)
    # deletion with the right half first: the score stays at sigmoid(10) for two of four steps
    s_full, s_half, s_zero = torch.sigmoid(torch.tensor([10.0, 5.0, 0.0]))
    expected = (s_full / 2 + s_full + s_full + s_half + s_zero / 2) / 4
    assert float(del_bad) == pytest.approx(float(expected), rel=1e-5)


def test_insertion_from_the_blurred_baseline_by_hand():
    """insertion's default baseline is the blurred image: a uniform image blurs to itself, so
    the curve is flat at the image's score; a half-bright image starts from its blur."""
    from wsss.metrics.faithfulness import _blur

    model = MeanBrightness()
    t = torch.tensor([0])
    uniform = torch.full((1, 1, 8, 8), 0.5)
    saliency = torch.arange(64.0).view(1, 1, 8, 8)
    flat = insertion_deletion_auc(
        model, uniform, saliency, t, activation="sigmoid", steps=4, mode="insertion"
    )
    assert float(flat) == pytest.approx(float(torch.sigmoid(model(uniform))[0, 0]), rel=1e-6)
    images = torch.zeros(1, 1, 8, 8)
    images[..., :4] = 1.0
    blurred = _blur(images)
    assert not torch.allclose(blurred, images) and float(blurred.mean()) == pytest.approx(
        0.5, abs=1e-6
    )
    nothing_inserted = insertion_deletion_auc(
        model, images, saliency, t, activation="sigmoid", steps=1, mode="insertion"
    )
    start, end = torch.sigmoid(model(blurred))[0, 0], torch.sigmoid(model(images))[0, 0]
    assert float(nothing_inserted) == pytest.approx(float(start + end) / 2, rel=1e-5)
