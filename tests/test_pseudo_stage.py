"""The pseudo-mask stage: valid PNGs, resuming after an interruption, DDP shares, the VOC path."""

import json

import lightning as L
import numpy as np
import pytest
from PIL import Image

from wsss import pipeline, stages
from wsss.config import load_config
from wsss.data.datamodule import build_source
from wsss.stages import pseudo_masks as pseudo_stage

from conftest import SimulatedKill, digest, reuse_stage, tiny_config

# four calibration images, a coarse grid and two panels: the stage's own settings for these tests
PSEUDO = ("pseudo.calibration_images=4", "pseudo.grid=[0.1, 0.3, 0.5]", "pseudo.num_panels=2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, trained_classifier):
    """A run root of this module's own, starting from the shared classifier."""
    root = tmp_path_factory.mktemp("pseudo")
    reuse_stage(trained_classifier, root)
    return root


def config(root, *extra):
    return tiny_config(root, *PSEUDO, *extra, size="stage")


def test_pseudo_masks_are_valid_palette_pngs(trained):
    cfg = config(trained)
    result = stages.make_pseudo_masks(cfg)
    out = trained / "default" / "pseudo_masks"
    masks = sorted(out.glob("syn_*.png"))
    assert len(masks) == 12 and result["count"] == 12
    source = build_source(cfg, "train")
    for path in masks:
        with Image.open(path) as img:
            assert img.mode == "P" and img.size == (64, 64)
            values = np.unique(np.array(img))
        assert set(values.tolist()) <= {0, 1, 2, 3, 4, 255}
    # a pseudo-mask only holds classes of its image's labels
    for index in range(len(source)):
        raw = source.load_raw(index)
        values = np.unique(np.array(Image.open(out / f"{raw.id}.png")))
        allowed = {0, 255} | {int(c) + 1 for c in np.flatnonzero(raw.labels)}
        assert set(values.tolist()) <= allowed
    assert (out / "panels.png").is_file() and (out / "manifest.json").is_file()
    assert 0.0 <= result["seed_miou"] <= 1.0 and 0.0 <= result["pseudo_miou"] <= 1.0


def test_interrupted_stage_resumes_to_identical_files(trained, tmp_path, monkeypatch):
    reference = digest(trained / "default" / "pseudo_masks")
    if not reference:
        stages.make_pseudo_masks(config(trained))
        reference = digest(trained / "default" / "pseudo_masks")
    reuse_stage(trained, tmp_path)

    class KillAfterTwoBatches(L.Callback):
        def on_predict_batch_end(
            self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0
        ):
            if batch_idx == 1:
                raise SimulatedKill("killed")

    original = pseudo_stage.make_trainer
    extra = [KillAfterTwoBatches()]
    monkeypatch.setattr(
        pseudo_stage,
        "make_trainer",
        lambda cfg, epochs, logger=False, callbacks=None, **kw: original(
            cfg, epochs, logger, (callbacks or []) + extra, **kw
        ),
    )
    cfg = config(tmp_path)
    with pytest.raises(SimulatedKill):
        stages.make_pseudo_masks(cfg)
    out = tmp_path / "default" / "pseudo_masks"
    assert len(list(out.glob("syn_*.png"))) == 8  # two batches of 4 landed
    extra.clear()
    result = stages.make_pseudo_masks(cfg)
    assert result["written_now"] == 4
    assert digest(out) == reference


def test_rerun_skips_and_changed_config_is_refused(trained):
    first = stages.make_pseudo_masks(config(trained))
    again = stages.make_pseudo_masks(config(trained))
    assert again["skipped"] and again["count"] == first["count"]
    with pytest.raises(stages.StageError, match="different config"):
        stages.make_pseudo_masks(config(trained, "pseudo.ignore_band=0.2"))


@pytest.mark.slow
def test_ddp_two_processes_write_every_id_once(trained, tmp_path):
    stages.make_pseudo_masks(config(trained))  # the single-process reference (skipped if done)
    reuse_stage(trained, tmp_path)
    cfg = config(tmp_path, "trainer.devices=2", "trainer.strategy=ddp_spawn", "cam.batch_size=2")
    result = stages.make_pseudo_masks(cfg)
    out = tmp_path / "default" / "pseudo_masks"
    ids = sorted(p.stem for p in out.glob("syn_*.png"))
    assert ids == sorted(build_source(cfg, "train").ids)
    shares = result["rank_counts"]
    assert len(shares) == 2 and all(n > 0 for n in shares.values()) and sum(shares.values()) == 12
    reference = trained / "default" / "pseudo_masks"
    masks = {k: v for k, v in digest(out).items() if not k.startswith("confidence/")}
    assert masks == {k: v for k, v in digest(reference).items() if not k.startswith("confidence/")}
    # confidences are 8-bit levels of a float margin: the two processes batch images otherwise,
    # which moves the last bits of the maps and so, rarely, a level by one
    for path in sorted((reference / "confidence").glob("syn_*.png")):
        ours = np.array(Image.open(out / "confidence" / path.name), dtype=np.int16)
        assert np.abs(ours - np.array(Image.open(path), dtype=np.int16)).max() <= 1


@pytest.mark.slow
def test_voc_path_runs_every_stage_on_voc_mini(voc_copy, tmp_path):
    """Every stage on voc_mini. pseudo.score_split=train also scores seeds and pseudo-masks on the
    pseudo-labelled images of the train split: here three of the four, as train.txt lists three
    train_aug images and one val image (which has no pseudo-mask)."""
    splits = voc_copy / "ImageSets" / "Segmentation"
    train_ids = (splits / "train.txt").read_text().split()
    val_id = (splits / "val.txt").read_text().split()[0]
    (splits / "train.txt").write_text("\n".join([*train_ids[:3], val_id]) + "\n")
    cfg = load_config(
        "configs/voc.yaml",
        [
            f"data.root={voc_copy}",
            "data.train_split=train_aug",
            "data.val_split=val",
            f"run.dir={tmp_path}",
            "data.crop_size=96",
            "data.batch_size=2",
            "data.num_workers=0",
            "classifier.backbone=resnet18",
            "classifier.pretrained=false",
            "classifier.max_epochs=1",
            "cam.scales=[1.0]",
            "cam.flip=false",
            "cam.batch_size=2",
            "pseudo.calibration_images=2",
            "pseudo.grid=[0.2, 0.4]",
            "pseudo.score_split=train",
            "segmenter.encoder=resnet18",
            "segmenter.arch=FPN",
            "segmenter.pretrained=false",
            "segmenter.max_epochs=1",
            "segmenter.eval_scales=[1.0]",
            "segmenter.eval_flip=false",
            "trainer.accelerator=cpu",
            "trainer.precision=32-true",
            "logger.kind=csv",
        ],
    )
    report = pipeline.run_all(cfg, echo=lambda _: None)
    for key in ("seed_miou", "pseudo_miou", "seg_miou"):
        assert report[key] is not None and np.isfinite(report[key])
    assert len(report["per_class_iou"]) == 21
    preds = sorted((tmp_path / "voc" / "evaluation" / "val").glob("*.png"))
    assert len(preds) == 14
    sample = preds[0]
    with Image.open(voc_copy / "SegmentationClass" / sample.name) as gt, Image.open(sample) as pred:
        assert pred.size == gt.size
    written = json.loads((tmp_path / "voc" / "report.json").read_text())
    assert written["data"] == "voc"
    scored = written["scored_on"]
    assert scored["split"] == "train" and scored["images"] == 3
    assert 0.0 <= scored["seed_miou"] <= 1.0 and 0.0 <= scored["pseudo_miou"] <= 1.0
    assert "On the `train` split (3 images" in (tmp_path / "voc" / "report.md").read_text()


def test_padded_batch_of_mixed_sizes_gives_each_image_its_own_maps():
    """Two images of different sizes padded to one canvas: each gets exactly the maps it gets
    alone (padding never enters a map or its centring), and zeros outside its own pixels."""
    import torch
    import torchvision

    from wsss.data.datamodule import pad_collate
    from wsss.models.pseudo_labeler import PseudoMaskModule

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    module = PseudoMaskModule(
        model, layers=["layer3", "layer4"], scales=[1.0, 0.75], flip=True, normalize="centred"
    )
    items = [
        {"image": torch.randn(3, 64, 48), "labels": torch.tensor([1.0, 0, 1, 0]), "id": "a"},
        {"image": torch.randn(3, 48, 64), "labels": torch.tensor([0, 1.0, 0, 0]), "id": "b"},
    ]
    batch = pad_collate(items)
    assert batch["image"].shape[-2:] == (64, 64)
    together = module.fused_maps(batch["image"], batch["labels"], batch["size"])
    for i, item in enumerate(items):
        alone = module.fused_maps(item["image"][None], item["labels"][None])
        h, w = item["image"].shape[1:]
        k = alone["fused"].shape[1]
        assert torch.allclose(together["fused"][i, :k, :h, :w], alone["fused"][0], atol=1e-5)
        for name in ("layer3", "layer4"):
            assert torch.allclose(
                together["layers"][name][i, :k, :h, :w], alone["layers"][name][0], atol=1e-5
            )
        outside = torch.ones(64, 64, dtype=torch.bool)
        outside[:h, :w] = False
        assert together["fused"][i][:, outside].abs().max() == 0
    # without sizes the padding is part of the image, and the maps differ
    padded = module.fused_maps(batch["image"], batch["labels"])
    assert not torch.allclose(
        padded["fused"][0, :2, :64, :48], together["fused"][0, :2, :64, :48], atol=1e-3
    )
    with pytest.raises(ValueError, match="sizes"):
        module.fused_maps(batch["image"], batch["labels"], torch.tensor([[65, 10], [10, 10]]))
