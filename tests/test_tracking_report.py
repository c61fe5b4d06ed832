"""The experiment record: what a tiny `wsss run` leaves in its offline wandb runs, CSV logs,
report.md and panels.png, and the console's quiet corners."""

import json
import shutil
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch

from wsss import stages
from wsss.cli import main
from wsss.stages.report import report_markdown

from conftest import ROOT, tiny_args, tiny_config
from wandb_records import read_run, runs_by_job

# every step logged, so short stages leave rows to check
LOGGED = ("trainer.log_every_n_steps=1",)


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb_run")
    assert (
        main(["run", *tiny_args(root, *LOGGED, "logger.kind=wandb", "logger.wandb_mode=offline")])
        == 0
    )
    return root / "default"


@pytest.mark.slow
def test_offline_wandb_runs_hold_each_stages_numbers_tables_overlays_and_artifacts(wandb_run):
    runs = runs_by_job(wandb_run)
    assert set(runs) == {"classifier", "pseudo_masks", "segmenter", "evaluation", "report"}
    group = json.loads((wandb_run / "tracking.json").read_text())["group"]
    assert group.startswith("default-") and group != "default"
    assert {run["run"]["group"] for job in runs.values() for run in job} == {group}
    report = json.loads((wandb_run / "report.json").read_text())

    pseudo = runs["pseudo_masks"][0]
    for key in ("seed_miou", "pseudo_miou", "ignore_fraction"):
        assert pseudo["summary"][key] == pytest.approx(report[key])
    assert {
        "pseudo/thresholds",
        "pseudo/per_class_iou",
        "pseudo/overlays",
        "pseudo/panels",
    } <= pseudo["logged"]
    table = next(
        p
        for p in pseudo["files"]
        if "pseudo/thresholds" in p or "thresholds" in p and p.endswith(".json")
    )
    rows = json.loads(
        (
            next((wandb_run / "wandb").glob("offline-run-*pseudo-masks*")) / "files" / table
        ).read_text()
    )
    assert (
        rows["columns"] == ["class", "threshold", "calibration pairs", "source"]
        and len(rows["data"]) == 4
    )
    assert any(p.endswith(".mask.png") for p in pseudo["files"])  # the overlays' masks were saved
    assert any(
        kind == "dataset" and "manifest.json" in paths for _, kind, paths in pseudo["artifacts"]
    )

    classifier = runs["classifier"][0]
    assert classifier["summary"]["metrics/val/mAP"] == pytest.approx(
        report["classifier"]["val/mAP"]
    )
    assert any(key.startswith("lr-") for key in classifier["logged"])  # LearningRateMonitor
    assert any(kind == "model" for _, kind, _ in classifier["artifacts"])
    assert runs["segmenter"][0]["summary"]["metrics/val/miou"] is not None
    assert runs["evaluation"][0]["summary"]["miou"] == pytest.approx(report["seg_miou"])
    summary = runs["report"][0]["summary"]
    for key in ("seed_miou", "pseudo_miou", "seg_miou", "dice"):
        assert summary[key] == pytest.approx(report[key])
    assert any(kind == "report" for _, kind, _ in runs["report"][0]["artifacts"])


@pytest.mark.slow
def test_a_self_training_round_has_its_own_wandb_run_with_its_numbers_and_panels(
    wandb_run, tmp_path
):
    """Round 2, run on the wandb run's classifier, pseudo-masks and segmenter: one offline run of
    its own, holding its masks' scores, its segmenter's metrics, and the round's panels and
    mask overlays."""
    root = tmp_path / "rounds"
    for stage in ("classifier", "pseudo_masks", "segmenter"):
        shutil.copytree(wandb_run / stage, root / "default" / stage)
    extra = (*LOGGED, "logger.kind=wandb", "logger.wandb_mode=offline", "segmenter.rounds=2")
    assert main(["train-segmenter-rounds", *tiny_args(root, *extra)]) == 0
    runs = runs_by_job(root / "default")
    assert set(runs) == {"segmenter_round2", "report"}  # the command refreshes the report too
    (round_run,) = runs["segmenter_round2"]
    record = json.loads((root / "default" / "segmenter_round2" / "stage.json").read_text())
    assert round_run["summary"]["masks_miou"] == pytest.approx(record["masks_miou"])
    assert round_run["summary"]["metrics/val/miou"] == pytest.approx(record["metrics"]["val/miou"])
    assert {"segmenter_round2/overlays", "segmenter_round2/panels"} <= round_run["logged"]
    assert any(p.endswith(".mask.png") for p in round_run["files"])


@pytest.mark.slow
def test_report_md_leads_with_the_summary_and_marks_fallbacks(wandb_run):
    text = (wandb_run / "report.md").read_text()
    report = json.loads((wandb_run / "report.json").read_text())
    lines = text.splitlines()
    first_table = next(i for i, line in enumerate(lines) if line.startswith("|"))
    assert lines[first_table].startswith("| step | mIoU (%) | Dice (%)")
    assert "classifier (val split)" in lines[first_table + 2]
    assert f"{100 * report['seed_miou']:.1f}" in lines[first_table + 3]
    assert "[panels.png](pseudo_masks/panels.png)" in text
    assert "wandb `pseudo_masks`" in text and "wandb sync" in text
    pairs = report["thresholds"]["pairs"]
    for name, count in pairs.items():
        row = next(
            line
            for line in lines
            if line.startswith(f"| {name} | {report['thresholds']['per_class'][name]:.3f}")
        )
        assert ("fallback" in row) == (count == 0) and ("shrunk" in row) == (count > 0)


def test_report_marks_fallback_classes_and_reference_ratio():
    report = {
        "run": "r",
        "data": "synthetic",
        "cam_method": "relevance",
        "seed_miou": 0.3,
        "pseudo_miou": 0.4,
        "refined_miou": 0.5,
        "seg_miou": 0.6,
        "dice": 0.7,
        "segmenter_masks": "pseudo",
        "classifier": {"val/mAP": 0.91, "val/f1": 0.8},
        "class_names": ["background", "a", "b"],
        "per_class_iou": {"background": 0.9, "a": 0.5, "b": None},
        "absent_classes": {"segmenter": ["b"]},
        "thresholds": {
            "method": "libra",
            "objective": "delete",
            "global": 0.4,
            "per_class": {"a": 0.35, "b": 0.4},
            "pairs": {"a": 12, "b": 0},
        },
        "ignore_fraction": 0.1,
        "stage_seconds": {"classifier": 1.0},
        "reference": {"run": "gt_run", "seg_miou": 0.8, "dice": 0.85},
    }
    text = report_markdown(report)
    assert "| refined pseudo-masks (train split) | 50.0 |" in text
    assert "| ground-truth reference: `gt_run` | 80.0 | 85.0 |" in text
    assert "| segmenter / reference | 0.75 |" in text
    assert "| b | 0.400 | 0 | fallback: no calibration pair, the global median |" in text
    assert "| a | 0.350 | 12 |  |" in text
    assert "Left out of the segmenter means (no ground-truth pixel in the split): b." in text
    assert "mAP 91.0, F1 80.0" in text


def test_panel_grid_has_a_row_per_present_class_and_a_legend():
    from wsss.stages.pseudo_masks import pseudo_panel_grid

    h = w = 32
    item = {
        "id": "x",
        "display": np.zeros((h, w, 3), np.uint8),
        "classes": [1, 3],
        "layers": {"layer4": torch.rand(2, h, w)},
        "fused": torch.rand(2, h, w),
        "seeds": torch.zeros(h, w, dtype=torch.uint8),
        "pseudo": torch.ones(h, w, dtype=torch.uint8),
        "mask": None,
    }
    one_class = dict(
        item, classes=[2], layers={"layer4": torch.rand(1, h, w)}, fused=torch.rand(1, h, w)
    )
    grid = pseudo_panel_grid([item, one_class], ["layer4"], ["background", "a", "b", "c"])
    title, gap = 14, 2
    rows = 3  # two classes of the first sample, one of the second
    grid_height = title + rows * (h + gap) - gap
    assert grid.shape[0] > grid_height + 10  # the legend strip below the grid
    assert (
        grid.shape[1] == 7 * (w + gap) - gap
    )  # image, layer4, fused, seeds, pseudo, pseudo mask, truth
    legend = grid[grid_height + gap :]
    voc_red = np.array([128, 0, 0])  # class 1's swatch in the VOC palette
    assert (np.abs(legend.astype(int) - voc_red).sum(-1) == 0).any()


def test_mask_panel_grid_puts_each_mask_over_its_image_in_its_column():
    from wsss.viz import mask_overlay, mask_panel_grid

    h = w = 24
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    before = np.zeros((h, w), np.uint8)
    before[4:12, 4:12] = 1
    after = np.zeros((h, w), np.uint8)
    after[10:20, 6:22] = 2
    truth = np.full((h, w), 255, np.uint8)
    items = [
        {
            "image": image,
            "caption": "a",
            "masks": {"old": before, "new": after, "ground_truth": truth},
        },
        {"image": image, "caption": "b", "masks": {"old": after, "new": before}},
    ]
    grid = mask_panel_grid(items, ["background", "one", "two"])
    title, gap = 14, 2

    def tile(row, column):
        y, x = title + row * (h + gap), column * (w + gap)
        return grid[y : y + h, x : x + w]

    assert grid.shape[1] == 4 * (w + gap) - gap  # image, old, new, ground truth
    assert np.array_equal(tile(0, 1), mask_overlay(image, before))
    assert np.array_equal(tile(0, 2), mask_overlay(image, after))
    assert np.array_equal(tile(1, 1), mask_overlay(image, after))
    assert (tile(0, 3) == [224, 224, 192]).all()  # void in the VOC palette
    assert grid.shape[0] > title + 2 * (h + gap) + 10  # the legend strip below


@pytest.mark.slow
def test_resumed_stage_continues_its_wandb_run(tmp_path, training_callbacks):
    class Kill(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch == 1:
                raise RuntimeError("killed")

    training_callbacks.append(Kill())
    cfg = tiny_config(tmp_path, *LOGGED, "logger.kind=wandb")
    with pytest.raises(RuntimeError, match="killed"):
        stages.train_classifier(cfg)
    training_callbacks.clear()
    stages.train_classifier(cfg)
    folders = sorted((tmp_path / "default" / "wandb").glob("offline-run-*"))
    # one folder per attempt, named by start time and run id (two attempts within one second
    # share a folder); every attempt is the same wandb run
    assert 1 <= len(folders) <= 2
    ids = {read_run(folder)["run"]["id"] for folder in folders}
    assert ids == {
        json.loads((tmp_path / "default" / "tracking.json").read_text())["runs"]["classifier"]
    }


@pytest.mark.slow
def test_csv_logger_gets_the_same_scalars(tmp_path):
    cfg = tiny_config(tmp_path, *LOGGED, "logger.kind=csv", "pseudo.calibration=fixed")
    stages.train_classifier(cfg)
    record = stages.make_pseudo_masks(cfg)
    rows = (tmp_path / "default" / "logs" / "pseudo_masks" / "metrics.csv").read_text().splitlines()
    header, values = rows[0].split(","), rows[-1].split(",")
    logged = dict(zip(header, values))
    assert float(logged["seed_miou"]) == pytest.approx(record["seed_miou"])
    assert float(logged["pseudo_miou"]) == pytest.approx(record["pseudo_miou"])
    assert (tmp_path / "default" / "logs" / "classifier" / "metrics.csv").is_file()
    assert not (tmp_path / "default" / "wandb").exists()


def test_show_config_keys_into_a_closed_pipe_is_quiet():
    done = subprocess.run(
        f"{sys.executable} -m wsss.cli show-config --keys | head -1",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.startswith("run.name") and done.stderr == ""


def test_folder_reports_lead_with_each_findings_dice_and_iou():
    report = {
        "run": "r",
        "data": "folder",
        "cam_method": "relevance",
        "segmenter_masks": "pseudo",
        "class_names": ["background", "polyp"],
        "stage_seconds": {},
        "pseudo_per_class_dice": {"background": 0.95, "polyp": 0.62},
        "pseudo_per_class_iou": {"background": 0.9, "polyp": 0.45},
        "per_class_dice": {"background": 0.96, "polyp": 0.7},
        "per_class_iou": {"background": 0.92, "polyp": 0.54},
    }
    text = report_markdown(report)
    lines = text.splitlines()
    first_heading = next(line for line in lines if line.startswith("## "))
    assert first_heading == "## Findings (foreground classes)"
    assert (
        "| polyp | 62.0 | 45.0 | 70.0 | 54.0 |" in text
        and "| **mean** | 62.0 | 45.0 | 70.0 | 54.0 |" in text
    )
    assert text.index("## Findings") < text.index("| step | mIoU")
    synthetic = report_markdown(dict(report, data="synthetic"))
    assert "## Findings" not in synthetic
