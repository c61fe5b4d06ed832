"""End to end on tiny synthetic data: every stage, the report, skipping, resuming and refusals."""

import json
import shutil

import lightning as L
import pytest
import torch

from wsss import stages
from wsss.cli import main
from wsss.data.datamodule import build_source
from wsss.data.imageio import DataError
from wsss.data.masks import write_label_png
from wsss.tracking import close_logger, make_logger

from conftest import SimulatedKill, digest, tiny_args, tiny_config
from quality_floor import read_floor, shortfalls
from wandb_records import read_run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    assert main(["run", *tiny_args(root)]) == 0
    return root / "default"


@pytest.mark.slow
def test_run_writes_every_output_and_the_report(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    for key in (
        "seed_miou",
        "pseudo_miou",
        "seg_miou",
        "per_class_iou",
        "thresholds",
        "stage_seconds",
    ):
        assert report[key] is not None, key
    assert 0.0 <= report["seg_miou"] <= 1.0 and 0.0 < report["seed_miou"] <= 1.0
    assert set(report["per_class_iou"]) == {"background", "disc", "square", "triangle", "boat"}
    assert set(report["thresholds"]["per_class"]) == {"disc", "square", "triangle", "boat"}
    assert all(0.0 < t < 1.0 for t in report["thresholds"]["per_class"].values())
    assert len(list(finished_run.joinpath("pseudo_masks").glob("*.png"))) == 16 + 1  # + panels.png
    manifest = json.loads((finished_run / "pseudo_masks" / "manifest.json").read_text())
    assert manifest["count"] == 16 and manifest["complete"]
    assert len(list((finished_run / "evaluation" / "val").glob("*.png"))) == 6
    assert (finished_run / "config.yaml").is_file() and (finished_run / "report.md").is_file()
    assert "| seeds (fixed threshold, train split) |" in (finished_run / "report.md").read_text()


@pytest.mark.slow
def test_run_keeps_the_quality_floor(finished_run):
    """The tiny run's seeds, masks and segmenter fall no more than the margin below the figures
    recorded in tests/quality_floor.json (deterministic on the CPU: a drop is a changed result)."""
    report = json.loads((finished_run / "report.json").read_text())
    assert shortfalls("tiny", report) == []


def test_the_quality_floor_catches_a_drop_and_a_missing_figure():
    floor = read_floor()
    recorded = floor["runs"]["tiny"]["figures"]
    assert set(recorded) == {"seed_miou", "pseudo_miou", "refined_miou", "seg_miou"}
    assert shortfalls("tiny", dict(recorded)) == []
    at_margin = {key: value - floor["margin"] + 1e-6 for key, value in recorded.items()}
    assert shortfalls("tiny", at_margin) == []
    dropped = dict(recorded, seg_miou=recorded["seg_miou"] - floor["margin"] - 0.001)
    assert [line.split(":")[0] for line in shortfalls("tiny", dropped)] == ["seg_miou"]
    ci = floor["runs"]["ci"]["figures"]
    assert [line.split(":")[0] for line in shortfalls("ci", dict(ci, seed_miou=None))] == [
        "seed_miou"
    ]


@pytest.mark.slow
def test_second_run_skips_finished_stages_and_changes_nothing(finished_run, capsys):
    before = digest(finished_run / "pseudo_masks", "*.png")
    ckpt = (finished_run / "segmenter" / "last.ckpt").stat().st_mtime_ns
    assert main(["run", *tiny_args(finished_run.parent)]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 4
    assert digest(finished_run / "pseudo_masks", "*.png") == before
    assert (finished_run / "segmenter" / "last.ckpt").stat().st_mtime_ns == ckpt


@pytest.mark.slow
def test_pseudo_stage_resumes_only_missing_images_identically(finished_run, tmp_path):
    run_dir = tmp_path / "default"
    shutil.copytree(finished_run, run_dir)
    cfg = tiny_config(tmp_path)
    out = run_dir / "pseudo_masks"
    before = digest(out, "*.png")
    removed = sorted(out.glob("syn_*.png"))[:5]
    for path in removed:
        path.unlink()
    stage = json.loads((out / "stage.json").read_text())
    stage["status"] = "running"  # as if killed mid-stage
    (out / "stage.json").write_text(json.dumps(stage))
    result = stages.make_pseudo_masks(cfg)
    assert result["written_now"] == 5
    assert digest(out, "*.png") == before


@pytest.mark.slow
def test_changed_config_is_refused_unless_overwrite(finished_run):
    cfg = tiny_config(finished_run.parent, "cam.layers=[layer4]")
    with pytest.raises(stages.StageError, match="different config.*run.overwrite=true"):
        stages.make_pseudo_masks(cfg)


def test_classifier_resumes_from_last_checkpoint(tmp_path, training_callbacks):
    class StopAfterFirstEpoch(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                raise SimulatedKill("killed")

    class RecordEpochs(L.Callback):
        def __init__(self):
            self.started = []

        def on_train_epoch_start(self, trainer, module):
            self.started.append(trainer.current_epoch)

    cfg = tiny_config(tmp_path, "data.num_train=8", "classifier.max_epochs=2")
    training_callbacks[:] = [StopAfterFirstEpoch()]
    with pytest.raises(SimulatedKill):
        stages.train_classifier(cfg)
    last = tmp_path / "default" / "classifier" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 0
    recorder = RecordEpochs()
    training_callbacks[:] = [recorder]
    result = stages.train_classifier(cfg)
    assert recorder.started == [1]
    assert result["status"] == "done" and torch.load(last, weights_only=False)["epoch"] == 1


def test_non_finite_loss_stops_without_a_nan_checkpoint(tmp_path, capsys):
    code = main(
        [
            "train-classifier",
            *tiny_args(
                tmp_path,
                "data.num_train=8",
                "classifier.lr=1e30",
                "classifier.backbone_lr_mult=1.0",
            ),
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err.lower() and "step" in err
    for ckpt in (tmp_path / "default" / "classifier").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_bad_mask_directory_is_rejected_with_ids(tmp_path):
    cfg = tiny_config(tmp_path, "data.num_train=6", f"segmenter.masks={tmp_path / 'masks'}")
    source = build_source(cfg, "train")
    for index in range(6):
        raw = source.load_raw(index)
        mask = raw.mask.copy()
        if index == 1:
            mask = mask[:32]  # wrong size
        if index == 2:
            mask[0, 0] = 9  # out of range
        if index != 3:  # missing
            write_label_png(tmp_path / "masks" / f"{raw.id}.png", mask)
    with pytest.raises(DataError) as err:
        stages.train_segmenter(cfg)
    message = str(err.value)
    assert "3 bad or missing mask(s) out of 6" in message
    for bad in ("syn_train_00001", "syn_train_00002", "syn_train_00003"):
        assert bad in message
    assert "syn_train_00000" not in message


def test_wandb_offline_run_lands_in_the_run_directory_with_the_config_and_project(tmp_path):
    cfg = tiny_config(
        tmp_path, "logger.kind=wandb", "logger.wandb_mode=offline", "logger.project=wsss-wiring"
    )
    logger = make_logger(cfg, "classifier")
    assert logger.experiment.config["classifier"]["backbone"] == "resnet18"
    logger.log_metrics({"train/loss": 1.0}, step=0)
    close_logger(logger)
    runs = list((tmp_path / "default" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert (
        read_run(runs[0])["run"]["project"] == "wsss-wiring"
    )  # logger.project, not the default "wsss"
