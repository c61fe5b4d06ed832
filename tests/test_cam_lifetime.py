"""Hooks and memory over many calls: 100 CAM objects on one model leave no hook behind, no
growing cache and no growing set of live tensors, after normal exits and after exceptions."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from wsss.cam import build_cam, register_rule, unregister_rule
from wsss.cam.conformance import hook_count, method_options
from wsss.cam.lrp import graph as lrp_graph

C = 4
X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
T = torch.tensor([1, 3])
LAYERS = ["block", "act2"]
METHODS = ["relevance", "gradcam", "gradcampp", "liftcam", "libra"]


class Failing(nn.Module):
    """Identity that raises when armed: an exception in the middle of the model's forward."""

    armed = False

    def forward(self, x):
        if Failing.armed:
            raise RuntimeError("boom")
        return x


class Block(nn.Module):
    """A residual block with a squeeze-excitation gate."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(ch)
        self.fc = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(x + y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True))))


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.block = Block(8)
        self.fail = Failing()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(8, C)

    def forward(self, x):
        x = self.fail(self.block(self.act1(self.stem(x))))
        return self.head(self.act2(self.conv2(x)).mean((2, 3)))


def live_tensors() -> tuple[int, int]:
    """(count, bytes) of the tensors alive now."""
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated aliases warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    return len(tensors), sum(t.element_size() * t.nelement() for t in tensors)


def one_call(model: nn.Module, method: str, options: dict, fail: bool) -> None:
    with build_cam(method, model, LAYERS, **options) as cam:
        if not fail:
            maps = cam(X, T)
            assert all(torch.isfinite(m).all() for m in maps.values())
            return
        Failing.armed = True
        try:
            with pytest.raises(RuntimeError, match="boom"):
                cam(X, T)  # the exception comes from inside the model's forward
        finally:
            Failing.armed = False
        raise KeyError("raised inside the with block")


@pytest.fixture(autouse=True)
def failing_is_one_node():
    """With a rule of its own the module is one node, so RelevanceCAM's forward calls it too."""
    register_rule(Failing, "identity")
    yield
    unregister_rule(Failing)


@pytest.mark.parametrize("method", METHODS)
def test_100_calls_leave_no_hooks_and_flat_memory(method):
    model = Small().eval()
    options = method_options(method, model, LAYERS, X)
    options.pop("preset", None)
    baseline = hook_count(model)
    counts = []
    for i in range(100):
        fail = i % 2 == 1
        try:
            one_call(model, method, options, fail)
        except KeyError:
            assert fail
        assert hook_count(model) == baseline == 0
        if i in (9, 99):
            counts.append(live_tensors())
    (n10, bytes10), (n100, bytes100) = counts
    assert n100 <= n10 and bytes100 <= bytes10, counts
    if method == "relevance":  # one cached plan for the one (layers, composite), none per call
        structure, plans = lrp_graph._PLANS[model]
        assert len(plans) == 1
    ref = weakref.ref(model)
    del model, options
    gc.collect()
    assert ref() is None  # no cache, hook or closure keeps the model alive
