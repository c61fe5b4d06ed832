"""The fine-gate and erasing keys reach the pseudo-mask stage: each one changes the maps the
stage writes, a stage run writes the maps the configured module computes, the config refuses
values that cannot work, and at their defaults the keys leave every stage hash as it was."""

import dataclasses

import numpy as np
import pytest
import torch

from wsss import stages
from wsss.config import ConfigError, load_config
from wsss.data.datamodule import build_source, make_loader
from wsss.models.backbones import head_of
from wsss.stages.pseudo_masks import pseudo_module
from wsss.stages.records import stage_hashes

from conftest import reuse_stage, tiny_config

PSEUDO = ("pseudo.calibration_images=4", "pseudo.grid=[0.1, 0.3, 0.5]", "pseudo.num_panels=0")
FINE = ("cam.fine_layer=layer1",)
ERASE = ("cam.erase_steps=2", "cam.erase_score_floor=0.0", "cam.erase_threshold=0.3")


def config(root, *extra):
    return tiny_config(root, *PSEUDO, *extra, size="stage")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_classifier):
    root = tmp_path_factory.mktemp("fine_erase")
    reuse_stage(trained_classifier, root)
    return root


@pytest.fixture(scope="module")
def batch(trained):
    cfg = config(trained)
    classifier = stages.load_classifier(cfg)
    source = build_source(cfg, "train", mean=classifier.hparams.mean, std=classifier.hparams.std)
    return classifier, next(iter(make_loader(source, cfg, 4)))


def fused(trained, batch, *overrides):
    classifier, images = batch
    module = pseudo_module(config(trained, *overrides), classifier)
    with torch.no_grad():
        head_of(module.model).bias.add_(4.0)  # every present class recognised: erasing has slots
    try:
        return module.fused_maps(images["image"], images["labels"])["fused"]
    finally:
        with torch.no_grad():
            head_of(module.model).bias.sub_(4.0)


@pytest.mark.parametrize(
    "base, key, field, value",
    [
        ((), "cam.fine_layer=layer1", "fine_layer", "layer1"),
        (FINE, "cam.fine_power=3.0", "fine_power", 3.0),
        (FINE, "cam.fine_smooth=7", "fine_smooth", 7),
        ((), "cam.erase_steps=2", "erase_steps", 2),
        (ERASE, "cam.erase_score_floor=1.0", "erase_score_floor", 1.0),
        (ERASE, "cam.erase_threshold=0.9", "erase_threshold", 0.9),
    ],
)
def test_each_key_reaches_the_module_and_changes_the_maps(trained, batch, base, key, field, value):
    classifier, _ = batch
    module = pseudo_module(config(trained, *base, key), classifier)
    assert getattr(module.expansion, field) == value
    changed, before = fused(trained, batch, *base, key), fused(trained, batch, *base)
    assert not torch.allclose(changed, before, atol=1e-3), key


def test_a_stage_run_writes_the_gated_and_expanded_maps(trained, batch, tmp_path):
    reuse_stage(trained, tmp_path)
    cfg = config(tmp_path, *FINE, *ERASE, "pseudo.save_maps=true")
    result = stages.make_pseudo_masks(cfg)
    assert result["count"] == 12
    classifier, images = batch
    module = pseudo_module(cfg, classifier)
    expected = module.fused_maps(images["image"], images["labels"])
    plain = pseudo_module(config(tmp_path), classifier).fused_maps(
        images["image"], images["labels"]
    )["fused"]
    out = tmp_path / "default" / "pseudo_masks" / "maps"
    differs = False
    for i, sample_id in enumerate(images["id"]):
        saved = torch.from_numpy(np.load(out / f"{sample_id}.npz")["maps"].astype(np.float32))
        keep = expected["valid"][i]
        assert torch.allclose(saved, expected["fused"][i, keep], atol=2e-3)
        differs |= not torch.allclose(saved, plain[i, keep], atol=1e-2)
    assert differs


def test_config_refuses_what_cannot_work(tmp_path):
    with pytest.raises(ConfigError, match=r"cam.fine_layer: 'layer9' is not a module"):
        config(tmp_path, "cam.fine_layer=layer9")
    with pytest.raises(ConfigError, match="cam.fine_layer: input .* needs cam.method=relevance"):
        config(tmp_path, "cam.fine_layer=input", "cam.method=gradcam")
    with pytest.raises(ConfigError, match="cam.fine_smooth: must be an odd size, got 4"):
        config(tmp_path, "cam.fine_smooth=4")
    with pytest.raises(ConfigError, match="cam.erase_score_floor"):
        config(tmp_path, "cam.erase_score_floor=1.5")
    assert config(tmp_path, "cam.fine_layer=input").cam.fine_layer == "input"


def test_the_keys_at_their_defaults_leave_the_stage_hashes_and_set_change_them():
    cfg = load_config("configs/default.yaml", [])
    defaults = {f.name: getattr(cfg.cam, f.name) for f in dataclasses.fields(cfg.cam)}
    assert defaults["fine_layer"] is None and defaults["erase_steps"] == 0
    before = stage_hashes(cfg)
    changed = stage_hashes(load_config("configs/default.yaml", ["cam.erase_steps=1"]))
    assert changed["pseudo_masks"] != before["pseudo_masks"]
    assert changed["classifier"] == before["classifier"]
