"""Label-free layer fusion weights and the coverage-holding calibration objective, on toy
classifiers whose scores are known in closed form."""

import math

import pytest
import torch
from torch import nn

from wsss import stages
from wsss.data.datamodule import build_source, make_loader
from wsss.data.imageio import read_mask
from wsss.io import read_json
from wsss.models.pseudo_writer import SEED_DIR
from wsss.pseudo.calibrate import choose_thresholds, masked_confidences
from wsss.pseudo.fusion_weights import (
    choose_weights,
    rank_maps,
    simplex_candidates,
    weighting_confidences,
    weighting_scores,
)
from wsss.pseudo.labels import scores_to_labels
from wsss.stages.calibration import thresholds_from_confidences
from wsss.stages.pseudo_masks import pseudo_module
from wsss.stages.report import report_markdown

from conftest import reuse_stage, tiny_config


class RegionScorer(nn.Module):
    """One class; logit = sum_r gain_r * (mean of the input over region r) + bias."""

    def __init__(self, regions: list[torch.Tensor], gains: list[float], bias: float) -> None:
        super().__init__()
        self.regions = [r.float() for r in regions]
        self.gains, self.bias = gains, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = sum(
            g * (x[:, 0] * r).sum((-2, -1)) / r.sum() for g, r in zip(self.gains, self.regions)
        )
        return (logit + self.bias)[:, None]


def square(size: int, top: int, left: int, side: int) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[top : top + side, left : left + side] = 1
    return mask


def test_simplex_candidates_start_with_equal_weights_and_sum_to_one():
    candidates = simplex_candidates(3)
    assert candidates[0] == pytest.approx([1 / 3] * 3) and len(candidates) == 7
    assert all(sum(c) == pytest.approx(1) for c in candidates)
    assert [1.0, 0.0, 0.0] in candidates and [0.5, 0.0, 0.5] in candidates


def test_rank_maps_keep_exactly_the_top_fraction_whatever_the_scale():
    maps = torch.rand(2, 1, 8, 8) * torch.tensor([1.0, 0.01])[:, None, None, None]
    ranks = rank_maps(maps)
    for i in range(2):
        top = ranks[i, 0] >= 1 - 15.5 / 64  # the rule the queries keep 16 pixels of 64 by
        assert int(top.sum()) == 16
        assert bool((maps[i, 0][top].min() >= maps[i, 0][~top].max()))


def test_fusion_weights_favour_the_layer_on_the_object_over_a_shifted_copy():
    """Layer 'on' is the object mask, layer 'off' the same square shifted half a side; the
    classifier scores the mean of the object's pixels. Every area fraction's region of 'on'
    holds at least as many object pixels as any mixture, so its weight must win."""
    obj = square(16, 0, 0, 8)
    model = RegionScorer([obj], [10.0], -5.0)
    images = obj[None, None]
    layers = {"on": obj[None, None], "off": square(16, 4, 4, 8)[None, None]}
    candidates = simplex_candidates(2)
    targets, valid = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    keep, delete, base = weighting_confidences(model, images, layers, targets, valid, candidates)
    assert keep.shape == (1, 1, 3, 3) and base.shape == (1, 1)
    scores = weighting_scores(keep[valid], delete[valid], base[valid])
    chosen = choose_weights(scores, candidates)
    assert chosen == [1.0, 0.0]
    assert float(scores[candidates.index([0.0, 1.0])]) < float(scores[0]) < float(scores.max())
    # q = 0.25 of 256 pixels = the 64 object pixels exactly: keep the full score, delete it all
    on = candidates.index([1.0, 0.0])
    full, empty = 1 / (1 + math.exp(-5)), 1 / (1 + math.exp(5))
    assert float(keep[0, 0, on, 1]) == pytest.approx(full)
    assert float(delete[0, 0, on, 1]) == pytest.approx(empty)


def test_no_answered_pair_keeps_the_first_candidate():
    nan = torch.full((2, 3, 3), float("nan"))
    scores = weighting_scores(nan, nan, torch.full((2,), float("nan")))
    assert choose_weights(scores, simplex_candidates(2)) == [0.5, 0.5]


def part_and_body():
    """A 12x12 image: a 2x2 part inside a 4x6 body; map 1 on the part, 0.6 on the body, 0.1
    elsewhere; logit 4 part + 4 body - 6 (means over each region): sigma(2) on the object,
    sigma(-2) with either half alone, sigma(-6) with neither."""
    size = 12
    body = torch.zeros(size, size)
    body[4:8, 3:9] = 1
    part = torch.zeros(size, size)
    part[5:7, 3:5] = 1
    body_only = body * (1 - part)
    model = RegionScorer([part, body_only], [4.0, 4.0], -6.0)
    fused = 0.1 + 0.5 * body + 0.4 * part
    return model, body[None, None], fused[None, None], part, body


@pytest.mark.parametrize("objective", ["delete", "delete_preserve"])
def test_preservation_holds_the_body_where_delete_stops_at_the_part(objective):
    model, image, fused, part, body = part_and_body()
    grid = [0.05, 0.3, 0.5, 0.8]
    targets, valid = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
    keep, delete, base = masked_confidences(model, image, fused, targets, valid, grid)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert float(base) == pytest.approx(sig(2))
    assert keep[0, 0].tolist() == pytest.approx([sig(2), sig(2), sig(2), sig(-2)], abs=1e-5)
    assert delete[0, 0, 3] == pytest.approx(sig(-2))
    chosen = float(choose_thresholds(keep, delete, base, grid, objective, rho=0.9, delta=0.3))
    region = fused[0, 0] >= chosen
    if objective == "delete":  # the smallest deletion-sufficient region: the part alone
        assert chosen == pytest.approx(0.8) and torch.equal(region, part.bool())
    else:  # the part and the body, nothing else
        assert chosen == pytest.approx(0.5) and torch.equal(region, body.bool())


def test_delete_preserve_has_no_answer_when_no_region_alone_keeps_the_score():
    keep = torch.tensor([[[0.5, 0.4, 0.2]]])
    delete = torch.tensor([[[0.0, 0.1, 0.7]]])
    base = torch.tensor([[0.8]])
    grid = [0.2, 0.5, 0.8]
    assert choose_thresholds(keep, delete, base, grid, "delete_preserve").isnan().all()
    assert float(choose_thresholds(keep, delete, base, grid, "delete")) == pytest.approx(0.5)


# --- the keys reach the stage ----------------------------------------------------------------

PSEUDO = ("pseudo.calibration_images=8", "pseudo.num_panels=0")


def test_delete_preserve_reaches_the_stage_thresholds(tmp_path):
    """The stage's thresholds.json comes from pseudo.objective: on answers where the part alone
    passes deletion but not preservation, delete and delete_preserve give different thresholds."""
    answers = {
        "keep": torch.tensor([[0.9, 0.9, 0.2]] * 3),
        "delete": torch.tensor([[0.0, 0.05, 0.1]] * 3),
        "base": torch.tensor([0.9] * 3),
        "class_index": torch.tensor([0, 0, 0]),
    }
    chosen = {}
    for objective in ("delete", "delete_preserve"):
        cfg = tiny_config(
            tmp_path,
            "pseudo.grid=[0.3, 0.5, 0.7]",
            f"pseudo.objective={objective}",
            "pseudo.shrinkage=0",
            size="stage",
        )
        record = thresholds_from_confidences(cfg, ["a", "b"], answers, 3)
        chosen[objective] = record["per_class"]["a"]
        assert record["objective"] == objective
    assert chosen == {"delete": 0.7, "delete_preserve": 0.5}


@pytest.mark.slow
def test_calibrated_fusion_weights_are_the_ones_the_written_seeds_use(trained_classifier, tmp_path):
    """pseudo.fusion_weights=calibrated: the stage records the chosen weights (one of the
    candidates, the best-scoring), and its written seeds are the fixed-threshold labels of the
    maps fused with them, which differ from the equal-weight seeds."""
    reuse_stage(trained_classifier, tmp_path)
    cfg = tiny_config(
        tmp_path,
        *PSEUDO,
        "pseudo.calibration=fixed",
        "pseudo.fusion_weights=calibrated",
        "pseudo.min_confidence=0.0",
        size="stage",
    )
    stages.make_pseudo_masks(cfg)
    out = tmp_path / "default" / "pseudo_masks"
    searched = read_json(out / "layer_weights.json")
    chosen = read_json(out / "thresholds.json")["layer_weights"]
    scores = torch.tensor(searched["scores"])
    assert chosen == searched["candidates"][int(scores.argmax())]
    assert chosen != searched["candidates"][0]  # this classifier's best is not the equal weights
    classifier = stages.load_classifier(cfg)
    dataset = build_source(cfg, "train", mean=classifier.hparams.mean, std=classifier.hparams.std)
    batch = next(iter(make_loader(dataset, cfg, 4)))
    seeds = {}
    for name, weights in (("chosen", chosen), ("equal", None)):
        module = pseudo_module(cfg, classifier, layer_weights=weights)
        maps = module.fused_maps(batch["image"], batch["labels"], batch.get("size"))
        seeds[name] = scores_to_labels(
            maps["fused"], maps["targets"] + 1, maps["valid"], cfg.pseudo.threshold, 0.0
        )
    assert not torch.equal(seeds["chosen"], seeds["equal"])
    for i, sample_id in enumerate(batch["id"]):
        written = torch.from_numpy(read_mask(out / SEED_DIR / f"{sample_id}.png").astype("int64"))
        assert (written == seeds["chosen"][i]).float().mean() > 0.995


def test_report_names_the_calibrated_layer_weights_only_when_there_are_some():
    thresholds = {"method": "libra", "objective": "delete", "global": 0.4, "per_class": {}}
    report = {"run": "r", "data": "synthetic", "cam_method": "relevance", "stage_seconds": {}}
    with_weights = report_markdown(
        dict(report, thresholds=dict(thresholds, layer_weights=[0.5, 0.0, 0.5]))
    )
    assert "layer fusion weights (calibrated): 0.5, 0, 0.5" in with_weights
    assert "layer fusion weights" not in report_markdown(dict(report, thresholds=thresholds))
