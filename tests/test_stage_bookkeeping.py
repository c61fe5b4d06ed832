"""Stage bookkeeping: hashes hold what each stage reads, refusals happen before any work and
before config.yaml changes, and errors come out as one line that names the file and the fix."""

import json
import time

import pytest
from PIL import Image

from wsss import stages
from wsss.cli import main, original_message
from wsss.data.imageio import DataError
from wsss.data.preflight import check_files
from wsss.data.voc import VOCSegmentation
from wsss.stages.records import begin_stage, stage_hashes

from conftest import tiny_args, tiny_config


def cfg_of(tmp_path, *extra):
    return tiny_config(tmp_path, *extra, size="micro")


def test_each_hash_holds_only_what_its_stage_reads(tmp_path):
    base = stage_hashes(cfg_of(tmp_path))

    def changed(*extra):
        other = stage_hashes(cfg_of(tmp_path, *extra))
        return {stage for stage in base if other[stage] != base[stage]}

    assert changed("data.test_split=test") == {"evaluation"}
    assert changed("segmenter.eval_flip=true") == {"evaluation"}
    assert changed("segmenter.eval_scales=[0.75, 1.0]") == {"evaluation"}
    assert changed("cam.batch_size=2", "data.num_workers=1", "pseudo.num_panels=1") == set()
    assert (
        changed("trainer.devices=2", "trainer.strategy=ddp") == set()
    )  # global batch: same result
    assert changed("pseudo.ignore_band=0.1") == {
        "pseudo_masks",
        # the context-decoupling stages chain the pseudo-masks (they run only when asked)
        "decoupled_classifier",
        "decoupled_pseudo_masks",
        "affinity",
        "segmenter",
        "evaluation",
    }
    assert changed("affinity.steps=32") == {
        "affinity"
    }  # pseudo.refine=none: the segmenter ignores it
    assert changed("pseudo.refine=affinity", "affinity.steps=32") >= {
        "affinity",
        "segmenter",
        "evaluation",
    }
    assert changed("segmenter.lr=0.1") == {"segmenter", "evaluation"}
    assert changed("classifier.lr=0.1") == set(base)
    assert changed("trainer.gradient_clip_val=1.0") == set(base)


def test_a_stage_that_failed_before_writing_does_not_hold_a_new_config_back(tmp_path):
    cfg = cfg_of(tmp_path)
    assert begin_stage(cfg, "classifier") is None  # "running", nothing written yet
    other = cfg_of(tmp_path, "classifier.lr=0.5")
    assert begin_stage(other, "classifier") is None
    record = json.loads((tmp_path / "default" / "classifier" / "stage.json").read_text())
    assert record["config_hash"] == stage_hashes(other)["classifier"]
    (tmp_path / "default" / "classifier" / "last.ckpt").write_bytes(
        b"weights"
    )  # now it has outputs
    with pytest.raises(stages.StageError, match="different config.*run.overwrite=true"):
        begin_stage(cfg, "classifier")


def test_a_refused_command_leaves_config_yaml_alone(tmp_path, capsys):
    cfg = cfg_of(tmp_path)
    stages.save_config(cfg)
    begin_stage(cfg, "classifier")
    (tmp_path / "default" / "classifier" / "last.ckpt").write_bytes(b"weights")
    before = (tmp_path / "default" / "config.yaml").read_text()
    assert main(["run", *tiny_args(tmp_path, "classifier.lr=0.5", size="micro")]) == 1
    assert "different config" in capsys.readouterr().err
    assert (tmp_path / "default" / "config.yaml").read_text() == before
    assert main(["train-classifier", *tiny_args(tmp_path, "classifier.lr=0.5", size="micro")]) == 1
    assert (tmp_path / "default" / "config.yaml").read_text() == before


def test_a_file_where_the_run_directory_should_be_is_one_line(tmp_path, capsys):
    (tmp_path / "blocker").write_text("not a folder")
    assert main(["train-classifier", *tiny_args(tmp_path / "blocker", size="micro")]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and "blocker" in err
        and "run.dir" in err
        and "Traceback" not in err
    )


def test_unwritable_output_is_one_line_with_the_fix(tmp_path, capsys, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr("pathlib.Path.mkdir", refuse)
    assert main(["train-classifier", *tiny_args(tmp_path, size="micro")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Permission denied" in err and "writable run.dir" in err


def test_worker_errors_come_back_as_their_own_message():
    """torch wraps an error raised in a DataLoader worker with the worker's traceback."""
    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in load\n    raise DataError(msg)\n'
        "wsss.data.imageio.DataError: /data/img_7.png: truncated image; re-export it"
    )
    assert original_message(wrapped) == "/data/img_7.png: truncated image; re-export it"
    assert original_message(DataError("plain message")) == "plain message"


def _damage(root):
    """voc_mini's first image cut short and a train_aug mask resized; returns both paths."""
    images = sorted((root / "JPEGImages").glob("*.jpg"))
    data = images[0].read_bytes()
    images[0].write_bytes(data[: len(data) // 2])  # cut short
    mask = VOCSegmentation(root, "train_aug").mask_path(1)
    Image.open(mask).resize((40, 30)).save(mask)  # the wrong size
    return images[0], mask


def test_bad_files_stop_the_run_before_any_work(voc_copy, tmp_path, capsys):
    cut, small = _damage(voc_copy)
    run_dir = tmp_path / "runs"
    code = main(
        [
            "run",
            "configs/voc.yaml",
            f"data.root={voc_copy}",
            "data.train_split=train_aug",
            f"run.dir={run_dir}",
            "classifier.pretrained=false",
            "segmenter.pretrained=false",
            "logger.kind=none",
            "trainer.accelerator=cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert str(cut) in err and "cut short" in err
    assert str(small) in err and "(30, 40)" in err
    assert not run_dir.exists()  # stopped before the first stage made anything


def test_preflight_passes_a_good_split_quickly(voc_root):
    source = VOCSegmentation(voc_root, "train_aug")
    started = time.perf_counter()
    assert check_files(source, "train_aug") == []
    assert time.perf_counter() - started < 5.0
