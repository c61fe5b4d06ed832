"""The config schema: ranges declared in field metadata are enforced with one message form, and
closed choices come from the modules that define them."""

import dataclasses
import math
import typing

import pytest
import torch

from wsss.cam import CAM_METHODS, NORMALIZATIONS
from wsss.config import SEGMENTER_ARCHITECTURES, Config, ConfigError, Range, load_config
from wsss.config.fields import interval
from wsss.models.segmenter import build_network
from wsss.pseudo.calibrate import OBJECTIVES
from wsss.pseudo.refine import REFINE_METHODS


def _fields():
    """(dotted key, field, annotation) of every config key."""
    for group in dataclasses.fields(Config):
        cls = type(getattr(Config(), group.name))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield f"{group.name}.{f.name}", f, hints[f.name]


def _ranged_keys():
    for key, f, hint in _fields():
        if "check" in f.metadata:
            yield key, f.metadata["check"], typing.get_origin(hint) is list


def _outside(check: Range) -> float:
    """A value just outside the range: an open bound itself, or one below a closed one."""
    if math.isfinite(check.low):
        return check.low if check.open_low else check.low - 1
    return check.high if check.open_high else check.high + 1


RANGED = list(_ranged_keys())


def test_the_ranges_cover_the_keys_that_need_one():
    keys = {key for key, _, _ in RANGED}
    assert {
        "data.batch_size",
        "data.num_workers",
        "cam.scales",
        "pseudo.grid",
        "pseudo.threshold",
        "classifier.lr",
        "segmenter.weight_decay",
        "affinity.lr",
        "affinity.steps",
        "trainer.gradient_clip_val",
    } <= keys


@pytest.mark.parametrize("key, check, is_list", RANGED, ids=[key for key, _, _ in RANGED])
def test_a_value_outside_a_declared_range_is_refused_naming_the_key(key, check, is_list):
    value = [_outside(check)] if is_list else _outside(check)
    with pytest.raises(ConfigError) as err:
        load_config("configs/default.yaml", [f"{key}={value}"])
    assert str(err.value).startswith(f"{key}: {check.wording}, got ")


def test_closed_bounds_are_admitted_and_open_ones_are_not():
    fraction = interval("[0, 1)")
    assert fraction.admits(0.0) and fraction.admits(0.99) and not fraction.admits(1.0)
    assert interval("(0, 1]").admits(1.0) and not interval("(0, 1]").admits(0.0)
    assert not Range(low=0, open_low=True, wording="").admits([])  # a list needs an item
    at_bounds = [
        "pseudo.rho=0",
        "pseudo.delta=1",
        "cam.libra_bound=1",
        "data.num_workers=0",
        "classifier.lr=0",
        "data.negative_fraction=0",
        "affinity.steps=1",
    ]
    cfg = load_config("configs/default.yaml", at_bounds)
    assert cfg.pseudo.rho == 0.0 and cfg.cam.libra_bound == 1.0


def test_closed_choices_come_from_the_modules_that_define_them():
    choices = {key: f.metadata.get("choices") for key, f, _ in _fields()}
    assert choices["cam.method"] == tuple(CAM_METHODS)
    assert (
        set(choices["cam.normalize"]) == set(NORMALIZATIONS)
        and choices["cam.normalize"][0] == "centred"
    )
    assert choices["pseudo.refine"] == tuple(REFINE_METHODS)
    assert choices["pseudo.objective"] == tuple(OBJECTIVES)
    for group in ("classifier", "segmenter"):  # the optimiser keys the training groups share
        assert choices[f"{group}.schedule"] == ("poly", "cosine", "constant")
        assert choices[f"{group}.optimizer"] == ("sgd", "adamw")


@pytest.mark.parametrize("arch", SEGMENTER_ARCHITECTURES)
def test_every_segmenter_architecture_choice_builds_with_the_default_encoder(arch):
    """segmenter.arch offers what smp builds with its own encoders (segmenter.encoder), no more."""
    net = build_network(arch, "resnet18", num_classes=3, in_channels=1).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 128, 128)).shape == (1, 3, 128, 128)  # PAN needs 128 px a side
