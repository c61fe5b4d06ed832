"""Classification backbones for the CAM pipeline: any torchvision classification model, and
any timm CNN as ``timm:NAME`` (``timm_backbones.py``; every function here dispatches to it).

`build_backbone(name, num_classes, ...)` gives the torchvision model with:
- a GAP + linear head over `num_classes` (the CAM methods need a final nn.Linear): the last
  Linear is replaced; MLP heads (VGG, AlexNet, MobileNet-V3) become one Linear after global
  average pooling; SqueezeNet's conv head becomes pooling + Linear;
- one input channel (or any number) by replacing the first conv, pretrained weights averaged;
- output stride 16 by dilation where the family allows it: ResNets (layer4 dilated), and the
  families whose last downsampling is done by odd-kernel convolutions only (EfficientNet,
  MobileNet-V2/V3, MNASNet, RegNet, ShuffleNet): those convs keep stride 1 and every later conv
  dilates by 2. Elsewhere (VGG, AlexNet, SqueezeNet, DenseNet, ConvNeXt, GoogLeNet, Inception,
  and the transformers) the last downsampling is a pooling or an even-kernel conv, which cannot
  be undone by dilation without changing what the layers see: a ValueError says so.

`default_cam_layers(name)` gives sensible `cam.layers` for a family: ResNets layer2/3/4, VGG
the outputs of its last three max pools (the official Relevance-CAM choice), and otherwise the
last module of the network body at each of the three coarsest resolutions (1/8, 1/16, 1/32),
e.g. DenseNet features.denseblock2 / denseblock3 / norm5, EfficientNet-B0 features.3 / 5 / 8,
ConvNeXt features.3 / 5 / 7.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any

import torch
import torchvision
from torch import nn

from wsss.models import timm_backbones

_MLP_HEADS = ("vgg", "alexnet", "mobilenet_v3")
_POOL_DOWNSAMPLING = (
    "vgg",
    "alexnet",
    "squeezenet",
    "densenet",
    "convnext",
    "googlenet",
    "inception",
    "vit",
    "swin",
    "maxvit",
)
_NOT_CNNS = ("vit", "swin", "maxvit")
_BODIES = ("features", "trunk_output", "layers")  # the module holding the stages, per family


@functools.lru_cache(maxsize=1)
def available_backbones() -> tuple[str, ...]:
    """Every torchvision classification model name."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def check_backbone(name: str) -> None:
    """ValueError naming the closest torchvision model when `name` is not one."""
    if timm_backbones.is_timm_name(name):
        return timm_backbones.check_timm_backbone(name)
    if name not in available_backbones():
        close = difflib.get_close_matches(name, available_backbones(), n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(
            f"{name!r} is not a torchvision classification model{hint} "
            "(see torchvision.models.list_models(module=torchvision.models))"
        )


def family_of(name: str) -> str:
    """The model family: resnet (also resnext, wide_resnet), vgg, densenet, efficientnet, ..."""
    for prefix in ("resnext", "wide_resnet"):
        if name.startswith(prefix):
            return "resnet"
    for family in ("mobilenet_v2", "mobilenet_v3", "efficientnet", "shufflenet", "squeezenet"):
        if name.startswith(family):
            return family
    return name.rstrip("0123456789_").split("_")[0].rstrip("0123456789")


def supports_output_stride_16(name: str) -> bool:
    if timm_backbones.is_timm_name(name):
        return timm_backbones.supports_timm_output_stride_16(name)
    return family_of(name) not in _POOL_DOWNSAMPLING


def _weights_enum(backbone: str):
    return torchvision.models.get_model_weights(backbone).DEFAULT


def _family_kwargs(name: str) -> dict[str, Any]:
    family = family_of(name)
    if family == "googlenet":  # no auxiliary heads: training returns plain logits
        return {"aux_logits": False, "init_weights": True}
    if family == "inception":
        return {"aux_logits": False, "init_weights": True}
    return {}


def build_backbone(
    backbone: str,
    num_classes: int,
    pretrained: bool = False,
    output_stride: int = 32,
    in_channels: int = 3,
) -> nn.Module:
    """A torchvision classifier with a GAP + linear head over `num_classes` (see module doc);
    ``timm:NAME`` builds a timm CNN the same way (``timm_backbones``)."""
    if timm_backbones.is_timm_name(backbone):
        return timm_backbones.build_timm_backbone(
            backbone, num_classes, pretrained, output_stride, in_channels
        )
    check_backbone(backbone)
    if output_stride not in (16, 32):
        raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
    if output_stride == 16 and not supports_output_stride_16(backbone):
        raise ValueError(
            f"output stride 16 is not available for {backbone}: its last "
            "downsampling is a pooling or an even-kernel convolution, which dilation "
            "cannot replace; use output_stride=32"
        )
    weights = _weights_enum(backbone) if pretrained else None
    kwargs = _family_kwargs(backbone)
    resnet = family_of(backbone) == "resnet"
    basic_block = backbone in ("resnet18", "resnet34")
    if resnet and output_stride == 16 and not basic_block:
        kwargs["replace_stride_with_dilation"] = [False, False, True]
    try:
        model = torchvision.models.get_model(backbone, weights=weights, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError is an OSError
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load ImageNet weights for {backbone} ({exc}). torchvision looks for them in "
            f"{torch.hub.get_dir()}/checkpoints (set TORCH_HOME to move it) and downloads them when "
            f"online. Copy the file there, or run without: classifier.pretrained=false"
        ) from exc
    if output_stride == 16:
        if basic_block:
            _dilate_basic_layer4(model)
        elif not resnet:
            dilate_last_stage(model)
    replace_head(model, backbone, num_classes)
    if in_channels != 3:
        set_input_channels(model, in_channels)
    return model


def _dilate_basic_layer4(model: nn.Module) -> None:
    """Output stride 16 for BasicBlock ResNets, as torchvision does it for Bottleneck ones
    (which it refuses for BasicBlock): layer4 keeps stride 1 and its later blocks dilate by 2."""
    first, *rest = model.layer4
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for block in rest:
        for conv in (block.conv1, block.conv2):
            conv.dilation, conv.padding = (2, 2), (2, 2)


def _conv_resolutions(model: nn.Module, size: int = 64) -> dict[str, tuple[int, int]]:
    """Input and output height of every Conv2d / pooling for a size x size probe image."""
    seen: dict[str, tuple[int, int]] = {}

    def record(path: str):
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            seen.setdefault(path, (args[0].shape[-2], out.shape[-2]))

        return hook

    handles = [
        module.register_forward_hook(record(path))
        for path, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))
    ]
    modes = {m: m.training for m in model.modules()}
    try:
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        with torch.no_grad():
            model.eval()(torch.zeros(1, first.in_channels, size, size))
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in modes.items():
            m.training = mode
    return seen


def dilate_last_stage(model: nn.Module) -> None:
    """Output stride 32 -> 16: the convs that downsample 1/16 -> 1/32 keep stride 1, and every
    later conv with a kernel larger than 1 dilates by 2 (padding adjusted)."""
    size = 64
    # squeeze-excitation convs run on 1x1 maps: only feature-map convs tell the stride
    resolutions = {p: r for p, r in _conv_resolutions(model, size).items() if r[0] > 1}
    modules = dict(model.named_modules())
    last = min(out for _, out in resolutions.values())
    downsampling = [p for p, (inp, out) in resolutions.items() if out == last and inp == 2 * last]
    after = [p for p, (inp, out) in resolutions.items() if inp == last and out == last]
    for path in downsampling:
        module = modules[path]
        if not isinstance(module, nn.Conv2d) or any(k % 2 == 0 for k in module.kernel_size):
            raise ValueError(
                f"cannot dilate {path} ({type(module).__name__}, kernel "
                f"{getattr(module, 'kernel_size', '?')}) for output stride 16"
            )
        module.stride = (1, 1)
        _dilate(module, 2)
    for path in after:
        module = modules[path]
        if isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1:
            _dilate(module, 2)
    if min(out for inp, out in _conv_resolutions(model, size).values() if inp > 1) != 2 * last:
        raise RuntimeError("dilation did not give output stride 16")  # a family not as expected


def _dilate(conv: nn.Conv2d, factor: int) -> None:
    """Scale a conv's dilation, keeping 'same'-style padding for odd kernels."""
    if max(conv.kernel_size) == 1:
        return
    conv.dilation = tuple(d * factor for d in conv.dilation)
    conv.padding = tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))


def _last_conv_channels(module: nn.Module) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def replace_head(model: nn.Module, name: str, num_classes: int) -> None:
    """Give the model a GAP + linear head over num_classes (see the module docstring)."""
    family = family_of(name)
    if family in ("vgg", "alexnet"):
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(_last_conv_channels(model.features), num_classes)
    elif family == "mobilenet_v3":
        model.classifier = nn.Linear(model.classifier[0].in_features, num_classes)
    elif family == "squeezenet":
        channels = model.classifier[1].in_channels  # its 1x1 conv head reads the features
        model.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(channels, num_classes),
        )
    else:
        path, last = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        parent, _, attr = path.rpartition(".")
        setattr(
            model.get_submodule(parent) if parent else model,
            attr,
            nn.Linear(last.in_features, num_classes),
        )


def set_input_channels(model: nn.Module, in_channels: int) -> None:
    """Replace the first conv by one taking `in_channels` (its weights averaged over the old
    input channels, so pretrained filters still respond to intensity)."""
    path, old = next((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        old.dilation,
        old.groups,
        old.bias is not None,
        old.padding_mode,
    )
    with torch.no_grad():
        new.weight.copy_(
            old.weight.sum(dim=1, keepdim=True).repeat(1, in_channels, 1, 1) / in_channels
        )
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    if getattr(model, "transform_input", False):  # GoogLeNet / Inception re-normalise 3 channels
        model.transform_input = False


def head_of(model: nn.Module) -> nn.Module:
    """The final Linear layer (trained at the full learning rate)."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def _probe_model(name: str) -> nn.Module:
    """The family's model without weights, on the meta device where it can be (shapes only)."""
    kwargs = _family_kwargs(name)
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name, weights=None, **kwargs).eval()
    except (NotImplementedError, RuntimeError):  # e.g. RegNet computes its widths with tensors
        return torchvision.models.get_model(name, weights=None, **kwargs).eval()


@functools.lru_cache(maxsize=64)
def default_cam_layers(name: str) -> tuple[str, ...]:
    """Sensible CAM layers for a torchvision backbone (see the module docstring)."""
    if timm_backbones.is_timm_name(name):
        return timm_backbones.default_timm_cam_layers(name)
    check_backbone(name)
    family = family_of(name)
    if family in _NOT_CNNS:
        raise ValueError(
            f"no default cam.layers for {name}: it is not a CNN (its blocks do not "
            "give (B, C, h, w) feature maps); set cam.layers explicitly"
        )
    if family == "resnet":
        return ("layer2", "layer3", "layer4")
    model = _probe_model(name)
    if family == "vgg":
        pools = [
            f"features.{i}" for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)
        ]
        return tuple(pools[-3:])
    device = next(model.parameters()).device
    size = 299 if family == "inception" else 224
    body = next(
        (getattr(model, b) for b in _BODIES if isinstance(getattr(model, b, None), nn.Sequential)),
        None,
    )
    prefix = (
        next((f"{b}." for b in _BODIES if getattr(model, b, None) is body), "")
        if body is not None
        else ""
    )
    candidates = (
        dict(body.named_children())
        if body is not None
        else {n: m for n, m in model.named_children() if not isinstance(m, (nn.Linear, nn.Dropout))}
    )
    heights: dict[str, int] = {}

    def record(name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            is_map = isinstance(out, torch.Tensor) and out.dim() == 4
            heights.setdefault(name, out.shape[-2] if is_map else 0)

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in candidates.items()]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    last_at: dict[int, str] = {}
    for n in candidates:  # registration order is forward order for these bodies
        if heights.get(n, 0) > 1:
            last_at[heights[n]] = n
    coarsest = sorted(last_at, reverse=True)[-3:]
    return tuple(prefix + last_at[h] for h in coarsest)


def check_cam_layers(name: str, layers: list[str]) -> None:
    """ValueError naming the closest module when a layer is not a module of the backbone."""
    if timm_backbones.is_timm_name(name):
        modules = timm_backbones.module_names(name)
        defaults: Any = list(timm_backbones.default_timm_cam_layers(name))
    else:
        modules = [n for n, _ in _probe_model(name).named_modules() if n]
        defaults = list(default_cam_layers(name)) if family_of(name) not in _NOT_CNNS else "none"
    for layer in layers:
        if layer != "input" and layer not in modules:
            close = difflib.get_close_matches(layer, modules, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(
                f"{layer!r} is not a module of {name}{hint} (default layers for {name}: {defaults})"
            )
