"""The context-decoupling round as stages: it runs only when asked, the segmenter then trains on
the round-2 classifier's masks, a killed round-2 classifier resumes to the same weights, and a
run without the key keeps its hashes, folders and report keys."""

import json

import lightning as L
import pytest
import torch

from wsss import stages
from wsss.config import ConfigError, load_config
from wsss.stages import decoupled, registry
from wsss.stages.records import stage_dir, stage_hashes
from wsss.stages.report import build_report
from wsss.stages.segmenter import segmenter_masks

from conftest import SimulatedKill, reuse_stage, tiny_config

ON = ("classifier.context_decoupling=true", "classifier.paste_probability=1")


class KillMidEpoch(L.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            raise SimulatedKill("killed")


@pytest.fixture(scope="module")
def round_one(trained_classifier, tmp_path_factory):
    """A run root with the shared classifier and its pseudo-masks (round 1), read only."""
    root = tmp_path_factory.mktemp("round_one")
    reuse_stage(trained_classifier, root)
    stages.make_pseudo_masks(tiny_config(root, *ON, size="stage"))
    return root


def _with_round_one(round_one, root):
    for stage in ("classifier", "pseudo_masks"):
        reuse_stage(round_one, root, stage)


def test_without_the_key_nothing_changes(tmp_path):
    off = tiny_config(tmp_path, size="stage")
    on = tiny_config(tmp_path, *ON, size="stage")
    assert decoupled.train_decoupled_classifier(off)["not_used"]
    assert decoupled.make_decoupled_pseudo_masks(off)["not_used"]
    assert not stage_dir(off, "decoupled_classifier").exists()
    assert registry.training_masks_stage(off) == "pseudo_masks"
    assert registry.training_masks_stage(on) == "decoupled_pseudo_masks"
    before, after = stage_hashes(off), stage_hashes(on)
    # the first round never reads the new keys; what the segmenter trains on does
    for stage in ("classifier", "pseudo_masks"):
        assert before[stage] == after[stage]
    assert before["segmenter"] != after["segmenter"]
    assert (
        stage_hashes(tiny_config(tmp_path, *ON, "classifier.paste_min_scale=0.8", size="stage"))[
            "decoupled_classifier"
        ]
        != after["decoupled_classifier"]
    )
    report = build_report(off)
    assert not any(key.startswith("decoupled") for key in report)
    assert "decoupled_classifier" not in report["stage_seconds"]


def test_context_decoupling_is_refused_with_the_affinity_refinement(tmp_path):
    with pytest.raises(ConfigError, match="classifier.context_decoupling: not available"):
        load_config("configs/default.yaml", [*ON, "pseudo.refine=affinity"])


def test_the_round_two_data_pastes_with_the_configured_keys_and_round_one_masks(round_one):
    cfg = tiny_config(
        round_one,
        "classifier.paste_probability=0.3",
        "classifier.paste_min_scale=0.7",
        *ON[:1],
        size="stage",
    )
    data = decoupled.copy_paste_data(cfg, decoupled.round_one_masks(cfg)).train_set
    assert (data.probability, data.min_scale, data.seed) == (0.3, 0.7, cfg.run.seed)
    assert data.donors.mask_override == stage_dir(cfg, "pseudo_masks")


def test_the_segmenter_trains_on_the_masks_of_the_round_two_classifier(
    round_one, tmp_path, monkeypatch
):
    _with_round_one(round_one, tmp_path)
    cfg = tiny_config(tmp_path, *ON, size="stage")
    seen = {}
    real = decoupled.run_pseudo_stage

    def spy(cfg, classifier, out_dir, logger=False, stage="pseudo_masks"):
        seen["classifier"] = classifier
        return real(cfg, classifier, out_dir, logger, stage)

    monkeypatch.setattr(decoupled, "run_pseudo_stage", spy)
    trained = decoupled.train_decoupled_classifier(cfg)
    assert trained["epochs"] == 1 and "val/mAP" in trained["metrics"]
    made = decoupled.make_decoupled_pseudo_masks(cfg)
    round_two = torch.load(stage_dir(cfg, "decoupled_classifier") / "last.ckpt", weights_only=False)
    used = seen["classifier"].state_dict()
    assert all(torch.equal(used[k], v) for k, v in round_two["state_dict"].items())
    first = torch.load(stage_dir(cfg, "classifier") / "last.ckpt", weights_only=False)
    assert any(not torch.equal(used[k], v) for k, v in first["state_dict"].items())
    out = stage_dir(cfg, "decoupled_pseudo_masks")
    assert made["count"] == len(list(out.glob("syn_*.png"))) == 12
    assert (
        json.loads((out / "manifest.json").read_text())["config_hash"]
        == (stage_hashes(cfg)["decoupled_pseudo_masks"])
    )
    assert segmenter_masks(cfg) == out
    segmenter = stages.train_segmenter(cfg)
    assert segmenter["masks"] == str(out)
    report = stages.write_report(cfg)
    assert report["decoupled_pseudo_miou"] == made["pseudo_miou"]
    assert report["decoupled_classifier"] == trained["metrics"]
    assert (
        report["pseudo_miou"]
        == json.loads((stage_dir(cfg, "pseudo_masks") / "stage.json").read_text())["pseudo_miou"]
    )  # round one keeps its keys
    assert "Context decoupling" in (cfg.run_dir / "report.md").read_text()


@pytest.mark.slow
def test_a_killed_round_two_classifier_resumes_to_the_same_weights(
    round_one, tmp_path, training_callbacks
):
    options = (*ON, "classifier.max_epochs=2", "classifier.paste_probability=0.5")
    whole_root, resumed_root = tmp_path / "whole", tmp_path / "resumed"
    for root in (whole_root, resumed_root):
        _with_round_one(round_one, root)
    whole = decoupled.train_decoupled_classifier(tiny_config(whole_root, *options, size="stage"))
    kill = KillMidEpoch(epoch=1)
    training_callbacks.append(kill)
    cfg = tiny_config(resumed_root, *options, size="stage")
    with pytest.raises(SimulatedKill):
        decoupled.train_decoupled_classifier(cfg)
    record = json.loads((stage_dir(cfg, "decoupled_classifier") / "stage.json").read_text())
    assert record["status"] == "running"
    kill.epoch = -1
    resumed = decoupled.train_decoupled_classifier(cfg)
    assert resumed["steps"] == whole["steps"]
    a, b = (
        torch.load(root / "default" / "decoupled_classifier" / "last.ckpt", weights_only=False)[
            "state_dict"
        ]
        for root in (whole_root, resumed_root)
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = decoupled.train_decoupled_classifier(cfg)
    assert again["skipped"]
