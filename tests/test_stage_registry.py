"""The stage registry: stage hashes stay what existing runs recorded, and the CLI and `wsss run` take
their stages from the registry."""

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest

from wsss.cli import _parser, main
from wsss.config import load_config
from wsss.stages import STAGES, registry
from wsss.stages.records import key_figure, stage_hashes
from wsss.stages.registry import Stage

# stage.json `config_hash` values of runs made before the registry existed: a change here would make
# every existing run directory refuse its own config
PINNED = {
    (): {
        "classifier": "4553f0232b387836",
        "pseudo_masks": "da6f02de78cb2c20",
        "affinity": "2338441c0f2929e0",
        "segmenter": "f22fcecbab8b8d03",
        "evaluation": "fa3e7f976d163b82",
    },
    ("pseudo.refine=affinity",): {
        "classifier": "4553f0232b387836",
        "pseudo_masks": "7b3c29c21a14ff91",
        "affinity": "2700dd546d288ef7",
        "segmenter": "4f89af08ee57542d",
        "evaluation": "63e9987cf339537e",
    },
    ("pseudo.refine=affinity", "segmenter.masks=ground_truth"): {
        "classifier": "4553f0232b387836",
        "pseudo_masks": "7b3c29c21a14ff91",
        "affinity": "2700dd546d288ef7",
        "segmenter": "c03cba3907215978",
        "evaluation": "016388f9473656f0",
    },
}


@pytest.mark.parametrize("overrides", list(PINNED))
def test_stage_hashes_match_the_ones_existing_runs_recorded(overrides):
    hashes = stage_hashes(load_config("configs/default.yaml", list(overrides)))
    # stages added later (the context-decoupling round) add hashes and change none of these
    assert {stage: hashes[stage] for stage in PINNED[overrides]} == PINNED[overrides]


TINY = [
    "data.num_train=4",
    "data.num_val=2",
    "data.image_size=32",
    "data.crop_size=32",
    "logger.kind=none",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
]


def _subcommands():
    parser = _parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: sub.description for name, sub in subparsers.choices.items()}


def test_the_cli_subcommands_are_the_registry_stages_between_run_and_the_tools():
    commands = _subcommands()
    stage_commands = [stage.command for stage in registry.REGISTRY]
    assert list(commands) == ["run", *stage_commands, "data-check", "show-config"]
    for stage in registry.REGISTRY:
        assert commands[stage.command] == stage.help
    assert commands["run"] == (
        "all stages (train-classifier -> make-pseudo-masks [-> train-decoupled-classifier] "
        "[-> make-decoupled-pseudo-masks] [-> train-affinity] -> "
        "train-segmenter [-> train-segmenter-rounds] -> evaluate), resumable"
    )
    assert STAGES == tuple(stage.name for stage in registry.REGISTRY)
    # the self-training rounds' entry becomes one stage per round after the first: none by default
    assert tuple(stage_hashes(load_config(None))) == tuple(
        name for name in STAGES if name != registry.ROUNDS
    )


@pytest.fixture
def extended(monkeypatch):
    """The registry with every stage's function replaced by one that notes its call, and a
    stage `extra` (hash chained on the segmenter's and run.seed) added before evaluation."""
    calls = []

    def noting(name):
        def run(cfg):
            calls.append(name)
            return {}

        return run

    extra = Stage(
        "extra",
        command="make-extra",
        help="an added stage",
        run=noting("extra"),
        inputs=("segmenter", "run.seed"),
        splits=("val",),
        key_figure=(None, "score"),
    )
    stages = [dataclasses.replace(stage, run=noting(stage.name)) for stage in registry.REGISTRY]
    monkeypatch.setattr(registry, "REGISTRY", (*stages[:-1], extra, stages[-1]))
    return calls


def test_a_stage_added_to_the_registry_runs_in_its_place_and_has_its_subcommand(extended, tmp_path):
    assert main(["run", "configs/default.yaml", f"run.dir={tmp_path}", *TINY]) == 0
    assert extended == [
        "classifier",
        "pseudo_masks",
        "decoupled_classifier",
        "decoupled_pseudo_masks",
        "affinity",
        "segmenter",
        "extra",
        "evaluation",
    ]
    report = json.loads((tmp_path / "default" / "report.json").read_text())
    # the context-decoupling stages are listed only where the run made them
    assert list(report["stage_seconds"]) == [s for s in extended if "decoupled" not in s]
    extended.clear()
    assert "make-extra" in _subcommands()
    assert main(["make-extra", "configs/default.yaml", f"run.dir={tmp_path}", *TINY]) == 0
    assert extended == ["extra"]


def test_an_added_stage_hash_chains_its_inputs_and_nothing_else(extended):
    def hashes(*overrides):
        return stage_hashes(load_config("configs/default.yaml", list(overrides)))

    base = hashes()
    assert hashes("segmenter.lr=0.5")["extra"] != base["extra"]  # through the segmenter's hash
    assert hashes("run.seed=3")["extra"] != base["extra"]
    assert hashes("pseudo.num_panels=1", "segmenter.eval_flip=true")["extra"] == base["extra"]
    assert {k: base[k] for k in PINNED[()]} == PINNED[()]  # the others are untouched


def test_stage_records_name_their_folders_splits_and_figures():
    names = {stage.name: stage for stage in registry.REGISTRY}
    assert all(stage.folder == stage.name for stage in registry.REGISTRY)
    assert names["evaluation"].splits == ("val", "test") and names["pseudo_masks"].splits == (
        "train",
    )
    assert key_figure("classifier", {"metrics": {"val/mAP": 0.5}}) == "mAP 50.0%"
    assert key_figure("evaluation", {"miou": 0.25}) == "miou 25.0%"
    with pytest.raises(KeyError, match="no stage 'segmentor'"):
        registry.stage_named("segmentor")


def test_the_cli_parser_loads_without_torch():
    """`wsss --help` reads the registry only: no torch, Lightning or stage module behind it."""
    heavy = "('torch', 'lightning', 'wsss.stages.records')"
    code = (
        "import sys; import wsss.cli; wsss.cli._parser(); "
        f"sys.exit(' '.join(m for m in {heavy} if m in sys.modules) or None)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_keys_added_later_leave_old_hashes_alone_only_where_they_change_nothing():
    def hashes(*overrides):
        return stage_hashes(load_config("configs/default.yaml", list(overrides)))

    base = hashes()
    assert hashes("segmenter.confidence_power=1")["segmenter"] != base["segmenter"]
    assert hashes("affinity.boundary_power=2")["affinity"] != base["affinity"]
    assert hashes("pseudo.affinity_labels=par")["pseudo_masks"] != base["pseudo_masks"]
    assert hashes("classifier.token_pool=gap")["classifier"] != base["classifier"]
    # Libra's bound keys are read by Libra-CAM only
    assert hashes("cam.libra_bound_mode=absolute") == base
    libra = hashes("cam.method=libra")
    assert hashes("cam.method=libra", "cam.libra_negative_quantile=0.2") != libra
