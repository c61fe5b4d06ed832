"""Config loading, overrides and the errors users see before any work starts."""

import pytest

from wsss.cli import main
from wsss.config import ConfigError, config_from_dict, describe_keys, load_config


def test_default_config_loads_and_overrides_are_typed(tmp_path):
    cfg = load_config(
        "configs/default.yaml",
        [
            "data.batch_size=4",
            "cam.scales=[0.5, 1.0]",
            "run.name=exp1",
            "classifier.pretrained=true",
        ],
    )
    assert cfg.data.name == "synthetic" and cfg.data.batch_size == 4
    assert cfg.cam.scales == [0.5, 1.0]
    assert cfg.classifier.pretrained is True
    assert str(cfg.run_dir).endswith("checkpoints/exp1")


@pytest.mark.parametrize("config", ["configs/voc.yaml", "configs/medical.yaml"])
def test_shipped_configs_validate_once_given_a_root(config):
    cfg = load_config(config, ["data.root=/somewhere"])
    assert cfg.data.root == "/somewhere"


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.bogus=1", "unknown key data.bogus; valid keys in 'data': batch_size"),
        (
            "cam.method=scorecam",
            "cam.method: 'scorecam' is not a valid choice; choose one of: relevance, gradcam",
        ),
        ("data.batch_size=eight", "data.batch_size: expected an integer"),
        (
            "classifier.backbone=resnet9",
            "classifier.backbone: 'resnet9' is not a torchvision classification model; did you mean",
        ),
        ("pseudo.threshold=1.5", "pseudo.threshold: must lie in (0, 1)"),
        ("pseudo.delta=-0.1", "pseudo.delta: must lie in [0, 1]"),
        ("pseudo.objective=auc", "choose one of: increase, keep_delete, area, delete"),
        ("cam.normalize=zscore", "choose one of: centred, relu_max, minmax"),
        ("cam.layer_weights=[1.0]", "cam.layer_weights: needs one weight per layer"),
        ("nogroup.key=1", "unknown config group 'nogroup'"),
        ("data=1", "keys have the form group.key"),
    ],
)
def test_bad_keys_and_values_name_the_key_and_choices(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("configs/default.yaml", [override])
    assert fragment in str(err.value)


def test_voc_without_root_is_refused():
    with pytest.raises(ConfigError, match="data.root: required for data.name=voc"):
        config_from_dict({"data": {"name": "voc"}})


def test_cli_reports_config_errors_without_traceback(capsys):
    assert main(["show-config", "configs/default.yaml", "logger.kind=tensorboard"]) == 1
    err = capsys.readouterr().err
    assert "logger.kind" in err and "wandb, csv, none" in err and "Traceback" not in err


def test_show_config_prints_resolved_yaml(capsys):
    assert main(["show-config", "configs/default.yaml", "segmenter.max_epochs=3"]) == 0
    printed = capsys.readouterr().out
    assert "max_epochs: 3" in printed
    reloaded = config_from_dict(__import__("yaml").safe_load(printed))
    assert reloaded.segmenter.max_epochs == 3 and reloaded.data.name == "synthetic"


def test_every_key_is_documented():
    text = describe_keys()
    for key in (
        "run.name",
        "data.train_split",
        "cam.method",
        "pseudo.calibration",
        "logger.wandb_mode",
        "trainer.devices",
        "segmenter.arch",
    ):
        assert key in text


@pytest.mark.parametrize(
    "override, expected",
    [
        ("segmenter.encoder=resnet1O1", "segmenter.encoder.*did you mean resnet101"),
        ("cam.preset=refrence", "cam.preset.*did you mean reference"),
        ("trainer.strategy=dpp", "trainer.strategy.*did you mean ddp"),
        ("cam.layers=[layer9]", "cam.layers.*layer9"),
        ("classifier.backbone=vgg16_bn", "classifier.output_stride.*use 32"),
        ("pseudo.grid=[5.0]", "pseudo.grid.*\\(0, 1\\)"),
        ("cam.batch_size=0", "cam.batch_size: must be at least 1"),
        ("trainer.devices=-3", "trainer.devices"),
        ("pseudo.refine=affinty", "pseudo.refine.*did you mean affinity"),
        ("cam.normalise=centred", "unknown key cam.normalise \\(did you mean normalize\\?\\)"),
        ("pseudo.crf=true", "pseudo.refine=crf"),
    ],
)
def test_values_that_fail_late_are_refused_up_front(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("configs/default.yaml", [override])


def test_a_bad_value_stops_the_command_before_any_work(tmp_path, capsys):
    from wsss.cli import main

    assert (
        main(["run", "configs/default.yaml", f"run.dir={tmp_path}", "segmenter.encoder=resnet1O1"])
        == 1
    )
    err = capsys.readouterr().err
    assert "did you mean resnet101" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # not even the run folder or its config.yaml
