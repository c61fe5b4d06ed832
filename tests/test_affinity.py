"""AffinityModule: the balanced pair loss, learning on a toy two-region set, frozen / fine-tuned
backbone, the affinities the random walk reads, and a checkpoint round trip."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from wsss.models.affinity import AffinityModule, affinity_loss, pair_accuracy, propagate
from wsss.models.classifier import build_backbone
from wsss.pseudo.refine import (
    Affinities,
    affinity_labels,
    neighbour_offsets,
    pairwise_affinity,
)

torch.set_num_threads(2)
RADIUS, STRIDE, SIZE = 3, 4, 32


def two_region_images(n, seed, size=SIZE):
    """Images cut by a random straight line into two flat colours (plus noise); masks label the
    sides 0 / 1 with a 255 band 1.5 px either side of the line. Normalised like a classifier's input."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    items = []
    for _ in range(n):
        angle = float(torch.rand(1, generator=gen)) * 2 * math.pi
        shift = (float(torch.rand(1, generator=gen)) - 0.5) * size * 0.4
        side = (xx - size / 2) * math.cos(angle) + (yy - size / 2) * math.sin(angle) - shift
        a, b = torch.rand(3, generator=gen), torch.rand(3, generator=gen)
        image = torch.where(side > 0, a[:, None, None], b[:, None, None])
        image = image + 0.05 * torch.randn(3, size, size, generator=gen)
        mask = (side > 0).long()
        mask[side.abs() < 1.5] = 255
        items.append({"image": (image - 0.5) / 0.25, "mask": mask})
    return items


def collate(items):
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def small_module(**kwargs):
    torch.manual_seed(0)
    options = dict(stride=STRIDE, radius=RADIUS, hidden=16, embed_dim=16, lr=0.01)
    options.update(kwargs)
    return AffinityModule(build_backbone("resnet18", 2), **options)


def within_and_across(module, batch):
    affinity = module.predict_affinity(batch["image"]).values
    labels = affinity_labels(batch["mask"], RADIUS, STRIDE)
    within = affinity[labels["bg_pos"] | labels["fg_pos"]].mean()
    return (
        float(within),
        float(affinity[labels["neg"]].mean()),
        float(pair_accuracy(affinity, labels)),
    )


def fit(module, steps, tmp_path=None):
    trainer = L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    loader = DataLoader(
        two_region_images(64, seed=0),
        batch_size=8,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    trainer.fit(module, loader)
    return trainer


def test_loss_is_the_balanced_mean_of_the_three_pair_kinds():
    a = torch.tensor([0.9, 0.5, 0.8, 0.2, 0.4, 0.1]).view(1, 6, 1, 1)
    kinds = {"bg_pos": [1, 1, 0, 0, 0, 0], "fg_pos": [0, 0, 1, 0, 0, 0], "neg": [0, 0, 0, 1, 1, 1]}
    labels = {k: torch.tensor(v, dtype=torch.bool).view(1, 6, 1, 1) for k, v in kinds.items()}
    bg = -(math.log(0.9) + math.log(0.5)) / 2
    fg = -math.log(0.8)
    neg = -(math.log(0.8) + math.log(0.6) + math.log(0.9)) / 3
    parts = affinity_loss(a, labels)
    assert math.isclose(float(parts["loss"]), bg / 4 + fg / 4 + neg / 2, rel_tol=1e-4)
    assert math.isclose(float(parts["neg"]), neg, rel_tol=1e-4)
    # a kind without pairs adds nothing (no NaN)
    labels["fg_pos"][:] = False
    assert math.isclose(float(affinity_loss(a, labels)["loss"]), bg / 4 + neg / 2, rel_tol=1e-4)
    # positives 0.9, 0.5: one above 0.5; negatives 0.2, 0.4, 0.1: all at most 0.5
    assert math.isclose(float(pair_accuracy(a, labels)), (1 / 2 + 1.0) / 2, rel_tol=1e-6)


def test_pairwise_affinity_is_exp_of_minus_the_mean_absolute_difference():
    emb = torch.zeros(1, 2, 3, 3)
    emb[0, 0, 1, 2] = 1.0
    emb[0, 1, 1, 2] = 3.0
    affinity = pairwise_affinity(emb, 2)
    k = neighbour_offsets(2).index((0, 1))
    assert math.isclose(float(affinity[0, k, 1, 1]), math.exp(-2.0), rel_tol=1e-6)  # (1,1)-(1,2)
    assert float(affinity[0, k, 0, 0]) == pytest.approx(1.0)
    assert float(affinity[0, k, 0, 2]) == 0.0  # partner (0, 3) is outside the map


def test_affinity_module_learns_higher_affinity_within_regions_than_across(tmp_path):
    module = small_module(freeze_backbone=True)
    held_out = collate(two_region_images(16, seed=1))
    within, across, accuracy = within_and_across(module, held_out)
    assert accuracy == pytest.approx(0.5, abs=0.1)  # an untrained head cannot tell
    trainer = fit(module, 30, tmp_path)
    within, across, accuracy = within_and_across(module, held_out)
    assert within - across > 0.2 and accuracy > 0.8
    # the checkpoint reloads with a fresh backbone and gives the same affinities
    path = tmp_path / "affinity.ckpt"
    trainer.save_checkpoint(path)
    loaded = AffinityModule.load_from_checkpoint(path, backbone=build_backbone("resnet18", 2))
    images = held_out["image"][:2]
    assert torch.allclose(
        loaded.predict_affinity(images).values, module.predict_affinity(images).values, atol=1e-6
    )


def test_frozen_backbone_stays_put_and_the_callers_model_is_never_changed():
    backbone = build_backbone("resnet18", 2)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    batch = collate(two_region_images(4, seed=2))
    for freeze in (True, False):
        module = AffinityModule(
            backbone, stride=STRIDE, radius=RADIUS, hidden=8, embed_dim=8, freeze_backbone=freeze
        )
        module.train()
        module.training_step(batch, 0).backward()
        grads = [p.grad for p in module.net.features.parameters()]
        assert (
            all(g is None for g in grads)
            if freeze
            else any(g is not None and g.abs().sum() > 0 for g in grads)
        )
        assert all(p.grad is not None for p in module.net.fuse.parameters())
        assert not module.net.features.training  # BatchNorm statistics are never updated
        groups = module.configure_optimizers()["optimizer"].param_groups
        assert len(groups) == (1 if freeze else 2)
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_predict_affinity_and_propagate_under_no_grad_at_any_size():
    module = small_module()
    images = torch.randn(2, 3, 30, 37)
    with torch.no_grad():
        affinities = module.predict_affinity(images)
    assert isinstance(affinities, Affinities)
    assert affinities.values.shape == (2, len(neighbour_offsets(RADIUS)), 8, 10)
    assert (affinities.radius, affinities.stride) == (RADIUS, STRIDE)
    with torch.enable_grad():
        assert not module.predict_affinity(images).values.requires_grad
    scores = torch.rand(2, 3, 30, 37)
    scores = scores / scores.sum(1, keepdim=True)
    with torch.no_grad():
        out = propagate(module, scores, images, steps=10)
    assert out.shape == scores.shape
    assert torch.allclose(out.sum(1), torch.ones(2, 30, 37), atol=1e-5)
    assert torch.allclose(
        out, propagate(affinities, scores, beta=module.hparams.beta, steps=10), atol=1e-6
    )
    with pytest.raises(ValueError, match="needs the images"):
        propagate(module, scores)


def test_unknown_layer_names_the_layers_there_are():
    with pytest.raises(ValueError, match="layer9.*layer4"):
        AffinityModule(build_backbone("resnet18", 2), layers=("layer1", "layer9"))
