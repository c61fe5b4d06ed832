"""The conformance checks (wsss.cam.conformance) on a handful of the smallest timm CNNs, one per
problem family; the whole zoo is scripts/cam_conformance.py (table in docs/benchmarks.md)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from wsss.cam.conformance import (
    BATCH_TOLERANCE,
    CONSERVATION_CHECK,
    FLOAT64_BATCH_TOLERANCE,
    check_method,
    released,
)

timm = pytest.importorskip("timm")

C = 6
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
T = torch.tensor([[1, 4], [2, 5]])
METHODS = [CONSERVATION_CHECK, "relevance:default", "gradcam", "liftcam", "libra"]

# (model, its last three stages): TensorFlow "same" padding with hard-swish, an SE-gated RegNet,
# GhostNet (channel cat of cheap ops), CSPNet (split / cat stages), a weight-standardised
# NF-RegNet with its scaled activations, and MobileNet-V3 with hard-swish / hard-sigmoid gates
# (ECA, SE, CBAM and split-attention ResNets are in the script's zoo: larger)
ZOO = [
    ("tf_mobilenetv3_small_100", ["blocks.1", "blocks.3", "blocks.5"]),
    ("regnety_002", ["s2", "s3", "s4"]),
    ("ghostnet_050", ["blocks.3", "blocks.5", "blocks.7"]),
    ("cs3darknet_focus_s", ["stages.1", "stages.2", "stages.3"]),
    ("nf_regnet_b0", ["stages.1", "stages.2", "final_conv"]),
    ("mobilenetv3_small_050", ["blocks.1", "blocks.3", "blocks.5"]),
]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=C).eval()


@pytest.mark.parametrize("name,layers", ZOO, ids=[z[0] for z in ZOO])
def test_every_method_conforms(name, layers):
    model = build(name)
    failures = {}
    for method in METHODS:
        result = check_method(model, method, layers, X, T)
        if not result.passed:
            failures[method] = result.reason
        if method == CONSERVATION_CHECK:
            assert set(result.conservation) == set(layers)
    assert not failures, failures
    assert released(lambda: build(name), "relevance:default", layers, X)


class RoundsByBatch(nn.Module):
    """Scales by 1 + B·u·1e5, u the dtype's unit roundoff: a result that moves with the batch
    size by many units in the last place, as a reduction summed in another order for a batch of
    2 and of 1 does once a cancellation amplifies it. 1e-2 apart in float32, 2e-11 in float64."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one = x.new_ones(())
        eps = torch.nextafter(one, 2 * one) - one  # traceable torch.finfo(x.dtype).eps
        return x * (1 + x.shape[0] * eps * 1e5)


class MixesBatch(nn.Module):
    """Adds the batch mean: each image's output depends on the other images (a real bug)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x.mean(0, keepdim=True)


def tiny_cnn(middle: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 8, 3, padding=1),
            middle=middle,
            act=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(8, C),
        )
    ).eval()


@pytest.mark.parametrize("method", ["gradcam", "liftcam"])
def test_float32_rounding_over_the_batch_bound_is_rerun_in_float64_and_passes(method):
    x = X[:, :, :16, :16]
    result = check_method(tiny_cnn(RoundsByBatch()), method, ["act"], x, T)
    assert result.batch_error > BATCH_TOLERANCE  # float32 alone would fail
    assert result.batch_error_float64 < FLOAT64_BATCH_TOLERANCE
    assert result.batch_rounding and result.passed, result.reason


@pytest.mark.parametrize("method", ["gradcam", "liftcam"])
def test_a_model_that_mixes_the_images_of_a_batch_still_fails_in_float64(method):
    x = X[:, :, :16, :16]
    result = check_method(tiny_cnn(MixesBatch()), method, ["act"], x, T)
    assert result.batch_error_float64 > BATCH_TOLERANCE and not result.batch_rounding
    assert result.reason == (
        f"batched != one by one (rel. {result.batch_error:.1e} in float32, "
        f"{result.batch_error_float64:.1e} in float64)"
    )


def test_no_float64_rerun_when_float32_holds_the_bound():
    result = check_method(tiny_cnn(nn.Identity()), "gradcam", ["act"], X[:, :, :16, :16], T)
    assert result.passed and result.batch_error <= BATCH_TOLERANCE
    assert result.batch_error_float64 != result.batch_error_float64  # NaN: not measured
