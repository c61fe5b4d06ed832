"""Self-training rounds (``segmenter.rounds``): round 2 trains a fresh segmenter on round 1's
predictions of the training split, resumes bit-identical, evaluation scores the last round, and
one round leaves the run as it was."""

import json
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from wsss import stages
from wsss.cli import main
from wsss.config import ConfigError, load_config
from wsss.data.datamodule import build_source
from wsss.data.imageio import read_mask
from wsss.models.round_labeler import RoundMaskModule, present_distribution
from wsss.models.segmenter import SegmenterModule
from wsss.pipeline import run_all
from wsss.pseudo.distribution import confidence_levels, top2_margin
from wsss.pseudo.refine import refine_scores
from wsss.stages import registry
from wsss.stages import segmenter as segmenter_stage
from wsss.stages.pseudo_masks import panel_ids
from wsss.stages.records import StageError, stage_hashes
from wsss.stages.rounds import round_masks, round_panel_items
from wsss.viz import mask_panel_grid

from conftest import SimulatedKill, reuse_stage, tiny_config

# no ignore band: a round's masks are then the plain argmax over background and the labelled
# classes, which the tests recompute by hand
ROUND = ("pseudo.calibration_images=8", "pseudo.num_panels=0", "pseudo.ignore_band=0")
PANELS = "pseudo.num_panels=2"  # read by no stage's hash: the reused stages still hold
ONE_ROUND_STAGES = ["classifier", "pseudo_masks", "affinity", "segmenter", "evaluation"]


def config(root, *extra):
    return tiny_config(root, *ROUND, *extra, size="stage")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trained_classifier):
    """Root ``one``: a whole run with one round. Root ``two``: its classifier, pseudo-masks and
    segmenter, then round 2 and evaluation (``segmenter.rounds=2``); the train masks of every
    segmenter data module built there are noted."""
    one = tmp_path_factory.mktemp("one_round")
    reuse_stage(trained_classifier, one)
    run_all(config(one))
    two = tmp_path_factory.mktemp("two_rounds")
    for stage in ("classifier", "pseudo_masks", "segmenter"):
        reuse_stage(one, two, stage)
    seen = []
    original = segmenter_stage.StageDataModule

    def noting(cfg, stage, train_masks=None, confidence=False):
        seen.append(train_masks)
        return original(cfg, stage, train_masks=train_masks, confidence=confidence)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segmenter_stage, "StageDataModule", noting)
        run_all(config(two, "segmenter.rounds=2", PANELS))
    return one / "default", two / "default", seen


def _load(path):
    return SegmenterModule.load_from_checkpoint(path, map_location="cpu").eval()


def _labelled_argmax(module, item):
    """Hand-made round mask: the argmax of the segmenter's softmax over background and the
    image's labelled classes."""
    probs = module.predict_probs(item["image"][None])[0].numpy()
    keep = np.concatenate([[True], item["labels"].numpy() > 0.5])
    probs[~keep] = -1.0
    return probs.argmax(0).astype(np.uint8)


def test_round_two_trains_on_round_one_predictions_of_the_training_split(runs):
    one, two, seen = runs
    masks = two / "segmenter_round2" / "masks"
    assert seen == [masks]  # only round 2 trained here, and on its own masks
    record = json.loads((two / "segmenter_round2" / "stage.json").read_text())
    assert record["masks"] == str(masks) and record["epochs"] == 1
    cfg = config(two.parent, "segmenter.rounds=2")
    assert round_masks(cfg, 2) == masks
    round_one = _load(two / "segmenter" / "last.ckpt")
    dataset = build_source(cfg, "train", mean=round_one.hparams.mean, std=round_one.hparams.std)
    differs_from_pseudo = foreground = False
    for index in range(len(dataset)):
        item = dataset[index]
        written = read_mask(masks / f"{item['id']}.png")
        assert np.array_equal(written, _labelled_argmax(round_one, item)), item["id"]
        assert (masks / "confidence" / f"{item['id']}.png").is_file()
        pseudo = read_mask(one / "pseudo_masks" / f"{item['id']}.png")
        differs_from_pseudo |= not np.array_equal(written, pseudo)
        foreground |= bool((written > 0).any())
    # the pseudo-masks would not pass for round 1's predictions, and the masks are not trivial
    assert differs_from_pseudo and foreground


def test_round_panels_show_the_masks_before_and_after_the_round(runs):
    _, two, _ = runs
    cfg = config(two.parent, "segmenter.rounds=2", PANELS)
    dataset = build_source(cfg, "train")
    items = round_panel_items(cfg, 2, dataset)
    assert [item["caption"] for item in items] == panel_ids(dataset.ids, 2)
    for item in items:
        masks = item["masks"]
        assert list(masks) == ["round 1 masks", "round 2 masks", "ground_truth"]
        name = f"{item['caption']}.png"
        assert np.array_equal(masks["round 1 masks"], read_mask(two / "pseudo_masks" / name))
        assert np.array_equal(masks["round 2 masks"], read_mask(round_masks(cfg, 2) / name))
    drawn = np.asarray(Image.open(two / "segmenter_round2" / "panels.png").convert("RGB"))
    assert np.array_equal(drawn, mask_panel_grid(items, dataset.all_class_names))


def test_evaluation_scores_the_last_round(runs):
    _, two, _ = runs
    cfg = config(two.parent, "segmenter.rounds=2")
    evaluation = json.loads((two / "evaluation" / "stage.json").read_text())
    assert evaluation["config_hash"] == stage_hashes(cfg)["evaluation"]
    last = _load(two / "segmenter_round2" / "last.ckpt")
    dataset = build_source(cfg, "val", mean=last.hparams.mean, std=last.hparams.std)
    for index in range(len(dataset)):
        item = dataset[index]
        expected = last.predict_probs(item["image"][None]).argmax(1)[0].numpy()
        written = read_mask(two / "evaluation" / "val" / f"{item['id']}.png")
        assert np.array_equal(written, expected)
    assert (
        stages.load_segmenter(cfg)
        .state_dict()["net.segmentation_head.0.weight"]
        .equal(last.state_dict()["net.segmentation_head.0.weight"])
    )


def test_one_round_leaves_the_run_files_and_report_keys_as_they_are(runs):
    one, two, _ = runs
    assert not list(one.glob("segmenter_round*"))
    report = json.loads((one / "report.json").read_text())
    assert not [key for key in report if key.startswith("round_")]
    assert list(report["stage_seconds"]) == ONE_ROUND_STAGES
    assert "Self-training" not in (one / "report.md").read_text()
    # the first round of a two-round run is the one-round run's segmenter: its hash is kept
    hashes = [stage_hashes(config(two.parent, f"segmenter.rounds={r}")) for r in (1, 2)]
    assert hashes[0]["segmenter"] == hashes[1]["segmenter"]
    # one round: every registered stage but the rounds' entry, which expands to nothing
    assert list(hashes[0]) == [s.name for s in registry.REGISTRY if s.name != registry.ROUNDS]


def test_report_has_every_round(runs):
    one, two, _ = runs
    report = json.loads((two / "report.json").read_text())
    first = json.loads((one / "segmenter" / "stage.json").read_text())
    second = json.loads((two / "segmenter_round2" / "stage.json").read_text())
    pseudo = json.loads((one / "pseudo_masks" / "stage.json").read_text())
    assert report["round_seg_miou"] == {
        "1": round(first["metrics"]["val/miou"], 4),
        "2": round(second["metrics"]["val/miou"], 4),
    }
    assert report["round_masks_miou"] == {
        "1": round(pseudo["pseudo_miou"], 4),  # pseudo.refine=none: the calibrated masks
        "2": round(second["masks_miou"], 4),
    }
    names = report["class_names"]
    assert list(report["round_masks_per_class_iou"]["2"]) == names
    assert report["round_masks_per_class_iou"]["2"][names[0]] == round(
        second["masks_per_class_iou"][0], 4
    )
    assert report["round_per_class_iou"]["2"][names[0]] == round(
        second["metrics"]["val/iou_" + names[0]], 4
    )
    assert report["round_seconds"] == {"1": first["seconds"], "2": second["seconds"]}
    assert report["seg_miou"] == pytest.approx(second["metrics"]["val/miou"], abs=1e-5)
    assert report["segmenter_masks"] == str(two / "segmenter_round2" / "masks")
    assert list(report["stage_seconds"]) == [
        *ONE_ROUND_STAGES[:4],
        "segmenter_round2",
        "evaluation",
    ]
    text = (two / "report.md").read_text()
    assert "## Self-training rounds" in text
    masks, seg = report["round_masks_miou"]["2"], report["round_seg_miou"]["2"]
    assert f"| 2 | {100 * masks:.1f} | {100 * seg:.1f} | {second['seconds']} |" in text


@pytest.mark.slow
def test_a_round_killed_mid_epoch_resumes_bit_identical(runs, tmp_path, training_callbacks):
    one, _, _ = runs
    two_epochs = ("segmenter.rounds=2", "segmenter.max_epochs=2")
    roots = {name: tmp_path / name for name in ("whole", "resumed")}
    for root in roots.values():
        for stage in ("classifier", "pseudo_masks"):
            reuse_stage(one.parent, root, stage)
    stages.train_segmenter(config(roots["whole"], *two_epochs))
    reuse_stage(roots["whole"], roots["resumed"], "segmenter")
    whole = stages.train_round(config(roots["whole"], *two_epochs), 2)

    class Kill(L.Callback):
        armed = True

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if self.armed and trainer.current_epoch == 1 and batch_idx == 0:
                raise SimulatedKill("killed")

    kill = Kill()
    training_callbacks.append(kill)
    cfg = config(roots["resumed"], *two_epochs)
    with pytest.raises(SimulatedKill):
        stages.train_round(cfg, 2)
    folder = roots["resumed"] / "default" / "segmenter_round2"
    assert json.loads((folder / "stage.json").read_text())["status"] == "running"
    kill.armed = False
    resumed = stages.train_round(cfg, 2)
    assert resumed["masks_written_now"] == 0  # the masks were written before the kill
    assert resumed["epochs"] == whole["epochs"] == 2 and resumed["steps"] == whole["steps"]
    a = torch.load(
        roots["whole"] / "default" / "segmenter_round2" / "last.ckpt", weights_only=True
    )["state_dict"]
    b = torch.load(folder / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]


def test_round_hashes_chain_the_previous_round_and_what_the_masks_read():
    def hashes(*overrides):
        return stage_hashes(load_config("configs/default.yaml", list(overrides)))

    two, three = hashes("segmenter.rounds=2"), hashes("segmenter.rounds=3")
    before_rounds = [s.name for s in registry.REGISTRY[: registry.STAGES.index(registry.ROUNDS)]]
    assert list(three) == [
        *before_rounds,
        "segmenter_round2",
        "segmenter_round3",
        "evaluation",
    ]
    assert three["segmenter_round2"] == two["segmenter_round2"]  # no round depends on R
    assert len({hashes()["evaluation"], two["evaluation"], three["evaluation"]}) == 3
    assert hashes()["segmenter"] == two["segmenter"] == three["segmenter"]
    for key in (
        "segmenter.eval_flip=true",
        "segmenter.eval_scales=[0.75, 1.0]",
        "pseudo.refine=none",
        "pseudo.par_iterations=3",
        "pseudo.ignore_band=0.2",
        "run.seed=1",
    ):
        other = hashes("segmenter.rounds=3", key)
        assert other["segmenter_round2"] != three["segmenter_round2"], key
        assert other["segmenter_round3"] != three["segmenter_round3"], key
    # test-time augmentation stays out of the segmenter stage itself
    assert hashes("segmenter.rounds=2", "segmenter.eval_flip=true")["segmenter"] == two["segmenter"]
    assert registry.stage_named("segmenter_round3").folder == "segmenter_round3"
    assert registry.stage_named("segmenter_round3").inputs[0] == "segmenter_round2"
    with pytest.raises(ConfigError, match="rounds"):
        load_config("configs/default.yaml", ["segmenter.rounds=0"])


def test_present_distribution_keeps_background_and_the_labelled_classes():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 4, 1, 1).repeat(2, 1, 1, 2)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    kept = present_distribution(probs, labels)
    assert torch.allclose(kept[0, :, 0, 0], torch.tensor([0.1, 0.2, 0.0, 0.4]) / 0.7)
    assert torch.equal(kept[1, :, 0, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    underflow = torch.tensor([0.0, 1.0, 0.0, 0.0]).view(1, 4, 1, 1)
    assert torch.equal(
        present_distribution(underflow, torch.tensor([[0.0, 1.0, 0.0]]))[0, :, 0, 0],
        torch.tensor([1.0, 0.0, 0.0, 0.0]),
    )
    with pytest.raises(ValueError, match="labels must be"):
        present_distribution(probs, labels[:, :2])


def _batch(size=32):
    generator = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(2, 3, size, size, generator=generator),
        "labels": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
        "size": torch.tensor([[size, size], [size, size - 8]]),
        "id": ["a", "b"],
    }


def test_round_masks_are_refined_banded_and_carry_their_confidence():
    torch.manual_seed(0)
    segmenter = SegmenterModule(num_classes=4, arch="FPN", encoder="resnet18").eval()
    batch = _batch()
    probs = present_distribution(segmenter.predict_probs(batch["image"]), batch["labels"])
    inside = torch.ones(2, 32, 32, dtype=torch.bool)
    inside[1, :, 24:] = False
    refined = refine_scores("par", probs, batch["image"], valid=inside, iterations=3)
    out = RoundMaskModule(segmenter, "par", {"iterations": 3}, ignore_band=0.1).predict_step(
        batch, 0
    )
    plain = RoundMaskModule(segmenter).predict_step(batch, 0)
    assert not torch.equal(out["confidence"], plain["confidence"])  # pseudo.refine is applied
    assert torch.equal(out["confidence"], confidence_levels(refined))
    labels = refined.masked_fill(
        ~torch.cat([torch.ones(2, 1), batch["labels"]], 1).bool()[:, :, None, None], -1
    ).argmax(1)
    uncertain = (top2_margin(refined) < 0.1) & inside
    expected = torch.where(uncertain, torch.full_like(labels, 255), labels).to(torch.uint8)
    assert torch.equal(out["pred"], expected)
    assert bool(uncertain.any()) and bool((~uncertain & inside).any())
    with pytest.raises(ValueError, match="affinity"):
        RoundMaskModule(segmenter, "affinity")


def test_the_rounds_command_and_its_refusals(tmp_path, capsys):
    args = ["train-segmenter-rounds", "configs/default.yaml", f"run.dir={tmp_path}"]
    tiny = ["data.num_train=4", "data.num_val=2", "data.image_size=32", "data.crop_size=32"]
    tiny += ["logger.kind=none", "trainer.accelerator=cpu", "trainer.devices=1"]
    assert main([*args, *tiny]) == 0
    assert "nothing to do with segmenter.rounds=1" in capsys.readouterr().out
    assert not list((tmp_path / "default").glob("segmenter_round*"))
    cfg = config(tmp_path, "segmenter.rounds=2", "pseudo.refine=affinity")
    with pytest.raises(StageError, match="round 3 is not one of the rounds 2..2"):
        stages.train_round(cfg, 3)
    with pytest.raises(StageError, match="pseudo.refine=affinity"):
        stages.train_round(cfg, 2)
    shutil.rmtree(tmp_path / "default", ignore_errors=True)
