"""The conformance checks (wsss.cam.conformance) on a handful of the smallest timm CNNs, one per
problem family; the whole zoo is scripts/cam_conformance.py (table in docs/benchmarks.md)."""

from __future__ import annotations

import re
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
from wsss.cam.libra import LibrarySettings, build_library
from wsss.cam.methods import build_cam

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


class Branches(nn.Module):
    """Returns a list of two maps at two resolutions, as HRNet's stages do."""

    def __init__(self):
        super().__init__()
        self.fine = nn.Conv2d(3, 4, 3, padding=1)
        self.coarse = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.fine(x), self.coarse(x)]


class TwoResolutions(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stage = Branches()
        self.fc = nn.Linear(8, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fine, coarse = self.stage(x)
        return self.fc(torch.cat([fine.mean((2, 3)), coarse.mean((2, 3))], 1))


def test_a_layer_that_returns_a_list_of_maps_is_refused_with_the_reason():
    model, x = TwoResolutions().eval(), X[:, :, :16, :16]
    traced = (
        "ValueError: cannot capture relevance at 'stage': its output is not a single tensor "
        "(e.g. a list of branch maps); request its parent or a neighbouring module"
    )
    hooked = (
        "ValueError: cannot read layer 'stage': its output is a list, not one tensor (e.g. "
        "HRNet's stages return a list of branch maps); request a module that returns one "
        "(B, C, h, w) map"
    )
    for method, reason in [
        ("relevance:default", traced),
        ("liftcam", traced),
        ("gradcam", hooked),
        ("gradcampp", hooked),
        ("libra", hooked),
    ]:
        assert check_method(model, method, ["stage"], x, T).reason == reason, method
    assert check_method(model, "gradcam", ["stage.fine", "stage.coarse"], x, T).passed


class Saturated(nn.Module):
    """Logits of 100 and more: every sigmoid score is exactly 1.0, even in float64 (dla34 with
    random weights saturates the same way)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, C)
        with torch.no_grad():
            self.fc.bias.fill_(100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def test_libra_with_the_absolute_bound_on_saturated_scores_names_the_empty_class():
    """The absolute bound finds no image scored below 1.0 when every score is 1.0: the exact
    message; the relative bound (the conformance check's) still has references and passes."""
    model, x = Saturated().double().eval(), X[:, :, :16, :16].double()
    refs = torch.randn(
        6, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    assert bool((model(refs).sigmoid() == 1.0).all())
    settings = LibrarySettings(("features",), references=3, bound=1.0, bound_mode="absolute")
    library = build_library(model, [(refs, torch.zeros(6, C))], settings)
    message = (
        "the reference library has no references for classes [1, 2, 4, 5]: no training image "
        "scored below bound=1.0"
    )
    with pytest.raises(ValueError, match=re.escape(message) + "$"):
        with build_cam("libra", model, ["features"], library=library) as cam:
            cam(x, T)
    assert check_method(model.float(), "libra", ["features"], X[:, :, :16, :16], T).passed
