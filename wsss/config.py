"""Typed run configuration: dataclasses per group, loaded from YAML, overridden by dotted
``key=value`` arguments, and validated before any work starts.

Every key has a type annotation and, where the set of values is closed, a list of choices in
its field metadata. Validation walks the dataclasses, so adding a key is one line here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config key is unknown, or its value has the wrong type or is not one of its choices."""


def _choice(default: Any, *choices: Any, help: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "help": help})


def _opt(default: Any, help: str = "") -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: list(default) if isinstance(default, list) else dict(default),
                     metadata={"help": help})
    return field(default=default, metadata={"help": help})


CAM_METHODS = ("relevance", "gradcam", "gradcampp", "liftcam", "cam", "libra")
MAP_NORMALIZATIONS = ("centred", "relu_max", "minmax")  # wsss.cam.NORMALIZATIONS
INTENSITY_MODES = ("dataset", "minmax", "window")  # wsss.data.intensity
SYNTHETIC_IMAGE_SIZE = 128  # data.image_size of the synthetic sources when unset


@dataclass
class RunConfig:
    name: str = _opt("default", "run directory name under run.dir")
    dir: str = _opt("checkpoints", "where runs write")
    seed: int = _opt(0, "global seed (data order, init, synthetic data)")
    overwrite: bool = _opt(False, "redo finished stages and replace their outputs")
    reference: Optional[str] = _opt(None, "a finished run directory whose segmenter was trained on ground truth "
                                          "(segmenter.masks=ground_truth): report.md shows it and the ratio")


@dataclass
class DataConfig:
    name: str = _choice("synthetic", "voc", "folder", "synthetic", "synthetic_lesion", help="data source")
    root: Optional[str] = _opt(None, "voc: the VOC2012 folder; folder: the folder holding the CSVs")
    train_split: str = _opt("train", "split name (voc: ImageSets/Segmentation/<split>.txt; folder: <split>.csv)")
    val_split: str = _opt("val", "split used for validation and seg_miou")
    test_split: Optional[str] = _opt(None, "optional split without masks; `wsss evaluate` writes its predictions")
    crop_size: int = _opt(128, "training crop side in pixels")
    batch_size: int = _opt(16, "training batch size")
    num_workers: int = _opt(2, "DataLoader worker processes")
    image_size: Optional[int] = _opt(None, "folder: long side the images are resized to for training and CAMs "
                                           "(outputs are written at each image's original size; null = keep "
                                           "the original size); synthetic sources: image side (null = 128); voc: unused")
    # image folder + CSV (medical)
    image_dir: str = _opt("images", "folder: image directory, relative to data.root")
    mask_dir: Optional[str] = _opt(None, "folder: optional mask directory (PNG named by image stem)")
    mask_values: Optional[dict[int, int]] = _opt(None, "folder: mask file value -> class index, e.g. {0: 0, 255: 1} "
                                                       "for 0/255 lesion masks; values left out are an error; "
                                                       "null = identity (the value is the class, 255 = ignore)")
    class_names: Optional[list[str]] = _opt(None, "foreground class names; folder: default the union of the labels "
                                                  "in the train, val and test CSVs, sorted")
    channels: int = _choice(3, 1, 3, help="grayscale images: 1 = one-channel model, 3 = repeat to RGB")
    intensity: str = _choice("dataset", *INTENSITY_MODES,
                             help="dataset: raw units, normalised by the data set's mean/std; minmax: each image "
                                  "scaled to 0..1 by its own min and max (allows mixed bit depths); window: "
                                  "data.window [low, high] clipped and scaled to 0..1 (CT)")
    window: Optional[list[float]] = _opt(None, "intensity=window: [low, high] in raw units (DICOM: after rescale, "
                                               "e.g. Hounsfield units [-160, 240])")
    mean: Optional[list[float]] = _opt(None, "per-channel mean after data.intensity (raw units for dataset); "
                                             "None = data set default / computed")
    std: Optional[list[float]] = _opt(None, "per-channel std after data.intensity; None = data set default / computed")
    cache_dir: Optional[str] = _opt(None, "folder: where computed statistics are cached; null = $WSSS_CACHE_DIR, "
                                          "else $XDG_CACHE_HOME/wsss, else ~/.cache/wsss; never the data folder")
    # built-in synthetic data
    num_train: int = _opt(400, "synthetic sources: images in the train split")
    num_val: int = _opt(100, "synthetic sources: images in the val split")
    negative_fraction: float = _opt(0.3, "synthetic_lesion: share of images without any finding")
    findings: int = _choice(1, 1, 2, help="synthetic_lesion: 1 = lesion; 2 = lesion and calcification "
                                          "(multi-finding)")


@dataclass
class ClassifierConfig:
    backbone: str = _opt("resnet18", "any torchvision classification model name "
                                     "(torchvision.models.list_models(module=torchvision.models))")
    pretrained: bool = _opt(False, "ImageNet weights from torchvision (needs network or TORCH_HOME cache)")
    output_stride: int = _choice(32, 16, 32, help="16 dilates the last stage for finer maps (ResNet, "
                                                  "EfficientNet, MobileNet, MNASNet, RegNet, ShuffleNet)")
    max_epochs: int = _opt(12, "training epochs")
    lr: float = _opt(0.01, "head learning rate (SGD)")
    backbone_lr_mult: float = _opt(0.1, "backbone learning rate = lr * this")
    weight_decay: float = _opt(1e-4, "SGD weight decay")
    momentum: float = _opt(0.9, "SGD momentum")
    schedule: str = _choice("poly", "poly", "cosine", "constant", help="learning-rate schedule")
    optimizer: str = _choice("sgd", "sgd", "adamw", help="sgd (with momentum) or adamw (scratch training)")


@dataclass
class CamConfig:
    method: str = _choice("relevance", *CAM_METHODS, help="attribution method")
    preset: str = _opt("default", "RelevanceCAM preset (see wsss.cam presets)")
    layers: Optional[list[str]] = _opt(None, "layers to capture, as in model.named_modules(); None = the "
                                             "backbone family's default (wsss.models.backbones)")
    layer_weights: Optional[list[float]] = _opt(None, "fusion weights per layer; None = equal")
    scales: list[float] = _opt([1.0], "input scales to aggregate")
    flip: bool = _opt(False, "also aggregate horizontally flipped inputs")
    normalize: str = _choice("centred", *MAP_NORMALIZATIONS,
                             help="per-map normalisation before fusion: centred (minus the spatial mean, "
                                  "then ReLU/max; measured best, docs/benchmarks.md), relu_max, minmax")
    batch_size: int = _opt(8, "images per predict batch")
    libra_references: int = _opt(30, "libra: reference activations per class, from training images labelled "
                                     "without the class and scored below cam.libra_bound for it")
    libra_bound: float = _opt(0.1, "libra: a reference image's sigmoid score for the class must be below this")


@dataclass
class PseudoConfig:
    calibration: str = _choice("libra", "libra", "fixed", help="threshold calibration")
    threshold: float = _opt(0.25, "fixed foreground threshold on the normalised fused maps (also the seed threshold)")
    objective: str = _choice("delete", "increase", "keep_delete", "area", "delete",
                             help="libra calibration objective: increase, keep_delete, area (docs/ALGORITHMS.md "
                                  "§3.5) or delete (smallest region whose removal drops the confidence to "
                                  "pseudo.delta of it; measured best, docs/benchmarks.md §4)")
    rho: float = _opt(0.9, "area objective: keep this fraction of the confidence")
    delta: float = _opt(0.3, "delete objective: deleting the region leaves at most this fraction of the confidence")
    calibration_images: int = _opt(64, "training images used to calibrate thresholds")
    min_confidence: float = _opt(0.5, "calibrate only on (image, class) pairs the classifier scores at least "
                                      "this on the whole image; classes without one take the global median")
    fallback: str = _choice("shrink", "shrink", "global",
                            help="threshold of a class with few or no calibration pairs: shrink (its median pulled "
                                 "toward pseudo.threshold by pseudo.shrinkage pseudo-pairs; none: "
                                 "pseudo.threshold) or global (the median over all classes)")
    shrinkage: float = _opt(4.0, "shrink fallback: weight of pseudo.threshold, in calibration pairs")
    grid: list[float] = _opt([0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75,
                              0.8, 0.85, 0.9], "candidate thresholds")
    ignore_band: float = _opt(0.05, "pixels whose best score is within this of the background score become 255")
    refine: str = _choice("none", "none", "crf", "par", "affinity",
                          help="refinement of the calibrated maps along the image: none, crf (dense CRF, the `crf` "
                               "extra), par (pixel-adaptive, colour and position, no training) or affinity "
                               "(learned inter-pixel affinity + random walk: the affinity stage)")
    par_iterations: int = _opt(10, "par: refinement iterations")
    save_maps: bool = _opt(False, "also write fused float maps as .npz (float16)")
    num_panels: int = _opt(8, "samples in the panel grid")
    score_split: Optional[str] = _opt(None, "also score seeds and pseudo-masks on the pseudo-labelled images of "
                                            "this split (VOC: train, the 1,464 images published tables use)")


@dataclass
class AffinityConfig:
    """The affinity stage (pseudo.refine=affinity): inter-pixel affinities learned from the
    calibrated pseudo-masks, then a random walk of the class maps (AffinityNet / IRN)."""

    max_epochs: int = _opt(8, "training epochs")
    lr: float = _opt(1e-3, "AdamW learning rate of the affinity head (backbone: x affinity.backbone_lr_mult)")
    backbone_lr_mult: float = _opt(0.1, "backbone learning rate = lr * this")
    freeze_backbone: bool = _opt(False, "keep the classifier's backbone fixed (measured: fine-tuning is better)")
    radius: int = _opt(5, "pixel pairs within this radius, on the feature grid")
    stride: int = _opt(4, "feature grid stride of the affinity embedding")
    beta: float = _opt(8.0, "random walk: affinity power")
    steps: int = _opt(16, "random walk steps; scale with the square of the feature grid side (VOC 512 px: 256)")


@dataclass
class SegmenterConfig:
    arch: str = _choice("DeepLabV3Plus", "Unet", "UnetPlusPlus", "FPN", "PSPNet", "DeepLabV3",
                        "DeepLabV3Plus", "Linknet", "MAnet", "PAN", help="smp architecture")
    encoder: str = _opt("resnet18", "smp encoder name")
    pretrained: bool = _opt(False, "ImageNet encoder weights (needs network)")
    max_epochs: int = _opt(12, "training epochs")
    lr: float = _opt(0.01, "learning rate (of segmenter.optimizer)")
    weight_decay: float = _opt(1e-4, "weight decay")
    momentum: float = _opt(0.9, "SGD momentum")
    optimizer: str = _choice("sgd", "sgd", "adamw", help="sgd (with momentum) or adamw (faster from scratch)")
    schedule: str = _choice("poly", "poly", "cosine", "constant", help="learning-rate schedule")
    loss: str = _choice("ce", "ce", "ce_dice", help="ce: cross-entropy; ce_dice: cross-entropy + multiclass "
                                                    "soft Dice (small classes learn sooner); 255 ignored by both")
    masks: str = _opt("pseudo", "training masks: pseudo | ground_truth | a directory of palette PNGs")
    eval_scales: list[float] = _opt([1.0], "evaluation scales (multi-scale inference)")
    eval_flip: bool = _opt(False, "evaluation with horizontal flip")
    eval_crf: bool = _opt(False, "also score the predictions after a dense CRF (the `crf` extra), as VOC "
                                 "papers report it, beside the plain figure")


@dataclass
class TrainerConfig:
    accelerator: str = _choice("auto", "auto", "cpu", "gpu", "cuda", "mps", help="Lightning accelerator")
    devices: Union[int, str, list[int]] = _opt("auto", "Lightning devices: a count, -1 (all), 'auto', or a "
                                                       "list of device indices")
    num_nodes: int = _opt(1, "machines (Lightning num_nodes); data.batch_size is the global batch over all")
    strategy: str = _opt("auto", "Lightning strategy (e.g. ddp, ddp_spawn)")
    precision: str = _choice("32-true", "32-true", "16-mixed", "bf16-mixed", "32", "16", "bf16",
                             help="Lightning precision")
    deterministic: Optional[bool] = _opt(None, "Lightning deterministic (GPU determinism; CPU runs are "
                                               "deterministic anyway); null = Lightning's default")
    sync_batchnorm: bool = _opt(True, "with several GPU processes, batch norm over the global batch, so the "
                                      "result follows the single-process run (torch offers it on GPU only)")
    gradient_clip_val: Optional[float] = _opt(None, "clip gradients to this norm (training stages)")
    accumulate_grad_batches: int = _opt(1, "optimizer step every this many batches (training stages)")
    max_time: Optional[str] = _opt(None, "stop a training stage after DD:HH:MM:SS (it then counts as done)")
    log_every_n_steps: int = _opt(10, "logging interval")
    limit_train_batches: Optional[float] = _opt(None, "Lightning limit (int batches or float fraction)")
    limit_val_batches: Optional[float] = _opt(None, "Lightning limit (int batches or float fraction)")


@dataclass
class LoggerConfig:
    kind: str = _choice("wandb", "wandb", "csv", "none", help="experiment tracker")
    wandb_mode: str = _choice("offline", "offline", "online", "disabled", help="wandb mode")
    project: str = _opt("wsss", "wandb project")
    num_panels: int = _opt(4, "image panels logged per validation epoch")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---------------------------------------------------------------- validation


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        return f"mapping of {_describe(key_tp)} to {_describe(value_tp)}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(exc)
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if value is not None and len(options) == 1 and typing.get_origin(options[0]) is dict:
            raise errors[typing.get_args(tp).index(options[0])]  # Optional[mapping]: its own, precise message
        raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        return _coerce_mapping(value, tp, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def closest(value: Any, choices: Any) -> str:
    """' (did you mean X?)' for the choice closest to a misspelt value, or ''."""
    import difflib

    match = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


RENAMED = {"pseudo.crf": "pseudo.crf was replaced by pseudo.refine=crf (or par / affinity / none)"}


def _coerce_mapping(value: Any, tp: Any, key: str) -> dict[Any, Any]:
    """A mapping with typed keys and values; integer keys may also be written as quoted digits."""
    key_tp, value_tp = typing.get_args(tp)
    example = " such as {0: 0, 255: 1} (a space after each colon)" if key_tp is int else ""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a {_describe(tp)}{example}, got {value!r}")
    result = {}
    for raw_key, item in value.items():
        if key_tp is int and isinstance(raw_key, str) and raw_key.strip().lstrip("-").isdigit():
            raw_key = int(raw_key)
        try:
            coerced_key = _coerce(raw_key, key_tp, f"{key} key {raw_key!r}")
            result[coerced_key] = _coerce(item, value_tp, f"{key}[{raw_key!r}]")
        except ConfigError as exc:
            raise ConfigError(f"{exc}; {key} is a {_describe(tp)}{example}") from exc
    return result


def _build_group(cls: type, values: dict[str, Any], group: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    for key in unknown:
        if f"{group}.{key}" in RENAMED:
            raise ConfigError(RENAMED[f"{group}.{key}"])
    if unknown:
        raise ConfigError(f"unknown key {group}.{unknown[0]}{closest(unknown[0], fields)}; valid keys in "
                          f"'{group}': {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        key = f"{group}.{name}"
        coerced = _coerce(value, hints[name], key)
        choices = fields[name].metadata.get("choices")
        if choices and coerced not in choices:
            raise ConfigError(f"{key}: {coerced!r} is not a valid choice{closest(coerced, choices)}; choose one of: "
                              f"{', '.join(map(str, choices))}")
        kwargs[name] = coerced
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (unknown keys and bad values raise)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of groups, got {type(raw).__name__}")
    groups = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - set(groups))
    if unknown:
        raise ConfigError(f"unknown config group '{unknown[0]}'{closest(unknown[0], groups)}; valid groups: "
                          f"{', '.join(groups)}")
    hints = typing.get_type_hints(Config)
    built = {}
    for name in groups:
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {values!r}")
        built[name] = _build_group(hints[name], values, name)
    cfg = Config(**built)
    _check_backbone(cfg)
    _check_cross_field(cfg)
    _check_libraries(cfg)
    return cfg


def _check_backbone(cfg: Config) -> None:
    """The backbone exists in torchvision, allows the output stride, and has the CAM layers
    (filled in with the family's default when unset)."""
    from wsss.models import backbones  # torchvision is only imported once a config is checked

    name = cfg.classifier.backbone
    try:
        backbones.check_backbone(name)
    except ValueError as exc:
        raise ConfigError(f"classifier.backbone: {exc}") from None
    if cfg.classifier.output_stride == 16 and not backbones.supports_output_stride_16(name):
        raise ConfigError(f"classifier.output_stride: 16 is not available for {name} (its last "
                          "downsampling is a pooling or an even-kernel conv); use 32")
    try:
        if cfg.cam.layers is None:
            cfg.cam.layers = list(backbones.default_cam_layers(name))
        backbones.check_cam_layers(name, cfg.cam.layers)
    except ValueError as exc:
        raise ConfigError(f"cam.layers: {exc}") from None


def _check_libraries(cfg: Config) -> None:
    """Values that only a library can check, before any work: the smp encoder and
    architecture, the Relevance-CAM preset, the Lightning strategy."""
    import segmentation_models_pytorch as smp

    encoders = smp.encoders.get_encoder_names()
    if cfg.segmenter.encoder not in encoders:
        raise ConfigError(f"segmenter.encoder: {cfg.segmenter.encoder!r} is not an smp encoder"
                          f"{closest(cfg.segmenter.encoder, encoders)}; e.g. resnet18, resnet50, resnet101, "
                          f"efficientnet-b0, mit_b0 (segmentation_models_pytorch lists {len(encoders)})")
    if cfg.cam.method == "relevance":
        from wsss.cam import PRESETS

        if cfg.cam.preset not in PRESETS:
            raise ConfigError(f"cam.preset: {cfg.cam.preset!r} is not a Relevance-CAM preset"
                              f"{closest(cfg.cam.preset, PRESETS)}; choose one of: {', '.join(sorted(PRESETS))}")
    from lightning.pytorch.strategies import StrategyRegistry

    strategies = sorted({"auto", "ddp", "ddp_spawn", "fsdp", "deepspeed", *StrategyRegistry.available_strategies()})
    if cfg.trainer.strategy not in strategies:
        raise ConfigError(f"trainer.strategy: {cfg.trainer.strategy!r} is not a Lightning strategy"
                          f"{closest(cfg.trainer.strategy, strategies)}; e.g. auto, ddp, ddp_spawn, fsdp")


def _check_cross_field(cfg: Config) -> None:
    if cfg.data.name in ("voc", "folder") and not cfg.data.root:
        raise ConfigError(f"data.root: required for data.name={cfg.data.name}; pass data.root=/path")
    if cfg.cam.layer_weights is not None and len(cfg.cam.layer_weights) != len(cfg.cam.layers):
        raise ConfigError(f"cam.layer_weights: needs one weight per layer in cam.layers "
                          f"({len(cfg.cam.layers)}), got {len(cfg.cam.layer_weights)}")
    if not cfg.cam.scales or any(s <= 0 for s in cfg.cam.scales):
        raise ConfigError(f"cam.scales: needs positive scales, got {cfg.cam.scales}")
    if not 0.0 < cfg.pseudo.threshold < 1.0:
        raise ConfigError(f"pseudo.threshold: must lie in (0, 1), got {cfg.pseudo.threshold}")
    for key in ("rho", "delta", "min_confidence"):  # fractions of a sigmoid confidence
        if not 0.0 <= getattr(cfg.pseudo, key) <= 1.0:
            raise ConfigError(f"pseudo.{key}: must lie in [0, 1], got {getattr(cfg.pseudo, key)}")
    for key in ("batch_size", "crop_size", "num_train", "num_val", "image_size"):
        if getattr(cfg.data, key) is not None and getattr(cfg.data, key) < 1:
            raise ConfigError(f"data.{key}: must be at least 1, got {getattr(cfg.data, key)}")
    if not 0.0 < cfg.cam.libra_bound <= 1.0:
        raise ConfigError(f"cam.libra_bound: must lie in (0, 1], got {cfg.cam.libra_bound}")
    positive = [("cam", "batch_size"), ("cam", "libra_references"), ("pseudo", "calibration_images"), ("pseudo", "par_iterations"),
                ("classifier", "max_epochs"), ("segmenter", "max_epochs"), ("affinity", "max_epochs"),
                ("affinity", "radius"), ("affinity", "stride"), ("affinity", "steps")]
    for group, key in positive:
        if getattr(getattr(cfg, group), key) < 1:
            raise ConfigError(f"{group}.{key}: must be at least 1, got {getattr(getattr(cfg, group), key)}")
    grid = cfg.pseudo.grid
    if not grid or any(not 0.0 < t < 1.0 for t in grid):
        raise ConfigError(f"pseudo.grid: needs thresholds in (0, 1) (the maps are normalised to a maximum of "
                          f"1), got {grid}")
    for key in ("lr", "weight_decay"):
        for group in ("classifier", "segmenter", "affinity"):
            if hasattr(getattr(cfg, group), key) and getattr(getattr(cfg, group), key) < 0:
                raise ConfigError(f"{group}.{key}: must be >= 0, got {getattr(getattr(cfg, group), key)}")
    if (cfg.pseudo.refine == "crf" or cfg.segmenter.eval_crf) and importlib.util.find_spec("pydensecrf") is None:
        key = "pseudo.refine=crf" if cfg.pseudo.refine == "crf" else "segmenter.eval_crf=true"
        raise ConfigError(f"{key} needs the dense CRF extra: pip install -e '.[crf]' (pydensecrf2); or "
                          f"pseudo.refine=par, which needs nothing")
    _check_data(cfg.data)
    t = cfg.trainer
    devices = t.devices
    if isinstance(devices, list):
        if not devices or any(d < 0 for d in devices) or len(set(devices)) != len(devices):
            raise ConfigError(f"trainer.devices: a list needs distinct device indices >= 0, got {devices}")
    elif isinstance(devices, int) and devices < 1 and devices != -1:
        raise ConfigError(f"trainer.devices: a count >= 1, -1 (all), 'auto' or a list, got {devices}")
    elif isinstance(devices, str) and devices != "auto":
        raise ConfigError(f"trainer.devices: a count >= 1, -1 (all), 'auto' or a list, got {devices!r}")
    if t.num_nodes < 1 or t.accumulate_grad_batches < 1:
        raise ConfigError(f"trainer.num_nodes and trainer.accumulate_grad_batches must be >= 1, got "
                          f"{t.num_nodes} and {t.accumulate_grad_batches}")
    if t.gradient_clip_val is not None and t.gradient_clip_val <= 0:
        raise ConfigError(f"trainer.gradient_clip_val: must be > 0 (or null), got {t.gradient_clip_val}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be >= 0, got {cfg.data.num_workers}")


def _check_data(data: DataConfig) -> None:
    """The data keys that only make sense together."""
    if data.root and data.name in ("synthetic", "synthetic_lesion"):
        raise ConfigError(f"data.root: data.name={data.name} generates its images and would ignore "
                          f"data.root={data.root!r}; set data.name=folder to read that folder")
    if data.intensity != "dataset" and data.name in ("voc", "synthetic"):
        raise ConfigError(f"data.intensity: data.name={data.name} holds 8-bit RGB images normalised by fixed "
                          f"statistics; {data.intensity} is for folder and synthetic_lesion data")
    if data.intensity == "window":
        if data.window is None or len(data.window) != 2 or not data.window[0] < data.window[1]:
            raise ConfigError(f"data.window: data.intensity=window needs data.window=[low, high] with "
                              f"low < high, got {data.window}")
    elif data.window is not None:
        raise ConfigError(f"data.window: only used with data.intensity=window (now {data.intensity}); "
                          f"set data.intensity=window or remove data.window")
    if data.mask_values is not None:
        if not data.mask_values:
            raise ConfigError("data.mask_values: empty mapping; list every value the mask files hold, "
                              "e.g. {0: 0, 255: 1}, or leave it null for identity")
        bad = {k: v for k, v in data.mask_values.items() if not (0 <= k <= 255 and 0 <= v <= 255)}
        if bad:
            raise ConfigError(f"data.mask_values: file values and classes lie in 0..255 (255 = ignore), "
                              f"got {bad}")
    if not 0.0 <= data.negative_fraction < 1.0:
        raise ConfigError(f"data.negative_fraction: must lie in [0, 1), got {data.negative_fraction}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``group.key=value`` into its path and a YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. data.batch_size=8")
    key, _, raw_value = text.partition("=")
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"override {text!r}: keys have the form group.key, e.g. run.name=exp1")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return path, value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``group.key=value`` overrides and validate everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of groups")
    for text in overrides:
        (group, key), value = parse_override(text)
        section = raw.setdefault(group, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{group}: expected a mapping of keys")
        section[key] = value
    return config_from_dict(raw)


def describe_keys() -> str:
    """Every key with its type, default and choices, for `wsss show-config --keys`."""
    lines = []
    hints = typing.get_type_hints(Config)
    for group in dataclasses.fields(Config):
        cls = hints[group.name]
        group_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices = f.metadata.get("choices")
            extra = f" choices: {', '.join(map(str, choices))}" if choices else ""
            lines.append(f"{group.name}.{f.name} ({_describe(group_hints[f.name])}, default {default!r})"
                         f"{extra}  {f.metadata.get('help', '')}")
    return "\n".join(lines)
