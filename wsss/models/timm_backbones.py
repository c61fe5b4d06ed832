"""timm CNNs as classification backbones: ``classifier.backbone=timm:NAME``.

`build_timm_backbone(name, num_classes, ...)` gives ``TimmClassifier``: the timm model's own
``forward_features`` (built by ``timm.create_model``, so any input channel count through
``in_chans`` and output stride 16 through ``output_stride=16``, both as timm does them), then the
package's global average pooling and one nn.Linear. The modules ``forward_features`` runs are
registered at the top level under their timm names, so CAM layers are named as in timm
(``layer4``, ``blocks.4``) and timm's head (pooling, pre-logit convs, classifier) is left out.

`default_timm_cam_layers(name)`: the last feature stage at 1/8 and 1/16 from timm's
``feature_info``, and the map the pooling reads (``layer4`` of a ResNet, ``bn2`` of an
EfficientNet). Families timm cannot dilate are refused for output stride 16 with the reason.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

import torch
from torch import Tensor, nn

PREFIX = "timm:"
_PROBE = 64  # probe images: 1/32 of it is still a 2x2 map


def is_timm_name(name: str) -> bool:
    return name.startswith(PREFIX)


def _timm():
    import timm  # heavy (imports its whole model zoo), and only timm backbones need it

    return timm


def _model_name(name: str) -> str:
    return name[len(PREFIX) :] if is_timm_name(name) else name


def check_timm_backbone(name: str) -> None:
    """ValueError (one line) naming the closest timm models when ``timm:NAME`` is not one."""
    model = _model_name(name)
    timm = _timm()
    if not model or not timm.is_model(model):
        close = difflib.get_close_matches(model, timm.list_models(), n=3)
        hint = f"; did you mean {' or '.join(PREFIX + c for c in close)}?" if close else ""
        raise ValueError(f"{model!r} is not a timm model{hint} (see timm.list_models())")


class TimmClassifier(nn.Module):
    """timm ``forward_features`` -> global average pooling -> Linear (see the module doc)."""

    def __init__(self, body: nn.Module, num_classes: int) -> None:
        super().__init__()
        object.__setattr__(self, "_body", body)  # not a child: only its used modules are
        used = _used_children(body)
        for child_name, child in body.named_children():
            if child_name in used:
                self.add_module(child_name, child)
        channels = _feature_shape(body)[1]
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def train(self, mode: bool = True) -> "TimmClassifier":
        super().train(mode)
        self._body.training = mode  # the timm model itself, not only the modules it runs
        return self

    def forward(self, images: Tensor) -> Tensor:
        features = self._body.forward_features(images)
        return self.fc(torch.flatten(self.global_pool(features), 1))


def _feature_shape(body: nn.Module) -> tuple[int, ...]:
    """The shape of ``forward_features`` on one probe image; a model that cannot take it (a
    transformer fixed to its training size) is refused."""
    try:
        with torch.no_grad():
            return tuple(body.eval().forward_features(_probe_input(body)).shape)
    except (AssertionError, RuntimeError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"timm:{body.default_cfg.get('architecture', type(body).__name__)} did not run on a "
            f"{_PROBE}x{_PROBE} image ({reason}); timm:NAME takes convolutional models"
        ) from None


def _probe_input(body: nn.Module) -> Tensor:
    channels = int(getattr(body, "in_chans", 0) or _first_conv(body).in_channels)
    return torch.zeros(1, channels, _PROBE, _PROBE)


def _first_conv(body: nn.Module) -> nn.Conv2d:
    return next(m for m in body.modules() if isinstance(m, nn.Conv2d))


def _used_children(body: nn.Module) -> list[str]:
    """The top-level children ``forward_features`` calls, in forward order."""
    order: list[str] = []
    handles = [
        child.register_forward_hook(lambda *args, n=n: order.append(n) if n not in order else None)
        for n, child in body.named_children()
    ]
    try:
        _feature_shape(body)
    finally:
        for handle in handles:
            handle.remove()
    return order


def build_timm_backbone(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    output_stride: int = 32,
    in_channels: int = 3,
) -> TimmClassifier:
    """``timm:NAME`` as a TimmClassifier over `num_classes` (see the module docstring)."""
    check_timm_backbone(name)
    if output_stride not in (16, 32):
        raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
    model = _model_name(name)
    kwargs: dict[str, Any] = {"in_chans": in_channels}
    if output_stride == 16:
        kwargs["output_stride"] = 16
    try:
        body = _timm().create_model(model, pretrained=pretrained, **kwargs)
    except (TypeError, AssertionError, NotImplementedError) as exc:
        if output_stride == 16:
            raise ValueError(_no_stride_16(name, exc)) from None
        raise
    except Exception as exc:  # hub errors come in many types; only the weights can cause them
        if not pretrained:
            raise
        raise RuntimeError(_offline_message(name, exc)) from None
    shape = _feature_shape(body)
    if len(shape) != 4:
        raise ValueError(
            f"{name} is not a CNN: its features are {shape}, not (B, C, h, w) maps; "
            "choose a convolutional timm model"
        )
    if output_stride == 16 and shape[-1] * 16 != _PROBE:
        raise ValueError(_no_stride_16(name, f"its features are 1/{_PROBE // shape[-1]}"))
    return TimmClassifier(body, num_classes)


def _no_stride_16(name: str, why: Any) -> str:
    reason = str(why).splitlines()[0] if str(why) else type(why).__name__
    return (
        f"output stride 16 is not available for {name}: timm cannot dilate this family "
        f"({reason}); use output_stride=32"
    )


def _offline_message(name: str, exc: Exception) -> str:
    reason = (str(exc).splitlines() or [type(exc).__name__])[0]
    return (
        f"could not load timm weights for {name} ({type(exc).__name__}: {reason}); timm "
        "downloads them from the Hugging Face Hub when online: unset HF_HUB_OFFLINE, or put the "
        "weights in the Hugging Face cache (HF_HOME), or run without: classifier.pretrained=false"
    )


def supports_timm_output_stride_16(name: str) -> bool:
    try:
        _probe_model(name, 16)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=32)
def _probe_model(name: str, output_stride: int = 32) -> TimmClassifier:
    """The model with random weights, for names and shapes (cached: config checks ask often)."""
    return build_timm_backbone(name, 1, output_stride=output_stride)


@functools.lru_cache(maxsize=32)
def default_timm_cam_layers(name: str) -> tuple[str, ...]:
    """The last feature_info stage at 1/8 and at 1/16, and the map the pooling reads."""
    model = _probe_model(name)
    info = model._body.feature_info
    reductions = info.reduction() if hasattr(info, "reduction") else [f["reduction"] for f in info]
    modules = info.module_name() if hasattr(info, "module_name") else [f["module"] for f in info]
    stages = {reduction: module for reduction, module in zip(reductions, modules)}
    last = [n for n, child in model.named_children() if _has_parameters(child)]
    final = [n for n in last if n not in ("fc", "global_pool")][-1]
    layers = [stages[r] for r in (8, 16) if r in stages and stages[r] != final]
    return (*layers, final)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def module_names(name: str) -> list[str]:
    """The model's module paths (what cam.layers may name)."""
    return [n for n, _ in _probe_model(name).named_modules() if n]
