"""The conformance checks (wsss.cam.conformance) on a handful of the smallest timm CNNs, one per
problem family; the whole zoo is scripts/cam_conformance.py (table in docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import torch

from wsss.cam.conformance import CONSERVATION_CHECK, check_method, released

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
