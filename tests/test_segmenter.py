"""SegmenterModule: it learns from ground-truth masks, takes any image size, averages scales and
flips into probabilities, stops on a non-finite loss, and draws validation panels."""

import re
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torch.utils.data import DataLoader

from wsss.data.synthetic import SyntheticSegmentation
from wsss.metrics import miou_reference
from wsss.models.common import NonFiniteLossError
from wsss.models.segmenter import SegmenterModule
from wsss.viz import denormalise, heatmap, overlay, panel_grid, save_png

NUM_CLASSES = 5  # background + the 4 synthetic classes


def synthetic_items(n, size, seed=0):
    data = SyntheticSegmentation("train", num_images=n, image_size=size, seed=seed)
    return [data[i] for i in range(n)], data.stats


def trainer(**kwargs):
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)


@pytest.mark.slow  # about 13 s on an idle 2-core CPU
def test_trained_on_ground_truth_beats_chance(monkeypatch):
    """A few dozen SGD steps on 8 synthetic images: mIoU on the same images well above what a
    constant all-background prediction (the strongest image-blind guess) scores.

    Measured (Unet/resnet18, 48 px, 60 steps, seeds 0/1/2): mIoU 0.55 / 0.66 / 0.37 against 0.17
    for all-background (uniform random guessing: 0.06). The bar is all-background + 0.10.
    """
    panels = []
    monkeypatch.setattr(
        "wsss.tracking.log_mask_overlays",
        lambda logger, key, items, names, step=None: panels.append((key, items, names)),
    )
    items, (mean, std) = synthetic_items(8, 48)
    L.seed_everything(0, verbose=False)
    names = ["background", *SyntheticSegmentation.class_names]
    module = SegmenterModule(
        NUM_CLASSES,
        arch="Unet",
        encoder="resnet18",
        lr=0.05,
        class_names=names,
        mean=mean,
        std=std,
        num_panels=2,
    )
    steps = 60
    fit = trainer(max_steps=steps)
    fit.fit(module, DataLoader(items, batch_size=8, shuffle=True))
    # the poly schedule ran to its end over estimated_stepping_batches (= max_steps)
    assert fit.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        0.05 * (1 - steps / steps) ** 0.9, abs=1e-9
    )

    (logged,) = trainer().validate(module, DataLoader(items, batch_size=3), verbose=False)

    images = torch.stack([s["image"] for s in items])
    masks = torch.stack([s["mask"] for s in items])
    module.eval()
    preds = module.predict_probs(images).argmax(1)
    whole_split = miou_reference(preds, masks, NUM_CLASSES)
    background_only = miou_reference(torch.zeros_like(masks), masks, NUM_CLASSES)
    # accumulated over 3 uneven batches, the logged mIoU is torchmetrics' over the whole split
    assert logged["val/miou"] == pytest.approx(whole_split, abs=1e-5)
    assert {f"val/iou_{name}" for name in names} <= set(logged)
    assert whole_split > background_only + 0.10, (whole_split, background_only)

    # once per validation epoch: num_panels images with prediction and ground truth overlays
    assert len(panels) == 1 and panels[0][0] == "val/overlays" and panels[0][2] == names
    items = panels[0][1]
    assert len(items) == 2
    for item in items:
        assert item["image"].dtype == np.uint8 and item["image"].shape == (48, 48, 3)
        assert set(item["masks"]) == {"prediction", "ground_truth"}
        assert item["masks"]["ground_truth"].shape == (48, 48)


def test_validation_without_masks_scores_nothing_and_does_not_fail():
    items, _ = synthetic_items(2, 32)
    for item in items:
        del item["mask"]
    module = SegmenterModule(NUM_CLASSES, arch="Unet")
    (logged,) = trainer().validate(module, DataLoader(items, batch_size=2), verbose=False)
    assert "val/miou" not in logged and not any(key.startswith("val/iou") for key in logged)


@pytest.mark.parametrize(
    "arch, in_channels, size",
    [
        ("DeepLabV3Plus", 3, (70, 45)),
        ("Unet", 1, (33, 65)),
    ],
)
def test_forward_returns_logits_at_any_input_size(arch, in_channels, size):
    torch.manual_seed(0)
    module = SegmenterModule(NUM_CLASSES, arch=arch, in_channels=in_channels).eval()
    with torch.no_grad():
        logits = module(torch.randn(2, in_channels, *size))
    assert logits.shape == (2, NUM_CLASSES, *size)
    assert torch.isfinite(logits).all()


def test_multi_scale_flip_prediction_is_a_probability_map():
    torch.manual_seed(0)
    module = SegmenterModule(
        NUM_CLASSES, arch="Unet", eval_scales=(0.75, 1.25), eval_flip=True
    ).eval()
    probs = module.predict_probs(torch.randn(1, 3, 45, 70))
    assert probs.shape == (1, NUM_CLASSES, 45, 70)
    assert (probs >= 0).all()
    assert torch.allclose(probs.sum(1), torch.ones(1, 45, 70), atol=1e-5)


def test_flip_averaging_is_flip_equivariant_and_single_scale_is_plain_softmax():
    torch.manual_seed(0)
    module = SegmenterModule(NUM_CLASSES, arch="Unet", eval_flip=True).eval()
    x = torch.randn(1, 3, 32, 32)  # a multiple of 32: no padding to break the symmetry
    assert torch.allclose(
        module.predict_probs(x.flip(-1)), module.predict_probs(x).flip(-1), atol=1e-5
    )
    module.hparams.eval_flip = False
    with torch.no_grad():
        assert torch.allclose(module.predict_probs(x), module(x).softmax(1), atol=1e-6)


class NaNAfter(torch.utils.data.Dataset):
    """Synthetic items whose images turn NaN from index ``start`` on."""

    def __init__(self, items, start):
        self.items, self.start = items, start

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = dict(self.items[i])
        if i >= self.start:
            item["image"] = torch.full_like(item["image"], float("nan"))
        return item


def test_non_finite_loss_stops_training_and_no_nan_checkpoint_is_written(tmp_path):
    items, _ = synthetic_items(4, 32)
    L.seed_everything(0, verbose=False)
    module = SegmenterModule(NUM_CLASSES, arch="Unet", lr=0.01)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    fit = trainer(
        max_steps=4, enable_checkpointing=True, callbacks=[checkpoints], default_root_dir=tmp_path
    )
    with pytest.raises(NonFiniteLossError) as err:
        fit.fit(module, DataLoader(NaNAfter(items, start=2), batch_size=2, shuffle=False))
    message = str(err.value)
    assert "step 1" in message and "learning rate" in message
    assert re.search(r"last finite loss \d+\.\d+", message), message
    # raised before the optimizer step: the weights, and every checkpoint written, stay finite
    assert all(torch.isfinite(p).all() for p in module.parameters())
    for path in tmp_path.glob("*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path


def test_all_void_batch_gives_a_zero_loss_not_a_non_finite_error():
    module = SegmenterModule(NUM_CLASSES, arch="Unet")
    batch = {
        "image": torch.randn(2, 3, 32, 32),
        "mask": torch.full((2, 32, 32), 255, dtype=torch.long),
    }
    with pytest.warns(UserWarning, match="self.log"):  # no trainer attached here
        loss = module.training_step(batch, 0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()


def test_poly_schedule_per_optimizer_step():
    module = SegmenterModule(NUM_CLASSES, arch="Unet", lr=0.01, momentum=0.8, weight_decay=1e-3)
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"]) == (0.8, 1e-3)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert group["lr"] == pytest.approx(0.01 * (1 - 5 / 10) ** 0.9)


def test_ce_dice_loss_is_cross_entropy_plus_soft_dice_over_valid_pixels():
    """Closed form: CE over pixels not 255, plus the mean over classes of 1 - 2|P.Y| / (|P| + |Y|)
    on valid pixels, a class absent from the valid pixels adding 0."""
    from wsss.models.segmenter import SegmenterLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6)
    mask = torch.randint(0, 3, (2, 5, 6))  # class 3 absent
    mask[0, :2] = 255
    valid = mask != 255
    probs = logits.softmax(1).permute(1, 0, 2, 3)[:, valid]  # C x valid pixels
    target = torch.nn.functional.one_hot(mask[valid], 4).T.float()
    dice = 2 * (probs * target).sum(1) / (probs.sum(1) + target.sum(1))
    expected_dice = ((1 - dice) * (target.sum(1) > 0)).mean()
    expected_ce = (
        -logits.log_softmax(1).permute(1, 0, 2, 3)[:, valid].gather(0, mask[valid][None]).mean()
    )
    assert SegmenterLoss("ce")(logits, mask) == pytest.approx(float(expected_ce), abs=1e-6)
    assert SegmenterLoss("ce_dice")(logits, mask) == pytest.approx(
        float(expected_ce + expected_dice), abs=1e-5
    )
    with pytest.raises(ValueError, match="ce_dice"):
        SegmenterLoss("focal")


def test_adamw_with_a_constant_schedule():
    module = SegmenterModule(
        NUM_CLASSES,
        arch="Unet",
        lr=0.002,
        optimizer="adamw",
        schedule="constant",
        weight_decay=0.01,
    )
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert (
        isinstance(optimizer, torch.optim.AdamW)
        and optimizer.param_groups[0]["weight_decay"] == 0.01
    )
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.002)


def test_missing_pretrained_weights_explain_the_way_out(monkeypatch):
    import segmentation_models_pytorch as smp

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(smp, "create_model", offline)
    with pytest.raises(RuntimeError) as err:
        SegmenterModule(NUM_CLASSES, pretrained=True)
    assert "segmenter.pretrained=false" in str(err.value) and "cache" in str(err.value)


# ---- viz helpers used by the panels


def test_denormalise_16_bit_grayscale_to_rgb_uint8():
    raw = torch.linspace(0, 4095, 16).view(1, 4, 4)
    image = denormalise((raw - 1000.0) / 500.0, [1000.0], [500.0], (0, 255))
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8
    assert image.min() == 0 and image.max() == 255
    assert (image[..., 0] == image[..., 2]).all()
    rgb = torch.full((3, 2, 2), 100.0)
    assert (denormalise((rgb - 127.0) / 60.0, [127.0] * 3, [60.0] * 3, (0, 255)) == 100).all()
    # 0-1 units by default, as torchvision's Normalize and box_rule take them
    unit = torch.full((3, 2, 2), 100.0 / 255.0)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    normalised = (unit - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert (denormalise(normalised, mean, std) == 100).all()
    with pytest.raises(ValueError, match=r"look like 0-255 units.*pass mean/255 and std/255"):
        denormalise(rgb, [127.0] * 3, [60.0] * 3)


def test_heatmap_overlay_grid_and_atomic_png(tmp_path):
    ramp = np.linspace(0, 1, 20, dtype=np.float32).reshape(4, 5)
    hot = heatmap(ramp)
    assert hot.shape == (4, 5, 3) and hot.dtype == np.uint8 and not (hot[0, 0] == hot[-1, -1]).all()
    base = np.full((4, 5, 3), 200, np.uint8)
    assert (overlay(base, hot, alpha=0.0) == base).all()
    assert (overlay(base, hot, alpha=1.0) == hot).all()
    grid = panel_grid([[base, np.zeros((8, 10, 3), np.uint8)], [hot, base]], ["a", "b"])
    assert grid.shape == (14 + 2 * 4 + 2, 2 * 5 + 2, 3)
    save_png(tmp_path / "grid.png", grid)
    assert (np.array(Image.open(tmp_path / "grid.png")) == grid).all()
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
