"""The config's schema: one dataclass per group, every key with its type annotation, default and
help, and in its field metadata the closed set of values (``choices``) or the range a number must
lie in (``check``). Coercion, the checks and ``describe_keys`` walk these fields, so adding a key
is one line here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import segmentation_models_pytorch as smp
import yaml

from wsss.cam import CAM_METHODS, NORMALIZATIONS
from wsss.data.intensity import INTENSITY_MODES
from wsss.pseudo.calibrate import OBJECTIVES
from wsss.pseudo.refine import REFINE_METHODS


class ConfigError(ValueError):
    """A config key is unknown, or its value has the wrong type or is not one of its choices."""


# the measured-best normalisation first, then the others in the order wsss.cam lists them
MAP_NORMALIZATIONS = ("centred", *(name for name in NORMALIZATIONS if name != "centred"))
SYNTHETIC_IMAGE_SIZE = 128  # data.image_size of the synthetic sources when unset
# smp's architectures, in smp's order, less DPT: it takes timm ("tu-") encoders only, and
# segmenter.encoder accepts smp's own
SEGMENTER_ARCHITECTURES = tuple(
    model.__name__ for model in smp.MODEL_ARCHITECTURES_MAPPING.values() if model.__name__ != "DPT"
)


@dataclass(frozen=True)
class Range:
    """Where a number must lie (for a list: every item, and the list must not be empty), and how
    the error says so: ``<key>: <wording>, got <value>``. A null value of an optional key is not
    checked."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    wording: str = ""

    def admits(self, value: Any) -> bool:
        items = value if isinstance(value, list) else [value]
        return bool(items) and all(self._admits_one(item) for item in items)

    def _admits_one(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below


def interval(text: str) -> Range:
    """A Range written as an interval, e.g. ``"(0, 1]"``; its error reads "must lie in (0, 1]"."""
    low, high = (float(bound) for bound in text[1:-1].split(","))
    return Range(
        low, high, open_low=text[0] == "(", open_high=text[-1] == ")", wording=f"must lie in {text}"
    )


AT_LEAST_ONE = Range(low=1, wording="must be at least 1")
NOT_NEGATIVE = Range(low=0, wording="must be >= 0")
FRACTION = interval("[0, 1]")  # a fraction of a sigmoid confidence


def _choice(default: Any, *choices: Any, help: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "help": help})


def _opt(default: Any, help: str = "", check: Optional[Range] = None) -> Any:
    metadata = {"help": help, **({"check": check} if check else {})}
    if isinstance(default, (list, dict)):
        return field(
            default_factory=lambda: list(default) if isinstance(default, list) else dict(default),
            metadata=metadata,
        )
    return field(default=default, metadata=metadata)


# The keys the training groups (classifier, affinity, segmenter) share, declared once. Each group
# keeps them where they always stood, so no key moves; the help says what differs per group.


def _max_epochs(default: int) -> Any:
    return _opt(default, "training epochs", check=AT_LEAST_ONE)


def _lr(default: float, help: str) -> Any:
    return _opt(default, help, check=NOT_NEGATIVE)


def _backbone_lr_mult() -> Any:
    return _opt(0.1, "backbone learning rate = lr * this")


def _weight_decay(help: str) -> Any:
    return _opt(1e-4, help, check=NOT_NEGATIVE)


def _momentum() -> Any:
    return _opt(0.9, "SGD momentum")


def _schedule() -> Any:
    return _choice("poly", "poly", "cosine", "constant", help="learning-rate schedule")


def _optimizer(help: str) -> Any:
    return _choice("sgd", "sgd", "adamw", help=help)


@dataclass
class RunConfig:
    name: str = _opt("default", "run directory name under run.dir")
    dir: str = _opt("checkpoints", "where runs write")
    seed: int = _opt(0, "global seed (data order, init, synthetic data)")
    overwrite: bool = _opt(False, "redo finished stages and replace their outputs")
    reference: Optional[str] = _opt(
        None,
        "a finished run directory whose segmenter was trained on ground "
        "truth (segmenter.masks=ground_truth): report.md shows it and the "
        "ratio",
    )


@dataclass
class DataConfig:
    name: str = _choice(
        "synthetic", "voc", "folder", "synthetic", "synthetic_lesion", help="data source"
    )
    root: Optional[str] = _opt(None, "voc: the VOC2012 folder; folder: the folder holding the CSVs")
    train_split: str = _opt(
        "train", "split name (voc: ImageSets/Segmentation/<split>.txt; folder: <split>.csv)"
    )
    val_split: str = _opt("val", "split used for validation and seg_miou")
    test_split: Optional[str] = _opt(
        None, "optional split without masks; `wsss evaluate` writes its predictions"
    )
    crop_size: int = _opt(128, "training crop side in pixels", check=AT_LEAST_ONE)
    batch_size: int = _opt(16, "training batch size", check=AT_LEAST_ONE)
    num_workers: int = _opt(2, "DataLoader worker processes", check=NOT_NEGATIVE)
    image_size: Optional[int] = _opt(
        None,
        "folder: long side the images are resized to for training and "
        "CAMs (outputs are written at each image's original size; null = "
        "keep the original size); synthetic sources: image side (null = "
        "128); voc: unused",
        check=AT_LEAST_ONE,
    )
    # image folder + CSV (medical)
    image_dir: str = _opt("images", "folder: image directory, relative to data.root")
    mask_dir: Optional[str] = _opt(
        None, "folder: optional mask directory (PNG named by image stem)"
    )
    mask_values: Optional[dict[int, int]] = _opt(
        None,
        "folder: mask file value -> class index, e.g. {0: 0, "
        "255: 1} for 0/255 lesion masks; values left out are "
        "an error; null = identity (the value is the class, "
        "255 = ignore)",
    )
    class_names: Optional[list[str]] = _opt(
        None,
        "foreground class names; folder: default the union of the "
        "labels in the train, val and test CSVs, sorted",
    )
    channels: int = _choice(
        3, 1, 3, help="grayscale images: 1 = one-channel model, 3 = repeat to RGB"
    )
    intensity: str = _choice(
        "dataset",
        *INTENSITY_MODES,
        help="dataset: raw units, normalised by the data set's mean/std; minmax: each "
        "image scaled to 0..1 by its own min and max (allows mixed bit depths); "
        "window: data.window [low, high] clipped and scaled to 0..1 (CT)",
    )
    window: Optional[list[float]] = _opt(
        None,
        "intensity=window: [low, high] in raw units (DICOM: after "
        "rescale, e.g. Hounsfield units [-160, 240])",
    )
    mean: Optional[list[float]] = _opt(
        None,
        "per-channel mean after data.intensity (raw units for dataset); "
        "None = data set default / computed",
    )
    std: Optional[list[float]] = _opt(
        None, "per-channel std after data.intensity; None = data set default / computed"
    )
    cache_dir: Optional[str] = _opt(
        None,
        "folder: where computed statistics are cached; null = "
        "$WSSS_CACHE_DIR, else $XDG_CACHE_HOME/wsss, else ~/.cache/wsss; "
        "never the data folder",
    )
    # built-in synthetic data
    num_train: int = _opt(400, "synthetic sources: images in the train split", check=AT_LEAST_ONE)
    num_val: int = _opt(100, "synthetic sources: images in the val split", check=AT_LEAST_ONE)
    negative_fraction: float = _opt(
        0.3, "synthetic_lesion: share of images without any finding", check=interval("[0, 1)")
    )
    findings: int = _choice(
        1, 1, 2, help="synthetic_lesion: 1 = lesion; 2 = lesion and calcification (multi-finding)"
    )


@dataclass
class ClassifierConfig:
    backbone: str = _opt(
        "resnet18",
        "any torchvision classification model name "
        "(torchvision.models.list_models(module=torchvision.models))",
    )
    pretrained: bool = _opt(
        False, "ImageNet weights from torchvision (needs network or TORCH_HOME cache)"
    )
    output_stride: int = _choice(
        32,
        16,
        32,
        help="16 dilates the last stage for finer maps (ResNet, "
        "EfficientNet, MobileNet, MNASNet, RegNet, ShuffleNet)",
    )
    max_epochs: int = _max_epochs(12)
    lr: float = _lr(0.01, "head learning rate (SGD)")
    backbone_lr_mult: float = _backbone_lr_mult()
    weight_decay: float = _weight_decay("SGD weight decay")
    momentum: float = _momentum()
    schedule: str = _schedule()
    optimizer: str = _optimizer("sgd (with momentum) or adamw (scratch training)")


@dataclass
class CamConfig:
    method: str = _choice("relevance", *CAM_METHODS, help="attribution method")
    preset: str = _opt("default", "RelevanceCAM preset (see wsss.cam presets)")
    layers: Optional[list[str]] = _opt(
        None,
        "layers to capture, as in model.named_modules(); None = the "
        "backbone family's default (wsss.models.backbones)",
    )
    layer_weights: Optional[list[float]] = _opt(None, "fusion weights per layer; None = equal")
    scales: list[float] = _opt(
        [1.0],
        "input scales to aggregate",
        check=Range(low=0, open_low=True, wording="needs positive scales"),
    )
    flip: bool = _opt(False, "also aggregate horizontally flipped inputs")
    normalize: str = _choice(
        "centred",
        *MAP_NORMALIZATIONS,
        help="per-map normalisation before fusion: centred (minus the spatial mean, "
        "then ReLU/max; measured best, docs/benchmarks.md), relu_max, minmax",
    )
    batch_size: int = _opt(8, "images per predict batch", check=AT_LEAST_ONE)
    libra_references: int = _opt(
        30,
        "libra: reference activations per class, from training images labelled "
        "without the class and scored below cam.libra_bound for it",
        check=AT_LEAST_ONE,
    )
    libra_bound: float = _opt(
        0.1,
        "libra: a reference image's sigmoid score for the class must be below this",
        check=interval("(0, 1]"),
    )


@dataclass
class PseudoConfig:
    calibration: str = _choice("libra", "libra", "fixed", help="threshold calibration")
    threshold: float = _opt(
        0.25,
        "fixed foreground threshold on the normalised fused maps (also the seed threshold)",
        check=interval("(0, 1)"),
    )
    objective: str = _choice(
        "delete",
        *OBJECTIVES,
        help="libra calibration objective: increase, keep_delete, area "
        "(docs/ALGORITHMS.md) or delete (smallest region whose removal drops "
        "the confidence to pseudo.delta of it; measured best, docs/benchmarks.md)",
    )
    rho: float = _opt(0.9, "area objective: keep this fraction of the confidence", check=FRACTION)
    delta: float = _opt(
        0.3,
        "delete objective: deleting the region leaves at most this fraction of the confidence",
        check=FRACTION,
    )
    calibration_images: int = _opt(
        64, "training images used to calibrate thresholds", check=AT_LEAST_ONE
    )
    min_confidence: float = _opt(
        0.5,
        "calibrate only on (image, class) pairs the classifier scores at least "
        "this on the whole image; classes without one take the global median",
        check=FRACTION,
    )
    fallback: str = _choice(
        "shrink",
        "shrink",
        "global",
        help="threshold of a class with few or no calibration pairs: shrink (its median "
        "pulled toward pseudo.threshold by pseudo.shrinkage pseudo-pairs; none: "
        "pseudo.threshold) or global (the median over all classes)",
    )
    shrinkage: float = _opt(
        4.0, "shrink fallback: weight of pseudo.threshold, in calibration pairs"
    )
    grid: list[float] = _opt(
        [
            0.1,
            0.15,
            0.2,
            0.25,
            0.3,
            0.35,
            0.4,
            0.45,
            0.5,
            0.55,
            0.6,
            0.65,
            0.7,
            0.75,
            0.8,
            0.85,
            0.9,
        ],
        "candidate thresholds",
        check=Range(
            0,
            1,
            open_low=True,
            open_high=True,
            wording="needs thresholds in (0, 1) (the maps are normalised to a maximum of 1)",
        ),
    )
    ignore_band: float = _opt(
        0.05, "pixels whose best score is within this of the background score become 255"
    )
    refine: str = _choice(
        "none",
        *REFINE_METHODS,
        help="refinement of the calibrated maps along the image: none, crf (dense CRF, the "
        "`crf` extra), par (pixel-adaptive, colour and position, no training) or "
        "affinity (learned inter-pixel affinity + random walk: the affinity stage)",
    )
    par_iterations: int = _opt(10, "par: refinement iterations", check=AT_LEAST_ONE)
    save_maps: bool = _opt(False, "also write fused float maps as .npz (float16)")
    num_panels: int = _opt(8, "samples in the panel grid")
    score_split: Optional[str] = _opt(
        None,
        "also score seeds and pseudo-masks on the pseudo-labelled images "
        "of this split (VOC: train, the 1,464 images published tables "
        "use)",
    )


@dataclass
class AffinityConfig:
    """The affinity stage (pseudo.refine=affinity): inter-pixel affinities learned from the
    calibrated pseudo-masks, then a random walk of the class maps (AffinityNet / IRN)."""

    max_epochs: int = _max_epochs(8)
    lr: float = _lr(
        1e-3, "AdamW learning rate of the affinity head (backbone: x affinity.backbone_lr_mult)"
    )
    backbone_lr_mult: float = _backbone_lr_mult()
    freeze_backbone: bool = _opt(
        False, "keep the classifier's backbone fixed (measured: fine-tuning is better)"
    )
    radius: int = _opt(5, "pixel pairs within this radius, on the feature grid", check=AT_LEAST_ONE)
    stride: int = _opt(4, "feature grid stride of the affinity embedding", check=AT_LEAST_ONE)
    beta: float = _opt(8.0, "random walk: affinity power")
    steps: int = _opt(
        16,
        "random walk steps; scale with the square of the feature grid side (VOC 512 px: 256)",
        check=AT_LEAST_ONE,
    )


@dataclass
class SegmenterConfig:
    arch: str = _choice("DeepLabV3Plus", *SEGMENTER_ARCHITECTURES, help="smp architecture")
    encoder: str = _opt("resnet18", "smp encoder name")
    pretrained: bool = _opt(False, "ImageNet encoder weights (needs network)")
    max_epochs: int = _max_epochs(12)
    lr: float = _lr(0.01, "learning rate (of segmenter.optimizer)")
    weight_decay: float = _weight_decay("weight decay")
    momentum: float = _momentum()
    optimizer: str = _optimizer("sgd (with momentum) or adamw (faster from scratch)")
    schedule: str = _schedule()
    loss: str = _choice(
        "ce",
        "ce",
        "ce_dice",
        help="ce: cross-entropy; ce_dice: cross-entropy + multiclass "
        "soft Dice (small classes learn sooner); 255 ignored by "
        "both",
    )
    masks: str = _opt(
        "pseudo", "training masks: pseudo | ground_truth | a directory of palette PNGs"
    )
    eval_scales: list[float] = _opt([1.0], "evaluation scales (multi-scale inference)")
    eval_flip: bool = _opt(False, "evaluation with horizontal flip")
    eval_crf: bool = _opt(
        False,
        "also score the predictions after a dense CRF (the `crf` extra), as VOC "
        "papers report it, beside the plain figure",
    )


@dataclass
class TrainerConfig:
    accelerator: str = _choice(
        "auto", "auto", "cpu", "gpu", "cuda", "mps", help="Lightning accelerator"
    )
    devices: Union[int, str, list[int]] = _opt(
        "auto", "Lightning devices: a count, -1 (all), 'auto', or a list of device indices"
    )
    num_nodes: int = _opt(
        1, "machines (Lightning num_nodes); data.batch_size is the global batch over all"
    )
    strategy: str = _opt("auto", "Lightning strategy (e.g. ddp, ddp_spawn)")
    precision: str = _choice(
        "32-true",
        "32-true",
        "16-mixed",
        "bf16-mixed",
        "32",
        "16",
        "bf16",
        help="Lightning precision",
    )
    deterministic: Optional[bool] = _opt(
        None,
        "Lightning deterministic (GPU determinism; CPU runs are "
        "deterministic anyway); null = Lightning's default",
    )
    sync_batchnorm: bool = _opt(
        True,
        "with several GPU processes, batch norm over the global batch, so the "
        "result follows the single-process run (torch offers it on GPU only)",
    )
    gradient_clip_val: Optional[float] = _opt(
        None,
        "clip gradients to this norm (training stages)",
        check=Range(low=0, open_low=True, wording="must be > 0 (or null)"),
    )
    accumulate_grad_batches: int = _opt(
        1, "optimizer step every this many batches (training stages)"
    )
    max_time: Optional[str] = _opt(
        None, "stop a training stage after DD:HH:MM:SS (it then counts as done)"
    )
    log_every_n_steps: int = _opt(10, "logging interval")
    limit_train_batches: Optional[float] = _opt(
        None, "Lightning limit (int batches or float fraction)"
    )
    limit_val_batches: Optional[float] = _opt(
        None, "Lightning limit (int batches or float fraction)"
    )


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
