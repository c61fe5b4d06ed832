"""One convention for mean / std (0-1 units) in wsss.viz and box_rule, and overlay's inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from wsss.cam import box_rule
from wsss.viz import denormalise, heatmap, overlay

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def normalised(pixels: np.ndarray) -> torch.Tensor:
    """What ToTensor + Normalize(MEAN, STD) gives for an HxWx3 uint8 image."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


PIXELS = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)


def test_overlay_takes_tensor_pil_and_array_alike():
    ramp = torch.linspace(0, 1, 12).view(3, 4)  # a map of another size: resized bilinearly
    from_tensor = overlay(normalised(PIXELS), ramp)
    from_batch = overlay(normalised(PIXELS)[None], ramp[None])
    from_pil = overlay(Image.fromarray(PIXELS), ramp.numpy())
    from_array = overlay(PIXELS, ramp)
    assert from_tensor.shape == (6, 8, 3) and from_tensor.dtype == np.uint8
    assert np.abs(from_tensor.astype(int) - from_array.astype(int)).max() <= 1  # float rounding
    assert np.array_equal(from_batch, from_tensor) and np.array_equal(from_pil, from_array)
    up = torch.nn.functional.interpolate(ramp[None, None], (6, 8), mode="bilinear")[0, 0]
    want = (0.5 * PIXELS.astype(np.float32) + 0.5 * heatmap(up.numpy())).astype(np.uint8)
    assert np.array_equal(from_array, want)
    plain = overlay(torch.from_numpy(PIXELS).permute(2, 0, 1).float() / 255, ramp, 0.0, None, None)
    assert np.abs(plain.astype(int) - PIXELS.astype(int)).max() <= 1  # ToTensor without Normalize
    # the older call, a uint8 colour layer of the image's size, blends as before
    assert np.array_equal(overlay(PIXELS, heatmap(up.numpy())), want)


def test_overlay_and_box_rule_refuse_0_255_units_naming_the_fix():
    with pytest.raises(ValueError, match=r"look like 0-255 units.*pass mean/255 and std/255"):
        overlay(normalised(PIXELS), torch.rand(6, 8), mean=[123.7, 116.3, 103.5], std=[58.4] * 3)
    with pytest.raises(ValueError, match=r"box_rule: .*look like 0-255 units.*mean/255"):
        box_rule([123.7, 116.3, 103.5], [58.4, 57.1, 57.4])
    # the same statistics in the units they name are accepted
    rule = box_rule([123.7, 116.3, 103.5], [58.4, 57.1, 57.4], value_range=(0, 255))
    unit = box_rule([m / 255 for m in (123.7, 116.3, 103.5)], [s / 255 for s in (58.4, 57.1, 57.4)])
    assert rule.low == pytest.approx(unit.low) and rule.high == pytest.approx(unit.high)
    assert denormalise(normalised(PIXELS), MEAN, STD).shape == (6, 8, 3)


def test_overlay_refuses_a_map_that_is_not_one_image():
    with pytest.raises(ValueError, match=r"heatmap must be \(h, w\) or \(1, h, w\)"):
        overlay(PIXELS, torch.rand(2, 6, 8))
