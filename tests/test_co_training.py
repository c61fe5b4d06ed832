"""The co-trained twin segmenter: its loss against a closed form, the uncertain pixels learnt
from the peer, and the keys' wiring through the segmenter stage."""

import lightning as L
import numpy as np
import pytest
import torch

from wsss import stages
from wsss.models.co_training import co_training_loss, split_by_confidence
from wsss.models.segmenter import SegmenterLoss
from wsss.stages.records import StageError

from conftest import tiny_config, write_masks_with_confidence


def _case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    mask = torch.randint(0, 3, (2, 4, 5), generator=gen)
    mask[0, 0, :2] = 255
    confidence = torch.randint(0, 256, (2, 4, 5), generator=gen).to(torch.uint8)
    return a, b, mask, confidence


def _mean_ce(logits, targets, pixels):
    """Mean of -log softmax(logits)[target] over the listed (b, y, x) pixels."""
    log_probs = logits.log_softmax(1)
    return sum(-float(log_probs[b, int(targets[b, y, x]), y, x]) for b, y, x in pixels) / len(
        pixels
    )


def _split(mask, confidence, fraction):
    """Certain and uncertain pixels: per class, below its ``fraction`` quantile (numpy)."""
    cells = [(i, y, x) for i in range(2) for y in range(4) for x in range(5)]
    certain, uncertain = [], []
    for label in set(int(v) for v in mask.flatten()) - {255}:
        members = [c for c in cells if int(mask[c]) == label]
        cut = np.quantile([float(confidence[c]) for c in members], fraction)
        for c in members:
            (uncertain if float(confidence[c]) < cut else certain).append(c)
    return certain, uncertain


def test_uncertain_pixels_are_each_classs_least_confident():
    mask = torch.tensor([[[0, 0, 0, 0, 1, 1, 1, 1, 255, 255]]])
    # background margins high, the object's low: one threshold would take the whole object
    confidence = torch.tensor([[[250, 240, 230, 200, 30, 20, 10, 5, 0, 0]]], dtype=torch.uint8)
    relabelled, uncertain = split_by_confidence(mask, confidence, 0.5)
    assert uncertain[0, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0]
    assert relabelled[0, 0].tolist() == [0, 0, 255, 255, 1, 1, 255, 255, 255, 255]


def test_co_training_loss_matches_its_closed_form():
    a, b, mask, confidence = _case()
    fraction = 0.4
    certain, uncertain = _split(mask, confidence, fraction)
    assert certain and uncertain  # the case exercises both terms
    expected = 0.0
    for own, peer in ((a, b), (b, a)):
        expected += _mean_ce(own, mask, certain) + _mean_ce(own, peer.argmax(1), uncertain)
    got = co_training_loss(SegmenterLoss("ce"), a, b, mask, confidence, fraction)
    assert float(got) == pytest.approx(expected, rel=1e-12)


def test_fraction_zero_trains_each_network_as_alone():
    a, b, mask, confidence = _case(1)
    plain = SegmenterLoss("ce_dice")
    got = co_training_loss(plain, a.float(), b.float(), mask, confidence, 0.0)
    alone = plain(a.float(), mask) + plain(b.float(), mask)
    assert float(got) == pytest.approx(float(alone), rel=1e-6)
    relabelled, uncertain = split_by_confidence(mask, confidence, 0.0)
    assert not uncertain.any() and torch.equal(relabelled, mask)


def test_uncertain_pixels_are_pulled_to_the_peers_label_not_the_masks():
    """Two pixels of class 1, the first uncertain: the gradient on network A's logits there
    lowers the loss by raising the peer's class, whatever the mask says; at the certain one the
    mask's label rules."""
    a = torch.zeros(1, 3, 1, 2, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64).view(1, 3, 1, 1).repeat(1, 1, 1, 2)
    b.requires_grad_(True)
    mask = torch.tensor([[[1, 1]]])
    confidence = torch.tensor([[[10, 200]]], dtype=torch.uint8)
    co_training_loss(SegmenterLoss("ce"), a, b, mask, confidence, 0.5).backward()
    uncertain, certain = a.grad[0, :, 0, 0], a.grad[0, :, 0, 1]
    assert float(uncertain[2]) < 0 < float(uncertain[1])  # toward class 2, the peer's
    assert float(certain[1]) < 0 < float(certain[2])  # toward the mask's class 1
    # the twin's uncertain pixel is pulled toward A's argmax (class 0: A is flat)
    assert float(b.grad[0, 0, 0, 0]) < 0


class _FirstLoss(L.Callback):
    """The training loss of the first batch, and whether the model carries a twin."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            self.loss = float(outputs["loss"])
            self.twin = module.twin is not None


def _first_loss(tmp_path, training_callbacks, *keys):
    masks = tmp_path / "masks"
    cfg = tiny_config(
        tmp_path, f"segmenter.masks={masks}", "segmenter.max_epochs=1", "segmenter.loss=ce", *keys
    )
    # the data set's masks, with confidences spread over every class's pixels
    write_masks_with_confidence(
        cfg, masks, lambda m: np.random.default_rng(0).integers(0, 256, m.shape, dtype=np.uint8)
    )
    probe = _FirstLoss()
    training_callbacks.append(probe)
    stages.train_segmenter(cfg)
    return probe


def test_co_training_keys_reach_the_segmenters_loss(tmp_path, training_callbacks):
    off = _first_loss(tmp_path / "off", training_callbacks)
    training_callbacks.clear()
    alone = _first_loss(
        tmp_path / "alone",
        training_callbacks,
        "segmenter.co_training=true",
        "segmenter.co_uncertain_fraction=0",
    )
    training_callbacks.clear()
    peer = _first_loss(
        tmp_path / "peer",
        training_callbacks,
        "segmenter.co_training=true",
        "segmenter.co_uncertain_fraction=0.5",
    )
    assert not off.twin and alone.twin and peer.twin
    # same seed, same first batch: the network's own loss is today's, plus the twin's
    assert alone.loss > off.loss * 1.2
    # half of each class's pixels learnt from the peer: a different loss
    assert peer.loss != pytest.approx(alone.loss, rel=1e-3)


def test_co_training_on_ground_truth_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, "segmenter.masks=ground_truth", "segmenter.co_training=true")
    with pytest.raises(StageError, match="segmenter.co_training=false"):
        stages.train_segmenter(cfg)
