"""ViT / DeiT backbones in the pipeline: the classifier they build, their default CAM layers, the
config keys and checks, and the whole pipeline on a tiny ViT."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from wsss.cam import LiftCAM, RelevanceCAM, Rule, preset_config
from wsss.cli import main
from wsss.config import ConfigError
from wsss.data.datamodule import StageDataModule
from wsss.models.classifier import ClassifierModule
from wsss.models.vit_backbones import (
    build_vit_backbone,
    check_vit_cam_layers,
    default_cam_preset,
    default_vit_cam_layers,
    resample_grid,
)
from wsss.stages import classifier as stage
from wsss.stages.calibration import pseudo_module_options

from conftest import reuse_stage, tiny_args, tiny_config


def head_input(model, x):
    """The final norm's output (B, N, C), recorded with a hook."""
    seen = {}
    handle = model.norm.register_forward_hook(lambda m, a, out: seen.update(t=out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, seen["t"]


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "vit_b_32"])
def test_token_and_gap_heads(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    for pool in ("token", "gap"):
        model = build_vit_backbone(name, 4, token_pool=pool).eval()
        with torch.no_grad():
            logits, t = head_input(model, x)
            pooled = t[:, 0] if pool == "token" else t[:, 1:].mean(1)
            torch.testing.assert_close(logits, model.head(pooled))
        assert logits.shape == (2, 4)
    with pytest.raises(ValueError, match="token_pool"):
        build_vit_backbone(name, 4, token_pool="mean")


def test_position_embeddings_follow_the_image_size():
    pos = torch.randn(1, 1 + 4 * 4, 6)
    assert resample_grid(pos, 1, (4, 4), (4, 4)) is pos
    constant = torch.cat([torch.zeros(1, 1, 6), torch.ones(1, 16, 6) * 0.7], 1)
    out = resample_grid(constant, 1, (4, 4), (6, 5))
    assert out.shape == (1, 1 + 30, 6)
    torch.testing.assert_close(out[:, 1:], torch.full((1, 30, 6), 0.7))
    assert (out[:, 0] == 0).all()  # the class token's row is kept
    model = build_vit_backbone("deit_tiny_patch16_224", 3).eval()
    for size in (64, 96, 112):  # crops and full images alike; one traced plan for all
        with RelevanceCAM(model, ["blocks.3", "blocks.11"]) as cam:
            maps = cam(torch.randn(1, 3, size, size), torch.tensor([1]))
        assert maps["blocks.3"].shape == (1, 1, size // 16, size // 16)


def test_linear_layers_after_the_position_embeddings_get_the_linear_rule():
    """The image reaches the position embeddings' resampling only through its size (a shape,
    not a value), so the Linear layers after it are not the input layer: the head gets the
    composite's Linear rule (here ε with the bias: R = p ⊙ W_t / (z_t ± ε) on the class token)."""
    torch.manual_seed(0)
    model = build_vit_backbone("deit_tiny_patch16_224", 4).double().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.tensor([1, 3])
    linear = Rule("epsilon", epsilon=1e-9, bias=1.0)
    with RelevanceCAM(model, ["norm"], preset="lrp", linear=linear) as cam:
        a, r = cam.relevance(x, t)["norm"]
    p = a[:, 0]
    with torch.no_grad():
        z = model.head(p).gather(1, t[:, None])
    want = p * model.head.weight[t].detach() / (z + torch.where(z >= 0, 1e-9, -1e-9))
    torch.testing.assert_close(r[:, 0, 0], want, rtol=1e-9, atol=1e-12)
    assert (r[:, 0, 1:] == 0).all()


def test_default_layers_and_layer_check():
    assert default_vit_cam_layers("deit_tiny_patch16_224") == ("blocks.3", "blocks.7", "blocks.11")
    assert default_vit_cam_layers("vit_b_16") == ("blocks.3", "blocks.7", "blocks.11")
    check_vit_cam_layers("vit_b_16", ["blocks.0", "blocks.11.mlp", "input"])
    with pytest.raises(
        ValueError, match="blocks.12. is not a block of vit_b_16.*did you mean.*blocks.11"
    ):
        check_vit_cam_layers("vit_b_16", ["blocks.12"])


def test_config_fills_and_checks_vit_layers(tmp_path):
    vit = ("classifier.backbone=deit_tiny_patch16_224", "classifier.output_stride=32")
    cfg = tiny_config(tmp_path, *vit)
    assert cfg.cam.layers == ["blocks.3", "blocks.7", "blocks.11"]
    with pytest.raises(ConfigError, match="cam.layers"):
        tiny_config(tmp_path, *vit, "cam.layers=[blocks.30]")
    with pytest.raises(ConfigError, match="classifier.output_stride"):
        tiny_config(tmp_path, "classifier.backbone=deit_tiny_patch16_224")  # tiny runs use 16
    with pytest.raises(ConfigError, match="classifier.token_pool"):
        tiny_config(tmp_path, *vit, "classifier.token_pool=mean")


def test_vit_backbones_default_to_the_transformer_preset_and_cnns_keep_default(tmp_path):
    """cam.preset unset: transformer (the default rules, per-position weights) for a ViT
    backbone, default for a CNN; a preset that is set stays; the pseudo-mask stage gets the
    resolved one."""
    vit = ("classifier.backbone=deit_tiny_patch16_224", "classifier.output_stride=32")
    cfg = tiny_config(tmp_path, *vit)
    assert cfg.cam.preset == "transformer"
    assert tiny_config(tmp_path, *vit, "cam.preset=attnlrp").cam.preset == "attnlrp"
    assert tiny_config(tmp_path).cam.preset == "default"
    # the one resolver, which scripts/benchmark_cam.py also uses for its --preset
    assert [default_cam_preset(n) for n in ("vit_b_16", "resnet50", "timm:resnet18")] == [
        "transformer",
        "default",
        "default",
    ]
    classifier = SimpleNamespace(hparams=SimpleNamespace(mean=None, std=None))
    assert pseudo_module_options(cfg, classifier)["preset"] == "transformer"
    model = build_vit_backbone("deit_tiny_patch16_224", 3).eval()
    with RelevanceCAM(model, cfg.cam.layers, preset=cfg.cam.preset) as cam:
        assert cam.config == preset_config("default", weights="position")


def test_classifier_module_builds_the_vit_with_its_pool():
    module = ClassifierModule(3, backbone="deit_tiny_patch16_224", token_pool="gap")
    assert module.model.token_pool == "gap" and module.hparams.token_pool == "gap"


@pytest.mark.slow
def test_pipeline_end_to_end_with_a_tiny_vit(tmp_path):
    args = tiny_args(
        tmp_path,
        "classifier.backbone=deit_tiny_patch16_224",
        "classifier.output_stride=32",
        "classifier.token_pool=gap",
        "classifier.optimizer=adamw",
        "classifier.lr=0.0005",
    )
    assert main(["run", *args]) == 0
    run = tmp_path / "default"
    report = json.loads((run / "report.json").read_text())
    for key in ("seed_miou", "pseudo_miou", "refined_miou", "seg_miou"):
        assert 0.0 <= report[key] <= 1.0, key
    assert len(list((run / "pseudo_masks").glob("syn_*.png"))) == 16
    checkpoint = next((run / "classifier").rglob("*.ckpt"))
    hparams = torch.load(checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]
    assert hparams["token_pool"] == "gap"  # the key reached the classifier


def test_classifier_stage_passes_token_pool(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        stage, "fit_stage", lambda cfg, name, module, *a, **k: seen.update(m=module)
    )
    vit = ("classifier.backbone=deit_tiny_patch16_224", "classifier.output_stride=32")
    for pool in ("gap", "token"):
        cfg = tiny_config(tmp_path, *vit, f"classifier.token_pool={pool}")
        stage.fit_classifier(cfg, "classifier", lambda: StageDataModule(cfg, "classifier"), None)
        assert seen["m"].model.token_pool == pool


VIT_STAGE = (
    "classifier.backbone=deit_tiny_patch16_224",
    "classifier.output_stride=32",
    "classifier.token_pool=gap",
    "classifier.optimizer=adamw",
    "classifier.lr=0.0005",
)


@pytest.fixture(scope="module")
def trained_vit(tmp_path_factory):
    """A run root holding a tiny ViT classifier (the "stage" size: 12 images, one epoch)."""
    root = tmp_path_factory.mktemp("trained_vit")
    assert main(["train-classifier", *tiny_args(root, *VIT_STAGE, size="stage")]) == 0
    return root


@pytest.mark.slow
def test_affinity_refinement_on_a_vit(trained_vit, tmp_path):
    """pseudo.refine=affinity with a ViT: the blocks' tokens are the affinity head's levels, on
    their patch grid; the stage refines every mask and the segmenter trains on them."""
    reuse_stage(trained_vit, tmp_path)
    refine = ("pseudo.refine=affinity", "affinity.max_epochs=1", "affinity.steps=4")
    assert main(["run", *tiny_args(tmp_path, *VIT_STAGE, *refine, size="stage")]) == 0
    run = tmp_path / "default"
    report = json.loads((run / "report.json").read_text())
    assert 0.0 <= report["refined_miou"] <= 1.0 and 0.0 <= report["seg_miou"] <= 1.0
    refined = sorted(p.name for p in (run / "affinity" / "masks").glob("syn_*.png"))
    assert refined == sorted(p.name for p in (run / "pseudo_masks").glob("syn_*.png"))
    assert len(refined) == 12
    state = torch.load(run / "affinity" / "last.ckpt", weights_only=False)["state_dict"]
    # each level's branch reads the 192 channels of DeiT-Tiny's tokens, not the token count
    assert state["net.branches.0.0.weight"].shape[1] == 192


@pytest.mark.slow
def test_liftcam_pseudo_masks_on_a_vit(trained_vit, tmp_path, monkeypatch):
    """cam.method=liftcam on a ViT classifier: LIFT-CAM maps every image, each gets a mask."""
    seen = []
    original = LiftCAM.__call__

    def counted(self, images, targets):
        maps = original(self, images, targets)
        seen.extend(m.shape[-2:] for m in maps.values())
        return maps

    monkeypatch.setattr(LiftCAM, "__call__", counted)
    reuse_stage(trained_vit, tmp_path)
    args = tiny_args(tmp_path, *VIT_STAGE, "cam.method=liftcam", size="stage")
    assert main(["make-pseudo-masks", *args]) == 0
    masks = tmp_path / "default" / "pseudo_masks"
    assert len(list(masks.glob("syn_*.png"))) == 12
    assert seen and all(hw == (4, 4) for hw in seen)  # 64 px images, 16 px patches
