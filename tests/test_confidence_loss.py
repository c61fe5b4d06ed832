"""The confidence-weighted segmenter loss: its closed form, the confidence maps the pseudo-mask
stage writes beside the masks, their augmentation with the mask, and the key's wiring."""

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsss import stages
from wsss.data.datamodule import build_source
from wsss.data.imageio import DataError
from wsss.data.transforms import train_transform
from wsss.models.segmenter import SegmenterLoss, confidence_weighted_cross_entropy
from wsss.pseudo.distribution import slot_distribution, top2_margin
from wsss.stages.records import StageError

from conftest import reuse_stage, tiny_config, write_masks_with_confidence


def _case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64)
    mask = torch.randint(0, 4, (2, 5, 6), generator=gen)
    mask[0, 0, :3] = 255
    mask[1, 4, 2:] = 255
    confidence = torch.randint(0, 256, (2, 5, 6), generator=gen).to(torch.uint8)
    return logits, mask, confidence


def test_weighted_cross_entropy_matches_its_closed_form_with_255_ignored():
    logits, mask, confidence = _case()
    power = 1.7
    numerator = denominator = 0.0
    log_probs = logits.log_softmax(1)
    for b in range(2):
        for y in range(5):
            for x in range(6):
                label = int(mask[b, y, x])
                if label == 255:
                    continue
                weight = (float(confidence[b, y, x]) / 255.0) ** power
                numerator += weight * -float(log_probs[b, label, y, x])
                denominator += weight
    got = confidence_weighted_cross_entropy(logits, mask, confidence, power)
    assert float(got) == pytest.approx(numerator / denominator, rel=1e-12)


def test_power_zero_is_plain_cross_entropy_and_zero_weights_give_zero():
    logits, mask, confidence = _case(1)
    plain = F.cross_entropy(logits, mask, ignore_index=255)
    assert float(SegmenterLoss("ce", 0.0)(logits, mask, confidence)) == pytest.approx(float(plain))
    weighted = confidence_weighted_cross_entropy(logits, mask, confidence, 0.0)
    assert float(weighted) == pytest.approx(float(plain), rel=1e-12)
    # every labelled pixel at confidence 0: nothing to learn, and no NaN
    zero = confidence_weighted_cross_entropy(logits, mask, torch.zeros_like(confidence), 1.0)
    assert float(zero) == 0.0
    # the Dice term stays unweighted: ce_dice minus the weighted ce is the plain Dice
    both = SegmenterLoss("ce_dice", 2.0)(logits.float(), mask, confidence)
    dice = SegmenterLoss("ce_dice", 0.0).dice(logits.float(), mask)
    ce = confidence_weighted_cross_entropy(logits.float(), mask, confidence, 2.0)
    assert float(both) == pytest.approx(float(ce + dice), rel=1e-6)


def test_weighted_loss_without_a_confidence_map_names_the_fix():
    logits, mask, _ = _case()
    with pytest.raises(ValueError, match="segmenter.confidence_power=0"):
        SegmenterLoss("ce", 1.0)(logits, mask)


def test_confidence_is_augmented_with_its_mask(tmp_path):
    cfg = tiny_config(tmp_path, "data.image_size=64", "data.crop_size=48")
    masks = tmp_path / "masks"
    source = write_masks_with_confidence(
        cfg, masks, lambda m: np.where(m > 0, 255, 40).astype(np.uint8)
    )  # foreground certain, background at 40
    source.transform = train_transform(48, source.fill_value(), seed=3)
    source.use_masks_from(masks, confidence=True)
    for index in range(len(source)):
        item = source[(index, 100 + index)]
        mask, confidence = item["mask"], item["confidence"]
        assert confidence.shape == mask.shape and confidence.dtype == torch.uint8
        labelled = mask != 255
        expected = torch.where(mask > 0, 255, 40).to(torch.uint8)
        assert torch.equal(confidence[labelled], expected[labelled])
    (masks / "confidence" / f"{source.ids[0]}.png").unlink()
    with pytest.raises(DataError, match="confidence map is missing.*confidence_power=0"):
        source[0]


class _ParametersUnchanged(L.Callback):
    """Records whether the segmenter's weights moved during the fit."""

    def on_train_start(self, trainer, pl_module):
        self.start = [p.detach().clone() for p in pl_module.net.parameters()]

    def on_train_end(self, trainer, pl_module):
        self.moved = any(
            not torch.equal(a, p.detach()) for a, p in zip(self.start, pl_module.net.parameters())
        )


@pytest.mark.parametrize("power, moves", [(1.0, False), (0.0, True)])
def test_confidence_power_reaches_the_segmenters_loss(tmp_path, training_callbacks, power, moves):
    """Masks whose every confidence is 0: weighted, the loss is 0 and plain SGD (no weight decay)
    leaves the weights where they started; with the key at 0 (or ignored) they move."""
    masks = tmp_path / "masks"
    cfg = tiny_config(
        tmp_path,
        f"segmenter.masks={masks}",
        f"segmenter.confidence_power={power}",
        "segmenter.optimizer=sgd",
        "segmenter.weight_decay=0",
        "segmenter.loss=ce",
    )
    write_masks_with_confidence(cfg, masks, lambda m: np.zeros_like(m, dtype=np.uint8))
    probe = _ParametersUnchanged()
    training_callbacks.append(probe)
    stages.train_segmenter(cfg)
    assert probe.moved is moves


def test_weighting_ground_truth_masks_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, "segmenter.masks=ground_truth", "segmenter.confidence_power=1")
    with pytest.raises(StageError, match="confidence_power=0"):
        stages.train_segmenter(cfg)


def test_pseudo_stage_writes_the_top_two_margin_of_its_distribution(tmp_path, trained_classifier):
    """Without refinement the stored confidence is round(255 x top-two margin) of the calibrated
    distribution, recomputed here from the saved float16 maps and the recorded thresholds."""
    reuse_stage(trained_classifier, tmp_path)
    cfg = tiny_config(
        tmp_path,
        "pseudo.refine=none",
        "pseudo.save_maps=true",
        "pseudo.calibration_images=4",
        "pseudo.num_panels=0",
        size="stage",
    )
    result = stages.make_pseudo_masks(cfg)
    out = tmp_path / "default" / "pseudo_masks"
    names = build_source(cfg, "train").class_names
    per_class = result["thresholds"]["per_class"]
    checked = 0
    for path in sorted(out.glob("syn_*.png")):
        stored = np.array(Image.open(out / "confidence" / path.name))
        saved = np.load(out / "maps" / f"{path.stem}.npz")
        maps = torch.from_numpy(saved["maps"].astype(np.float32))[None]
        classes = saved["classes"].tolist()
        if not classes:
            continue
        thresholds = torch.tensor([[per_class[names[c - 1]] for c in classes]])
        probs = slot_distribution(maps, torch.ones(1, len(classes), dtype=torch.bool), thresholds)
        expected = (top2_margin(probs)[0] * 255).round().numpy()
        assert stored.shape == expected.shape
        assert np.abs(stored.astype(np.float64) - expected).max() <= 1.0  # float16 maps
        checked += 1
    assert checked >= 6
