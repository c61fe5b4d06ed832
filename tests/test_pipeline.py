"""End to end on tiny synthetic data: every stage, the report, skipping, resuming and refusals."""

import hashlib
import json

import pytest
import torch

from wsss import stages
from wsss.data.datamodule import build_source
from wsss.stages import trainer as stage_trainer
from wsss.cli import main
from wsss.config import load_config
from wsss.data.imageio import DataError
from wsss.data.masks import write_label_png


class SimulatedKill(RuntimeError):
    """Stands in for a killed process: Lightning re-raises it after its own clean-up."""


TINY = [
    "data.num_train=16", "data.num_val=6", "data.image_size=64", "data.crop_size=64",
    "data.batch_size=8", "data.num_workers=0",
    "classifier.max_epochs=2", "classifier.output_stride=16",
    "segmenter.max_epochs=1", "segmenter.arch=FPN",
    "cam.batch_size=8", "cam.flip=false",
    "pseudo.calibration_images=8", "pseudo.grid=[0.1, 0.3, 0.5]", "pseudo.num_panels=2",
    "logger.kind=none", "trainer.accelerator=cpu", "trainer.devices=1",
]


def tiny(tmp_path, *extra):
    return load_config("configs/default.yaml", [f"run.dir={tmp_path}", *TINY, *extra])


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.png"))}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    assert main(["run", "configs/default.yaml", f"run.dir={root}", *TINY]) == 0
    return root / "default"


@pytest.mark.slow
def test_run_writes_every_output_and_the_report(finished_run):
    report = json.loads((finished_run / "report.json").read_text())
    for key in ("seed_miou", "pseudo_miou", "seg_miou", "per_class_iou", "thresholds", "stage_seconds"):
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
def test_second_run_skips_finished_stages_and_changes_nothing(finished_run, capsys):
    before = digest(finished_run / "pseudo_masks")
    ckpt = (finished_run / "segmenter" / "last.ckpt").stat().st_mtime_ns
    assert main(["run", "configs/default.yaml", f"run.dir={finished_run.parent}", *TINY]) == 0
    assert capsys.readouterr().out.count("already done, skipped") == 4
    assert digest(finished_run / "pseudo_masks") == before
    assert (finished_run / "segmenter" / "last.ckpt").stat().st_mtime_ns == ckpt


@pytest.mark.slow
def test_pseudo_stage_resumes_only_missing_images_identically(finished_run, tmp_path):
    import shutil

    run_dir = tmp_path / "default"
    shutil.copytree(finished_run, run_dir)
    cfg = tiny(tmp_path)
    out = run_dir / "pseudo_masks"
    before = digest(out)
    removed = sorted(out.glob("syn_*.png"))[:5]
    for path in removed:
        path.unlink()
    stage = json.loads((out / "stage.json").read_text())
    stage["status"] = "running"  # as if killed mid-stage
    (out / "stage.json").write_text(json.dumps(stage))
    result = stages.make_pseudo_masks(cfg)
    assert result["written_now"] == 5
    assert digest(out) == before


@pytest.mark.slow
def test_changed_config_is_refused_unless_overwrite(finished_run):
    cfg = tiny(finished_run.parent, "cam.layers=[layer4]")
    with pytest.raises(stages.StageError, match="different config.*run.overwrite=true"):
        stages.make_pseudo_masks(cfg)


def test_classifier_resumes_from_last_checkpoint(tmp_path, monkeypatch):
    import lightning as L

    class StopAfterFirstEpoch(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                raise SimulatedKill("killed")

    class RecordEpochs(L.Callback):
        def __init__(self):
            self.started = []

        def on_train_epoch_start(self, trainer, module):
            self.started.append(trainer.current_epoch)

    original = stage_trainer.make_trainer
    extra = []
    monkeypatch.setattr(stage_trainer, "make_trainer",
                        lambda cfg, epochs, logger=False, callbacks=None, **kw:
                        original(cfg, epochs, logger, (callbacks or []) + extra, **kw))
    cfg = tiny(tmp_path, "data.num_train=8", "classifier.max_epochs=2")
    extra[:] = [StopAfterFirstEpoch()]
    with pytest.raises(SimulatedKill):
        stages.train_classifier(cfg)
    last = tmp_path / "default" / "classifier" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 0
    recorder = RecordEpochs()
    extra[:] = [recorder]
    result = stages.train_classifier(cfg)
    assert recorder.started == [1]
    assert result["status"] == "done" and torch.load(last, weights_only=False)["epoch"] == 1


def test_non_finite_loss_stops_without_a_nan_checkpoint(tmp_path, capsys):
    code = main(["train-classifier", "configs/default.yaml", f"run.dir={tmp_path}", *TINY,
                 "data.num_train=8", "classifier.lr=1e30", "classifier.backbone_lr_mult=1.0"])
    err = capsys.readouterr().err
    assert code == 1 and "non-finite" in err.lower() and "step" in err
    for ckpt in (tmp_path / "default" / "classifier").glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_bad_mask_directory_is_rejected_with_ids(tmp_path):
    cfg = tiny(tmp_path, "data.num_train=6", f"segmenter.masks={tmp_path / 'masks'}")
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


def test_wandb_offline_run_lands_in_the_run_directory_with_the_config(tmp_path):
    from wsss.tracking import close_logger, make_logger

    cfg = tiny(tmp_path, "logger.kind=wandb", "logger.wandb_mode=offline")
    logger = make_logger(cfg, "classifier")
    assert logger.experiment.config["classifier"]["backbone"] == "resnet18"
    logger.log_metrics({"train/loss": 1.0}, step=0)
    close_logger(logger)
    runs = list((tmp_path / "default" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
