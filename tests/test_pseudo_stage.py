"""The pseudo-mask stage: valid PNGs, resuming after an interruption, DDP shares, the VOC path."""

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from wsss import pipeline, stages
from wsss.data.datamodule import build_source
from wsss.stages import pseudo_masks as pseudo_stage
from wsss.config import load_config


class SimulatedKill(RuntimeError):
    """Stands in for a killed process: Lightning re-raises it after its own clean-up."""


TINY = [
    "data.num_train=12", "data.num_val=4", "data.image_size=64", "data.crop_size=64",
    "data.batch_size=4", "data.num_workers=0", "classifier.max_epochs=1", "classifier.output_stride=16",
    "cam.batch_size=4", "cam.flip=false", "pseudo.calibration_images=4", "pseudo.grid=[0.1, 0.3, 0.5]",
    "pseudo.num_panels=2", "pseudo.refine=none", "logger.kind=none", "trainer.accelerator=cpu", "trainer.devices=1",
]


def digest(directory):
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("syn_*.png"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudo")
    cfg = load_config("configs/default.yaml", [f"run.dir={root}", *TINY])
    stages.train_classifier(cfg)
    return root


def config(root, *extra):
    return load_config("configs/default.yaml", [f"run.dir={root}", *TINY, *extra])


def copy_classifier(src_root, dst_root):
    import shutil

    shutil.copytree(src_root / "default" / "classifier", dst_root / "default" / "classifier")


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
    import lightning as L

    reference = digest(trained / "default" / "pseudo_masks")
    if not reference:
        stages.make_pseudo_masks(config(trained))
        reference = digest(trained / "default" / "pseudo_masks")
    copy_classifier(trained, tmp_path)

    class KillAfterTwoBatches(L.Callback):
        def on_predict_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
            if batch_idx == 1:
                raise SimulatedKill("killed")

    original = pseudo_stage.make_trainer
    extra = [KillAfterTwoBatches()]
    monkeypatch.setattr(pseudo_stage, "make_trainer", lambda cfg, epochs, logger=False, callbacks=None, **kw:
                        original(cfg, epochs, logger, (callbacks or []) + extra, **kw))
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
    copy_classifier(trained, tmp_path)
    cfg = config(tmp_path, "trainer.devices=2", "trainer.strategy=ddp_spawn", "cam.batch_size=2")
    result = stages.make_pseudo_masks(cfg)
    out = tmp_path / "default" / "pseudo_masks"
    ids = sorted(p.stem for p in out.glob("syn_*.png"))
    assert ids == sorted(build_source(cfg, "train").ids)
    shares = result["rank_counts"]
    assert len(shares) == 2 and all(n > 0 for n in shares.values()) and sum(shares.values()) == 12
    assert digest(out) == digest(trained / "default" / "pseudo_masks")


@pytest.mark.slow
def test_voc_path_runs_every_stage_on_voc_mini(voc_root, tmp_path):
    cfg = load_config("configs/voc.yaml", [
        f"data.root={voc_root}", "data.train_split=train_aug", "data.val_split=val", f"run.dir={tmp_path}",
        "data.crop_size=96", "data.batch_size=2", "data.num_workers=0",
        "classifier.backbone=resnet18", "classifier.pretrained=false", "classifier.max_epochs=1",
        "cam.scales=[1.0]", "cam.flip=false", "cam.batch_size=2", "pseudo.calibration_images=2",
        "pseudo.grid=[0.2, 0.4]", "segmenter.encoder=resnet18", "segmenter.arch=FPN",
        "segmenter.pretrained=false", "segmenter.max_epochs=1", "segmenter.eval_scales=[1.0]",
        "segmenter.eval_flip=false", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "logger.kind=csv"])
    report = pipeline.run_all(cfg, echo=lambda _: None)
    for key in ("seed_miou", "pseudo_miou", "seg_miou"):
        assert report[key] is not None and np.isfinite(report[key])
    assert len(report["per_class_iou"]) == 21
    preds = sorted((tmp_path / "voc" / "evaluation" / "val").glob("*.png"))
    assert len(preds) == 14
    sample = preds[0]
    with Image.open(voc_root / "SegmentationClass" / sample.name) as gt, Image.open(sample) as pred:
        assert pred.size == gt.size
    assert json.loads((tmp_path / "voc" / "report.json").read_text())["data"] == "voc"


def test_padded_batch_of_mixed_sizes_gives_each_image_its_own_maps():
    """Two images of different sizes padded to one canvas: each gets exactly the maps it gets
    alone (padding never enters a map or its centring), and zeros outside its own pixels."""
    import torch
    import torchvision

    from wsss.data.datamodule import pad_collate
    from wsss.models.pseudo_labeler import PseudoMaskModule

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    module = PseudoMaskModule(model, layers=["layer3", "layer4"], scales=[1.0, 0.75], flip=True,
                              normalize="centred")
    items = [{"image": torch.randn(3, 64, 48), "labels": torch.tensor([1.0, 0, 1, 0]), "id": "a"},
             {"image": torch.randn(3, 48, 64), "labels": torch.tensor([0, 1.0, 0, 0]), "id": "b"}]
    batch = pad_collate(items)
    assert batch["image"].shape[-2:] == (64, 64)
    together = module.fused_maps(batch["image"], batch["labels"], batch["size"])
    for i, item in enumerate(items):
        alone = module.fused_maps(item["image"][None], item["labels"][None])
        h, w = item["image"].shape[1:]
        k = alone["fused"].shape[1]
        assert torch.allclose(together["fused"][i, :k, :h, :w], alone["fused"][0], atol=1e-5)
        for name in ("layer3", "layer4"):
            assert torch.allclose(together["layers"][name][i, :k, :h, :w], alone["layers"][name][0], atol=1e-5)
        outside = torch.ones(64, 64, dtype=torch.bool)
        outside[:h, :w] = False
        assert together["fused"][i][:, outside].abs().max() == 0
    # without sizes the padding is part of the image, and the maps differ
    padded = module.fused_maps(batch["image"], batch["labels"])
    assert not torch.allclose(padded["fused"][0, :2, :64, :48], together["fused"][0, :2, :64, :48], atol=1e-3)
    with pytest.raises(ValueError, match="sizes"):
        module.fused_maps(batch["image"], batch["labels"], torch.tensor([[65, 10], [10, 10]]))
