"""Checks of a built config, before any work: the ranges declared in the schema's field metadata,
values that only make sense together, and values only a library can check (the backbone, the smp
encoder, the Relevance-CAM preset, the Lightning strategy)."""

from __future__ import annotations

import dataclasses
import importlib.util

import segmentation_models_pytorch as smp
from lightning.pytorch.strategies import StrategyRegistry

from wsss.cam import PRESETS
from wsss.config.coercion import closest
from wsss.config.fields import ConfigError
from wsss.config.schema import Config, DataConfig
from wsss.models import backbones, vit_backbones


def check_config(cfg: Config) -> None:
    """Every check, in the order users meet them: the backbone and its layers first (the CAM
    layers are filled in there), the ranges, then the values that go together and the libraries."""
    _check_backbone(cfg)
    _check_required(cfg)
    check_ranges(cfg)
    if cfg.cam.fine_smooth % 2 == 0:  # a centred box needs an odd window
        raise ConfigError(f"cam.fine_smooth: must be an odd size, got {cfg.cam.fine_smooth}")
    _check_crf_extra(cfg)
    _check_data(cfg.data)
    _check_trainer(cfg)
    _check_libraries(cfg)


def check_ranges(cfg: Config) -> None:
    """Every key whose field declares a ``check`` Range holds a value inside it (nulls pass)."""
    for group in dataclasses.fields(cfg):
        values = getattr(cfg, group.name)
        for f in dataclasses.fields(values):
            check, value = f.metadata.get("check"), getattr(values, f.name)
            if check is not None and value is not None and not check.admits(value):
                raise ConfigError(f"{group.name}.{f.name}: {check.wording}, got {value}")


def _check_backbone(cfg: Config) -> None:
    """The backbone exists in torchvision, allows the output stride, and has the CAM layers
    (filled in with the family's default when unset, as is cam.preset)."""
    name = cfg.classifier.backbone
    if vit_backbones.is_vit_backbone(name):
        _check_vit_backbone(cfg)
        return
    try:
        backbones.check_backbone(name)
    except ValueError as exc:
        raise ConfigError(f"classifier.backbone: {exc}") from None
    if cfg.classifier.output_stride == 16 and not backbones.supports_output_stride_16(name):
        why = (
            "timm cannot dilate this family"
            if name.startswith("timm:")
            else "its last downsampling is a pooling or an even-kernel conv"
        )
        raise ConfigError(
            f"classifier.output_stride: 16 is not available for {name} ({why}); use 32"
        )
    _resolve_cam_layers(cfg, backbones.default_cam_layers, backbones.check_cam_layers)
    _resolve_cam_preset(cfg)


def _resolve_cam_preset(cfg: Config) -> None:
    """cam.preset: the backbone family's default preset when unset."""
    if cfg.cam.preset is None:
        cfg.cam.preset = vit_backbones.default_cam_preset(cfg.classifier.backbone)


def _resolve_cam_layers(cfg: Config, default_layers, check_layers) -> None:
    """cam.layers: the backbone's default layers when unset, then checked against its modules."""
    name = cfg.classifier.backbone
    try:
        if cfg.cam.layers is None:
            cfg.cam.layers = list(default_layers(name))
        check_layers(name, cfg.cam.layers)
    except ValueError as exc:
        raise ConfigError(f"cam.layers: {exc}") from None
    _check_fine_layer(cfg, check_layers)


def _check_fine_layer(cfg: Config, check_layers) -> None:
    """cam.fine_layer names a module of the backbone (or input, which only relevance maps)."""
    fine = cfg.cam.fine_layer
    if fine is None:
        return
    if fine == "input" and cfg.cam.method != "relevance":
        raise ConfigError(
            f"cam.fine_layer: input (the pixel-level relevance) needs cam.method=relevance, "
            f"got {cfg.cam.method}; name a shallow layer such as layer1 instead"
        )
    try:
        check_layers(cfg.classifier.backbone, [fine])
    except ValueError as exc:
        raise ConfigError(f"cam.fine_layer: {exc}") from None


def _check_vit_backbone(cfg: Config) -> None:
    """A ViT backbone: stride 32 only (its stride is the patch size), blocks as CAM layers,
    the transformer preset unless cam.preset is set."""
    name = cfg.classifier.backbone
    if cfg.classifier.output_stride != 32:
        raise ConfigError(
            f"classifier.output_stride: {name} is a ViT (its stride is its patch size); use 32"
        )
    _resolve_cam_layers(
        cfg, vit_backbones.default_vit_cam_layers, vit_backbones.check_vit_cam_layers
    )
    _resolve_cam_preset(cfg)


def _check_required(cfg: Config) -> None:
    if cfg.data.name in ("voc", "folder") and not cfg.data.root:
        raise ConfigError(
            f"data.root: required for data.name={cfg.data.name}; pass data.root=/path"
        )
    if cfg.cam.layer_weights is not None and len(cfg.cam.layer_weights) != len(cfg.cam.layers):
        raise ConfigError(
            f"cam.layer_weights: needs one weight per layer in cam.layers "
            f"({len(cfg.cam.layers)}), got {len(cfg.cam.layer_weights)}"
        )
    # context decoupling: the affinity stage would still learn from the round-1 masks
    if cfg.classifier.context_decoupling and cfg.pseudo.refine == "affinity":
        raise ConfigError(
            "classifier.context_decoupling: not available with pseudo.refine=affinity (the "
            "affinities learn from the round-1 masks); use pseudo.refine=par, crf or none"
        )


def _check_crf_extra(cfg: Config) -> None:
    wanted = cfg.pseudo.refine == "crf" or cfg.segmenter.eval_crf
    if wanted and importlib.util.find_spec("pydensecrf") is None:
        key = "pseudo.refine=crf" if cfg.pseudo.refine == "crf" else "segmenter.eval_crf=true"
        raise ConfigError(
            f"{key} needs the dense CRF extra: pip install -e '.[crf]' (pydensecrf2); or "
            f"pseudo.refine=par, which needs nothing"
        )


def _check_data(data: DataConfig) -> None:
    """The data keys that only make sense together."""
    if data.root and data.name in ("synthetic", "synthetic_lesion"):
        raise ConfigError(
            f"data.root: data.name={data.name} generates its images and would ignore "
            f"data.root={data.root!r}; set data.name=folder to read that folder"
        )
    if data.intensity != "dataset" and data.name in ("voc", "synthetic"):
        raise ConfigError(
            f"data.intensity: data.name={data.name} holds 8-bit RGB images normalised by fixed "
            f"statistics; {data.intensity} is for folder and synthetic_lesion data"
        )
    if data.intensity == "window":
        if data.window is None or len(data.window) != 2 or not data.window[0] < data.window[1]:
            raise ConfigError(
                f"data.window: data.intensity=window needs data.window=[low, high] with "
                f"low < high, got {data.window}"
            )
    elif data.window is not None:
        raise ConfigError(
            f"data.window: only used with data.intensity=window (now {data.intensity}); "
            f"set data.intensity=window or remove data.window"
        )
    if data.mask_values is not None:
        if not data.mask_values:
            raise ConfigError(
                "data.mask_values: empty mapping; list every value the mask files hold, "
                "e.g. {0: 0, 255: 1}, or leave it null for identity"
            )
        bad = {k: v for k, v in data.mask_values.items() if not (0 <= k <= 255 and 0 <= v <= 255)}
        if bad:
            raise ConfigError(
                f"data.mask_values: file values and classes lie in 0..255 (255 = ignore), got {bad}"
            )


def _check_trainer(cfg: Config) -> None:
    """The device list or count, and the two counts that one message names together."""
    t = cfg.trainer
    devices = t.devices
    if isinstance(devices, list):
        if not devices or any(d < 0 for d in devices) or len(set(devices)) != len(devices):
            raise ConfigError(
                f"trainer.devices: a list needs distinct device indices >= 0, got {devices}"
            )
    elif isinstance(devices, int) and devices < 1 and devices != -1:
        raise ConfigError(
            f"trainer.devices: a count >= 1, -1 (all), 'auto' or a list, got {devices}"
        )
    elif isinstance(devices, str) and devices != "auto":
        raise ConfigError(
            f"trainer.devices: a count >= 1, -1 (all), 'auto' or a list, got {devices!r}"
        )
    if t.num_nodes < 1 or t.accumulate_grad_batches < 1:
        raise ConfigError(
            f"trainer.num_nodes and trainer.accumulate_grad_batches must be >= 1, got "
            f"{t.num_nodes} and {t.accumulate_grad_batches}"
        )


def _check_libraries(cfg: Config) -> None:
    """Values that only a library can check, before any work: the smp encoder, the
    Relevance-CAM preset, the Lightning strategy."""
    encoders = smp.encoders.get_encoder_names()
    if cfg.segmenter.encoder not in encoders:
        raise ConfigError(
            f"segmenter.encoder: {cfg.segmenter.encoder!r} is not an smp encoder"
            f"{closest(cfg.segmenter.encoder, encoders)}; e.g. resnet18, resnet50, resnet101, "
            f"efficientnet-b0, mit_b0 (segmentation_models_pytorch lists {len(encoders)})"
        )
    if cfg.cam.method == "relevance" and cfg.cam.preset not in PRESETS:
        raise ConfigError(
            f"cam.preset: {cfg.cam.preset!r} is not a Relevance-CAM preset"
            f"{closest(cfg.cam.preset, PRESETS)}; choose one of: {', '.join(sorted(PRESETS))}"
        )
    strategies = sorted(
        {"auto", "ddp", "ddp_spawn", "fsdp", "deepspeed", *StrategyRegistry.available_strategies()}
    )
    if cfg.trainer.strategy not in strategies:
        raise ConfigError(
            f"trainer.strategy: {cfg.trainer.strategy!r} is not a Lightning strategy"
            f"{closest(cfg.trainer.strategy, strategies)}; e.g. auto, ddp, ddp_spawn, fsdp"
        )
