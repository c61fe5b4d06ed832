"""The config's schema: one dataclass per group, every key with its type annotation, default and
help, and in its field metadata the closed set of values (``choices``) or the range a number must
lie in (``check``). Coercion, the checks and ``describe_keys`` walk these fields, so adding a key
is one line here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from wsss.cam import CAM_METHODS
from wsss.cam.libra import BOUND_MODES
from wsss.cam.postprocess import NORMALIZATIONS
from wsss.config.fields import (
    AT_LEAST_ONE,
    FRACTION,
    NOT_NEGATIVE,
    Range,
    choice,
    interval,
    option,
)
from wsss.config.training import (
    AffinityConfig,
    ClassifierConfig,
    SegmenterConfig,
    TrainerConfig,
)
from wsss.data.intensity import INTENSITY_MODES
from wsss.pseudo.calibrate import OBJECTIVES
from wsss.pseudo.fusion_weights import FUSION_WEIGHTS
from wsss.pseudo.refine import REFINE_METHODS

# the measured-best normalisation first, then the others in the order wsss.cam lists them
MAP_NORMALIZATIONS = ("centred", *(name for name in NORMALIZATIONS if name != "centred"))
SYNTHETIC_IMAGE_SIZE = 128  # data.image_size of the synthetic sources when unset


@dataclass
class RunConfig:
    name: str = option("default", "run directory name under run.dir")
    dir: str = option("checkpoints", "where runs write")
    seed: int = option(0, "global seed (data order, init, synthetic data)")
    overwrite: bool = option(False, "redo finished stages and replace their outputs")
    reference: Optional[str] = option(
        None,
        "a finished run directory whose segmenter was trained on ground "
        "truth (segmenter.masks=ground_truth): report.md shows it and the "
        "ratio",
    )


@dataclass
class DataConfig:
    name: str = choice(
        "synthetic", "voc", "folder", "synthetic", "synthetic_lesion", help="data source"
    )
    root: Optional[str] = option(
        None, "voc: the VOC2012 folder; folder: the folder holding the CSVs"
    )
    train_split: str = option(
        "train", "split name (voc: ImageSets/Segmentation/<split>.txt; folder: <split>.csv)"
    )
    val_split: str = option("val", "split used for validation and seg_miou")
    test_split: Optional[str] = option(
        None, "optional split without masks; `wsss evaluate` writes its predictions"
    )
    crop_size: int = option(128, "training crop side in pixels", check=AT_LEAST_ONE)
    batch_size: int = option(16, "training batch size", check=AT_LEAST_ONE)
    num_workers: int = option(2, "DataLoader worker processes", check=NOT_NEGATIVE)
    image_size: Optional[int] = option(
        None,
        "folder: long side the images are resized to for training and "
        "CAMs (outputs are written at each image's original size; null = "
        "keep the original size); synthetic sources: image side (null = "
        "128); voc: unused",
        check=AT_LEAST_ONE,
    )
    # image folder + CSV (medical)
    image_dir: str = option("images", "folder: image directory, relative to data.root")
    mask_dir: Optional[str] = option(
        None, "folder: optional mask directory (PNG named by image stem)"
    )
    mask_values: Optional[dict[int, int]] = option(
        None,
        "folder: mask file value -> class index, e.g. {0: 0, "
        "255: 1} for 0/255 lesion masks; values left out are "
        "an error; null = identity (the value is the class, "
        "255 = ignore)",
    )
    class_names: Optional[list[str]] = option(
        None,
        "foreground class names; folder: default the union of the "
        "labels in the train, val and test CSVs, sorted",
    )
    channels: int = choice(
        3, 1, 3, help="grayscale images: 1 = one-channel model, 3 = repeat to RGB"
    )
    intensity: str = choice(
        "dataset",
        *INTENSITY_MODES,
        help="dataset: raw units, normalised by the data set's mean/std; minmax: each "
        "image scaled to 0..1 by its own min and max (allows mixed bit depths); "
        "window: data.window [low, high] clipped and scaled to 0..1 (CT)",
    )
    window: Optional[list[float]] = option(
        None,
        "intensity=window: [low, high] in raw units (DICOM: after "
        "rescale, e.g. Hounsfield units [-160, 240])",
    )
    mean: Optional[list[float]] = option(
        None,
        "per-channel mean after data.intensity (raw units for dataset); "
        "None = data set default / computed",
    )
    std: Optional[list[float]] = option(
        None, "per-channel std after data.intensity; None = data set default / computed"
    )
    cache_dir: Optional[str] = option(
        None,
        "folder: where computed statistics are cached; null = "
        "$WSSS_CACHE_DIR, else $XDG_CACHE_HOME/wsss, else ~/.cache/wsss; "
        "never the data folder",
    )
    # background-only negatives (W-OoD style)
    negatives: Optional[str] = option(
        None,
        "a folder of images (or a text file listing image paths, one a line) that hold none of "
        "the classes: added to the classifier's training split with all-zero labels and to the "
        "Libra reference library as images lacking every class; never pseudo-masked. null = none",
    )
    # built-in synthetic data
    num_train: int = option(400, "synthetic sources: images in the train split", check=AT_LEAST_ONE)
    num_val: int = option(100, "synthetic sources: images in the val split", check=AT_LEAST_ONE)
    negative_fraction: float = option(
        0.3, "synthetic_lesion: share of images without any finding", check=interval("[0, 1)")
    )
    findings: int = choice(
        1, 1, 2, help="synthetic_lesion: 1 = lesion; 2 = lesion and calcification (multi-finding)"
    )


@dataclass
class CamConfig:
    method: str = choice("relevance", *CAM_METHODS, help="attribution method")
    preset: Optional[str] = option(
        None,
        "RelevanceCAM preset (see wsss.cam presets); None = the backbone family's default: "
        "transformer for ViT backbones (per-position weights), default for CNNs",
    )
    layers: Optional[list[str]] = option(
        None,
        "layers to capture, as in model.named_modules(); None = the "
        "backbone family's default (wsss.models.backbones)",
    )
    layer_weights: Optional[list[float]] = option(None, "fusion weights per layer; None = equal")
    scales: list[float] = option(
        [1.0],
        "input scales to aggregate",
        check=Range(low=0, open_low=True, wording="needs positive scales"),
    )
    flip: bool = option(False, "also aggregate horizontally flipped inputs")
    normalize: str = choice(
        "centred",
        *MAP_NORMALIZATIONS,
        help="per-map normalisation before fusion: centred (minus the spatial mean, "
        "then ReLU/max; measured best, docs/benchmarks.md), relu_max, minmax",
    )
    batch_size: int = option(8, "images per predict batch", check=AT_LEAST_ONE)
    libra_references: int = option(
        30,
        "libra: reference activations per class, from training images labelled "
        "without the class and inside the bound (cam.libra_bound_mode)",
        check=AT_LEAST_ONE,
    )
    libra_bound: float = option(
        0.1,
        "libra, cam.libra_bound_mode=absolute: a reference image's sigmoid score for the class "
        "must be below this",
        check=interval("(0, 1]"),
    )
    libra_bound_mode: str = choice(
        "relative",
        *BOUND_MODES,
        help="libra: which negative images may be references: relative (the lowest-scoring "
        "cam.libra_negative_quantile of each class's negatives, at least one; works on any "
        "classifier that ranks), absolute (scored below cam.libra_bound)",
    )
    libra_negative_quantile: float = option(
        0.5,
        "libra, cam.libra_bound_mode=relative: the fraction of each class's negative training "
        "images, lowest scores first, references are drawn from",
        check=interval("(0, 1]"),
    )
    # fine-scale gate and erasing-style expansion (docs/ALGORITHMS.md): off by default
    fine_layer: Optional[str] = option(
        None,
        "a shallow layer (e.g. layer1) or input whose map gates the fused deep map, from the same "
        "relevance sweep; None = no gate",
    )
    fine_power: float = option(
        1.0, "fine gate: power of min(1, fine / its level in the object)", check=NOT_NEGATIVE
    )
    fine_smooth: int = option(
        1, "fine gate: odd box-filter size in pixels applied to the fine map", check=AT_LEAST_ONE
    )
    erase_steps: int = option(
        0, "erasing steps: query again with the found region removed; 0 = none", check=NOT_NEGATIVE
    )
    erase_score_floor: float = option(
        0.5,
        "erasing: stop once the class score on the erased image falls under this fraction of "
        "the original",
        check=FRACTION,
    )
    erase_threshold: float = option(
        0.5, "erasing: the map level counted as found (erased)", check=interval("(0, 1]")
    )


@dataclass
class PseudoConfig:
    calibration: str = choice("libra", "libra", "fixed", help="threshold calibration")
    threshold: float = option(
        0.25,
        "fixed foreground threshold on the normalised fused maps (also the seed threshold)",
        check=interval("(0, 1)"),
    )
    objective: str = choice(
        "delete",
        *OBJECTIVES,
        help="libra calibration objective: increase, keep_delete, area "
        "(docs/ALGORITHMS.md) or delete (smallest region whose removal drops "
        "the confidence to pseudo.delta of it; measured best, docs/benchmarks.md) or "
        "delete_preserve (as delete, and the region alone keeps pseudo.rho of it)",
    )
    rho: float = option(0.9, "area objective: keep this fraction of the confidence", check=FRACTION)
    delta: float = option(
        0.3,
        "delete objective: deleting the region leaves at most this fraction of the confidence",
        check=FRACTION,
    )
    calibration_images: int = option(
        64, "training images used to calibrate thresholds", check=AT_LEAST_ONE
    )
    min_confidence: float = option(
        0.5,
        "calibrate only on (image, class) pairs the classifier scores at least "
        "this on the whole image; classes without one take the global median",
        check=FRACTION,
    )
    fallback: str = choice(
        "shrink",
        "shrink",
        "global",
        help="threshold of a class with few or no calibration pairs: shrink (its median "
        "pulled toward pseudo.threshold by pseudo.shrinkage pseudo-pairs; none: "
        "pseudo.threshold) or global (the median over all classes)",
    )
    # label-free layer fusion weights
    fusion_weights: str = choice(
        "fixed",
        *FUSION_WEIGHTS,
        help="layer weights of the fused map: fixed (cam.layer_weights) or calibrated (chosen "
        "on the calibration images by masked queries: the candidate whose top regions keep the "
        "class score alone and remove it when deleted; docs/ALGORITHMS.md)",
    )
    shrinkage: float = option(
        4.0, "shrink fallback: weight of pseudo.threshold, in calibration pairs"
    )
    grid: list[float] = option(
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
    ignore_band: float = option(
        0.05, "pixels whose best score is within this of the background score become 255"
    )
    refine: str = choice(
        "none",
        *REFINE_METHODS,
        help="refinement of the calibrated maps along the image: none, crf (dense CRF, the "
        "`crf` extra), par (pixel-adaptive, colour and position, no training) or "
        "affinity (learned inter-pixel affinity + random walk: the affinity stage)",
    )
    par_iterations: int = option(10, "par: refinement iterations", check=AT_LEAST_ONE)
    affinity_labels: str = choice(
        "calibrated",
        "calibrated",
        "par",
        "crf",
        help="with refine=affinity, the masks the affinities learn from: the calibrated masks, "
        "or those masks refined in the image by par or crf (IRN learns its boundaries from "
        "refined seeds); the random walk still starts from the calibrated maps",
    )
    save_maps: bool = option(False, "also write fused float maps as .npz (float16)")
    num_panels: int = option(8, "samples in the panel grid")
    score_split: Optional[str] = option(
        None,
        "also score seeds and pseudo-masks on the pseudo-labelled images "
        "of this split (VOC: train, the 1,464 images published tables "
        "use)",
    )


@dataclass
class LoggerConfig:
    kind: str = choice("wandb", "wandb", "csv", "none", help="experiment tracker")
    wandb_mode: str = choice("offline", "offline", "online", "disabled", help="wandb mode")
    project: str = option("wsss", "wandb project")
    num_panels: int = option(4, "image panels logged per validation epoch")


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
