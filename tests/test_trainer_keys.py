"""The trainer keys reach the Trainer a stage fits with: batch limits, gradient accumulation,
max_time, nodes and determinism. Each test fails if the stage ignored its key (kept Lightning's
default)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Timer

from wsss import stages
from wsss.stages.trainer import make_trainer

from conftest import tiny_config


def config(root, *extra):
    return tiny_config(root, *extra, size="stage")


class RecordFit(L.Callback):
    """What one fit saw: its training and validation batches, and the time its Timer (the
    Trainer's max_time) had left when training started."""

    def __init__(self) -> None:
        self.train = self.val = 0
        self.time_left = None

    def on_train_start(self, trainer, module):
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        self.time_left = timer.time_remaining("train") if timer is not None else None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.train += 1

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        self.val += 1


# 12 training and 12 validation images in batches of 4: without a limit, one epoch is 3 training
# batches, 3 optimizer steps and 3 validation batches, and without max_time there is no Timer
@pytest.mark.parametrize(
    "overrides, train_batches, steps, val_batches, seconds",
    [
        (
            [
                "trainer.accumulate_grad_batches=3",
                "trainer.limit_val_batches=2",
                "trainer.max_time=00:01:30:00",
            ],
            3,
            1,
            2,
            5400,
        ),
        (["trainer.limit_train_batches=2", "trainer.limit_val_batches=0.34"], 2, 2, 1, None),
    ],
)
def test_batch_limits_accumulation_and_max_time_reach_the_training_trainer(
    tmp_path, training_callbacks, overrides, train_batches, steps, val_batches, seconds
):
    """trainer.accumulate_grad_batches / limit_train_batches / limit_val_batches (a count above 1,
    else a fraction) / max_time: the batches a training stage sees, the optimizer steps its
    checkpoint counts and the time limit its Trainer runs under."""
    seen = RecordFit()
    training_callbacks.append(seen)
    record = stages.train_classifier(config(tmp_path, "data.num_val=12", *overrides))
    assert (seen.train, seen.val) == (train_batches, val_batches)
    assert (
        record["steps"]
        == steps
        == torch.load(tmp_path / "default" / "classifier" / "last.ckpt", weights_only=False)[
            "global_step"
        ]
    )
    if seconds is None:
        assert seen.time_left is None
    else:
        assert seconds - 60 < seen.time_left <= seconds


def test_max_time_that_runs_out_before_the_first_checkpoint_counts_as_done(tmp_path):
    """trainer.max_time's help says a stopped stage counts as done, even when the time runs out
    before the first epoch-end checkpoint (a zero limit stops at the start of fit): the weights
    are still saved, and the record says how many steps they saw."""
    record = stages.train_classifier(config(tmp_path, "trainer.max_time=00:00:00:00"))
    assert record["status"] == "done" and record["steps"] == 0
    assert (tmp_path / "default" / "classifier" / "last.ckpt").is_file()


def test_trainer_factory_passes_nodes_and_batch_limits(tmp_path):
    """trainer.num_nodes and the batch limits reach the Trainer every stage builds (the machines
    themselves cannot be tested on one)."""
    cfg = config(
        tmp_path,
        "trainer.num_nodes=2",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=0.25",
    )
    trainer = make_trainer(cfg, 1)
    assert trainer.num_nodes == 2
    assert trainer.limit_train_batches == 5 and isinstance(trainer.limit_train_batches, int)
    assert trainer.limit_val_batches == 0.25
    assert make_trainer(config(tmp_path), 1).num_nodes == 1


def test_trainer_deterministic_switches_torch_to_deterministic_algorithms(tmp_path, monkeypatch):
    """trainer.deterministic=true reaches Lightning, which turns on torch's deterministic
    algorithms (a process-wide flag: restored afterwards); null leaves the flag alone."""
    monkeypatch.setenv(
        "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
    )  # Lightning sets it; restored with the flag
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        torch.use_deterministic_algorithms(False)
        make_trainer(config(tmp_path), 1)
        assert not torch.are_deterministic_algorithms_enabled()
        make_trainer(config(tmp_path, "trainer.deterministic=true"), 1)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]
