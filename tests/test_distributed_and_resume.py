"""Every stage under DDP (2 CPU processes, gloo) against one process, and training stages killed
mid-epoch that resume to bit-identical weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from wsss import stages

from conftest import ROOT, SimulatedKill, digest, reuse_stage, tiny_args, tiny_config

# map batches of four and three panels (check_shares_and_outputs counts them)
DDP = ("cam.batch_size=4", "pseudo.num_panels=3")

# torch has no CPU SyncBatchNorm: on CPU each process normalises over its share of the global
# batch, so trained networks follow a slightly different path than in one process (on GPU,
# trainer.sync_batchnorm makes the paths agree). Figures that depend on DDP training are bounded
# by this tolerance; what does not depend on it must be identical.
TOLERANCE = 0.1


def run_command(run_dir: Path, command: str, *extra: str) -> None:
    """`wsss COMMAND` in a fresh interpreter (the ddp launcher relaunches this very command)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    line = [sys.executable, "-m", "wsss.cli", command, *tiny_args(run_dir, *DDP, *extra)]
    done = subprocess.run(line, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]


def run_cli(run_dir: Path, *extra: str) -> dict:
    """`wsss run` in a fresh interpreter; its report."""
    run_command(run_dir, "run", *extra)
    return json.loads((run_dir / "default" / "report.json").read_text())


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return root, run_cli(root, "trainer.devices=1")


def check_shares_and_outputs(run: Path) -> dict:
    """Each training image written once over the two processes' shares; spawned processes'
    results (panels, metrics, epochs, predictions) made it back."""
    out = run / "pseudo_masks"
    record = json.loads((out / "stage.json").read_text())
    shares = record["rank_counts"]
    assert sorted(shares) == ["rank_0", "rank_1"] and all(n > 0 for n in shares.values())
    assert sum(shares.values()) == 16 == len(list(out.glob("syn_*.png")))
    assert (out / "panels.png").is_file() and len(record["panel_ids"]) == 3
    segmenter = json.loads((run / "segmenter" / "stage.json").read_text())
    assert segmenter["epochs"] == 1 and "val/miou" in segmenter["metrics"]
    assert len(list((run / "evaluation" / "val").glob("*.png"))) == 6
    return record


@pytest.mark.slow
def test_ddp_pseudo_masks_are_identical_to_one_process_given_the_classifier(
    single_process, tmp_path
):
    """trainer.strategy=ddp: every process runs the whole command. With the single-process run's
    classifier, calibration (sharded, gathered) and the pseudo-masks are bit-identical; the
    segmenter then trains under DDP."""
    single_root, single = single_process
    reuse_stage(single_root, tmp_path)
    report = run_cli(tmp_path, "trainer.devices=2", "trainer.strategy=ddp")
    check_shares_and_outputs(tmp_path / "default")

    def without_time(thresholds: dict) -> dict:
        return {k: v for k, v in thresholds.items() if k != "seconds"}

    assert without_time(report["thresholds"]) == without_time(single["thresholds"])
    assert digest(tmp_path / "default" / "pseudo_masks") == digest(
        single_root / "default" / "pseudo_masks"
    )
    for key in (
        "seed_miou",
        "pseudo_miou",
        "seed_per_class_iou",
        "pseudo_per_class_iou",
        "ignore_fraction",
    ):
        assert report[key] == single[key], key
    assert report["seg_miou"] == pytest.approx(single["seg_miou"], abs=TOLERANCE)


@pytest.mark.slow
def test_ddp_spawn_runs_every_stage_and_follows_one_process(single_process, tmp_path):
    """trainer.strategy=ddp_spawn: only the main process runs the stage code; every result of
    the spawned processes must come back through files or callback metrics."""
    _, single = single_process
    report = run_cli(tmp_path, "trainer.devices=2", "trainer.strategy=ddp_spawn")
    check_shares_and_outputs(tmp_path / "default")
    for key in ("seed_miou", "pseudo_miou", "seg_miou"):
        assert report[key] == pytest.approx(single[key], abs=TOLERANCE), (
            key,
            report[key],
            single[key],
        )
    # the classifier's validation scores came back from the spawned processes
    assert {"val/mAP", "val/f1", "val/loss"} <= set(report["classifier"])


# the boundary-aware walk on the affinities, one affinity epoch
BOUNDARY_WALK = ("pseudo.refine=affinity", "affinity.boundary_power=2", "affinity.max_epochs=1")


@pytest.mark.slow
def test_ddp_boundary_walk_writes_the_masks_of_one_process(single_process, tmp_path):
    """With the same classifier, pseudo-masks and trained affinity network, the boundary-aware
    walk sharded over two processes writes every refined mask and confidence byte for byte as
    one process does (what DDP changes is the affinity training, through CPU BatchNorm)."""
    single_root, _ = single_process
    one, two = tmp_path / "one", tmp_path / "two"
    reuse_stage(single_root, one)
    run_command(one, "make-pseudo-masks", *BOUNDARY_WALK)
    run_command(one, "train-affinity", *BOUNDARY_WALK)
    for stage in ("classifier", "pseudo_masks"):
        reuse_stage(one, two, stage)
    # the trained affinities only: the stage starts again, resumes past its last epoch and walks
    (two / "default" / "affinity").mkdir(parents=True)
    shutil.copy(one / "default" / "affinity" / "last.ckpt", two / "default" / "affinity")
    run_command(two, "train-affinity", *BOUNDARY_WALK, "trainer.devices=2", "trainer.strategy=ddp")
    record = json.loads((two / "default" / "affinity" / "stage.json").read_text())
    assert record["status"] == "done"
    written = digest(two / "default" / "affinity")
    assert len(written) == 2 * 16  # every training image's mask and its confidence
    assert written == digest(one / "default" / "affinity")


@pytest.mark.slow
def test_ddp_self_training_round_writes_the_masks_of_one_process(single_process, tmp_path):
    """Round 2 of the self-training rounds, sharded over two processes: the previous
    segmenter's predictions of the training split (masks and confidences) are written byte for
    byte as one process writes them, every image once, and the round's segmenter then trains."""
    single_root, _ = single_process
    one, two = tmp_path / "one", tmp_path / "two"
    for root in (one, two):
        for stage in ("classifier", "pseudo_masks", "segmenter"):
            reuse_stage(single_root, root, stage)
    run_command(one, "train-segmenter-rounds", "segmenter.rounds=2")
    run_command(
        two,
        "train-segmenter-rounds",
        "segmenter.rounds=2",
        "trainer.devices=2",
        "trainer.strategy=ddp",
    )
    round_dir = two / "default" / "segmenter_round2"
    written = digest(round_dir / "masks")
    assert len(written) == 2 * 16  # every training image's mask and its confidence
    assert written == digest(one / "default" / "segmenter_round2" / "masks")
    record = json.loads((round_dir / "stage.json").read_text())
    assert record["status"] == "done" and record["epochs"] == 1
    assert record["masks_written_now"] == 16 and "val/miou" in record["metrics"]
    assert (round_dir / "panels.png").is_file()


def _tiny(tmp_path, *extra):
    return tiny_config(tmp_path, *DDP, *extra)


class KillMidEpoch(L.Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise SimulatedKill("killed")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, extra",
    [
        ("classifier", ["data.num_workers=2"]),  # workers, augmentation, BN
        (
            "segmenter",
            ["segmenter.masks=ground_truth", "segmenter.max_epochs=3"],
        ),  # FPN dropout: RNG
    ],
)
def test_training_killed_mid_epoch_resumes_bit_identical(
    tmp_path, training_callbacks, stage, extra
):
    options = ["classifier.max_epochs=3", *extra]
    train = stages.train_classifier if stage == "classifier" else stages.train_segmenter
    if stage == "segmenter":
        options.append("data.num_train=8")
    whole = train(_tiny(tmp_path / "whole", *options))
    kill = KillMidEpoch(epoch=1, batch=0)
    training_callbacks.append(kill)
    cfg = _tiny(tmp_path / "resumed", *options)
    with pytest.raises(SimulatedKill):
        train(cfg)
    interrupted = json.loads((tmp_path / "resumed" / "default" / stage / "stage.json").read_text())
    assert interrupted["status"] == "running" and interrupted["seconds"] > 0
    kill.epoch = -1  # the resumed attempt runs to the end
    resumed = train(cfg)
    assert resumed["epochs"] == whole["epochs"] == 3 and resumed["steps"] == whole["steps"]
    assert resumed["seconds"] > interrupted["seconds"]  # time adds up over attempts
    a = _weights(tmp_path / "whole" / "default" / stage / "last.ckpt")
    b = _weights(tmp_path / "resumed" / "default" / stage / "last.ckpt")
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, differing[:5]
