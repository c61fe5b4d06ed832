"""Libra-CAM's five metrics (AUC, API, APD, IR, DR) on a toy classifier, computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from wsss.metrics import libra_metrics, libra_scores, libra_summary


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def toy():
    """Three pixels; logit_c = w_c · x. With x = 1 and the map M = [1, 0.5, 0], x ⊙ M = [1, .5, 0]:
    class 0 drops (4 -> 2.5), class 1 rises (0 -> 0.5), class 2 ties (3 -> 3)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[2.0, 1.0, 1.0], [2.0, -3.0, 1.0], [2.0, 2.0, -1.0]]))
    images = torch.ones(1, 1, 1, 3)
    maps = torch.tensor([1.0, 0.5, 0.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    return model.eval(), images, maps, torch.tensor([[0, 1, 2]])


def test_five_metrics_by_hand():
    model, images, maps, targets = toy()
    y = [sig(4), sig(0), sig(3)]
    o = [sig(2.5), sig(0.5), sig(3)]
    got = libra_metrics(model, images, maps, targets, activation="sigmoid", steps=3)
    assert got["api"] == pytest.approx(((o[1] - y[1]) / y[1]) / 3, rel=1e-5)
    assert got["apd"] == pytest.approx(((y[0] - o[0]) / y[0]) / 3, rel=1e-5)
    assert got["ir"] == pytest.approx(1 / 3)
    assert got["dr"] == pytest.approx(1 / 3)  # the tie counts in neither: IR + DR = 2/3
    # kept fraction 0, 1/3, 2/3, 1: black (sigmoid 0) -> pixel 0 only -> x ⊙ M -> x ⊙ M (pixel 2 has M = 0)
    aucs = [(0.5 + sig(2)) / 2 + (sig(2) + oc) / 2 + oc for oc in o]
    assert got["auc"] == pytest.approx(sum(a / 3 for a in aucs) / 3, rel=1e-5)
    per_pair = libra_scores(model, images, maps, targets, activation="sigmoid", steps=3)
    torch.testing.assert_close(per_pair["auc"][0], torch.tensor([a / 3 for a in aucs]))
    torch.testing.assert_close(per_pair["score"][0], torch.tensor(y))
    torch.testing.assert_close(per_pair["masked"][0], torch.tensor(o))
    # selecting the tied pair alone
    only_tie = libra_summary(per_pair, torch.tensor([[False, False, True]]))
    assert only_tie == {
        "auc": pytest.approx(aucs[2] / 3),
        "api": 0.0,
        "apd": 0.0,
        "ir": 0.0,
        "dr": 0.0,
    }


def test_auc_rewards_the_right_order_and_normalize_is_applied_after_masking():
    model, images, maps, targets = toy()
    # class 0 has positive weights everywhere; ranking pixel 0 (weight 2) first beats ranking it last
    right = libra_scores(
        model, images, torch.tensor([[[[1.0, 0.5, 0.0]]]]), targets[:, :1], activation="sigmoid"
    )
    wrong = libra_scores(
        model, images, torch.tensor([[[[0.0, 0.5, 1.0]]]]), targets[:, :1], activation="sigmoid"
    )
    assert float(right["auc"]) > float(wrong["auc"])
    # masked pixels become normalize(0): with normalize = x - 1 the unmasked image scores 0
    shifted = libra_scores(
        model,
        images,
        maps[:, :1],
        targets[:, :1],
        normalize=lambda raw: raw - 1.0,
        activation="sigmoid",
        steps=1,
    )
    # x ⊙ M - 1 = [0, -0.5, -1]: logit -0.5 - 1 = -1.5 against 0 for the plain image
    assert float(shifted["drop"]) == pytest.approx((0.5 - sig(-1.5)) / 0.5, rel=1e-5)
    with pytest.raises(ValueError, match="steps"):
        libra_scores(model, images, maps, targets, steps=0)
