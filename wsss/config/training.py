"""The config groups of the training stages (classifier, affinity, segmenter) and of the Trainer
they share: epochs, learning rates and optimisers come from one set of field helpers, so the three
groups declare them alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import segmentation_models_pytorch as smp

from wsss.config.fields import (
    AT_LEAST_ONE,
    FRACTION,
    NOT_NEGATIVE,
    Range,
    backbone_lr_mult_option,
    choice,
    epochs_option,
    interval,
    lr_option,
    momentum_option,
    optimizer_option,
    option,
    schedule_option,
    weight_decay_option,
)

# smp's architectures, in smp's order, less DPT: it takes timm ("tu-") encoders only, and
# segmenter.encoder accepts smp's own
SEGMENTER_ARCHITECTURES = tuple(
    model.__name__ for model in smp.MODEL_ARCHITECTURES_MAPPING.values() if model.__name__ != "DPT"
)


@dataclass
class ClassifierConfig:
    backbone: str = option(
        "resnet18",
        "any torchvision classification model name "
        "(torchvision.models.list_models(module=torchvision.models)), timm:NAME for any "
        "timm CNN (timm.list_models()), or a ViT: "
        "deit_tiny_patch16_224, deit_small_patch16_224, vit_small_patch16_224, vit_b_16, "
        "vit_b_32, ... (wsss.models.vit_backbones.VIT_BACKBONES)",
    )
    pretrained: bool = option(
        False,
        "ImageNet weights from torchvision (needs network or TORCH_HOME cache); timm:NAME "
        "backbones load timm's from the Hugging Face Hub (network or HF_HOME cache)",
    )
    output_stride: int = choice(
        32,
        16,
        32,
        help="16 dilates the last stage for finer maps (ResNet, "
        "EfficientNet, MobileNet, MNASNet, RegNet, ShuffleNet)",
    )
    token_pool: str = choice(
        "token",
        "token",
        "gap",
        help="ViT backbones: the head reads the class token, or the mean of the patch tokens",
    )
    max_epochs: int = epochs_option(12)
    lr: float = lr_option(0.01, "head learning rate (SGD)")
    backbone_lr_mult: float = backbone_lr_mult_option()
    weight_decay: float = weight_decay_option("SGD weight decay")
    momentum: float = momentum_option()
    schedule: str = schedule_option()
    optimizer: str = optimizer_option("sgd (with momentum) or adamw (scratch training)")
    # context decoupling: a second classifier round on copy-paste images
    context_decoupling: bool = option(
        False,
        "after the pseudo-masks, train a second classifier on images with objects cut out by "
        "the round-1 masks and pasted onto other images (CDA), and make the pseudo-masks the "
        "segmenter trains on again with it (stages decoupled_classifier, "
        "decoupled_pseudo_masks)",
    )
    paste_probability: float = option(
        0.5,
        "context decoupling: share of training images that receive pasted objects",
        check=interval("[0, 1]"),
    )
    paste_min_scale: float = option(
        0.5,
        "context decoupling: a pasted object is rescaled by a factor drawn from [this, 1]",
        check=interval("(0, 1]"),
    )


@dataclass
class AffinityConfig:
    """The affinity stage (pseudo.refine=affinity): inter-pixel affinities learned from the
    calibrated pseudo-masks, then a random walk of the class maps (AffinityNet / IRN)."""

    max_epochs: int = epochs_option(8)
    lr: float = lr_option(
        1e-3, "AdamW learning rate of the affinity head (backbone: x affinity.backbone_lr_mult)"
    )
    backbone_lr_mult: float = backbone_lr_mult_option()
    freeze_backbone: bool = option(
        False, "keep the classifier's backbone fixed (measured: fine-tuning is better)"
    )
    radius: int = option(
        5, "pixel pairs within this radius, on the feature grid", check=AT_LEAST_ONE
    )
    stride: int = option(4, "feature grid stride of the affinity embedding", check=AT_LEAST_ONE)
    beta: float = option(8.0, "random walk: affinity power")
    steps: int = option(
        16,
        "random walk steps; scale with the square of the feature grid side (VOC 512 px: 256)",
        check=AT_LEAST_ONE,
    )
    boundary_power: float = option(
        0.0,
        "boundary-aware walk (IRN): cut each pair's affinity by (1 - the strongest boundary on "
        "its path)^this, the boundary read off the learned adjacent affinities; 0: plain walk",
        check=NOT_NEGATIVE,
    )


@dataclass
class SegmenterConfig:
    arch: str = choice("DeepLabV3Plus", *SEGMENTER_ARCHITECTURES, help="smp architecture")
    encoder: str = option("resnet18", "smp encoder name")
    pretrained: bool = option(False, "ImageNet encoder weights (needs network)")
    max_epochs: int = epochs_option(12)
    lr: float = lr_option(0.01, "learning rate (of segmenter.optimizer)")
    weight_decay: float = weight_decay_option("weight decay")
    momentum: float = momentum_option()
    optimizer: str = optimizer_option("sgd (with momentum) or adamw (faster from scratch)")
    schedule: str = schedule_option()
    loss: str = choice(
        "ce",
        "ce",
        "ce_dice",
        help="ce: cross-entropy; ce_dice: cross-entropy + multiclass "
        "soft Dice (small classes learn sooner); 255 ignored by "
        "both",
    )
    confidence_power: float = option(
        0.0,
        "weigh each pixel's cross-entropy by its pseudo-mask confidence (the top-two margin the "
        "pseudo-mask stage stores beside each mask) to this power; 0: every pixel counts alike",
        check=NOT_NEGATIVE,
    )
    co_training: bool = option(
        False,
        "train a twin segmenter beside it (BECO-style): on each class's least confident "
        "pseudo-mask pixels (segmenter.co_uncertain_fraction) each network learns the other's "
        "prediction instead of the mask; the twin is dropped after training (twice the "
        "training cost)",
    )
    co_uncertain_fraction: float = option(
        0.3,
        "co-training: the fraction of each class's labelled pixels in a batch, the least "
        "confident (top-two margin), that take the twin's label",
        check=FRACTION,
    )
    masks: str = option(
        "pseudo", "training masks: pseudo | ground_truth | a directory of palette PNGs"
    )
    # self-training rounds
    rounds: int = option(
        1,
        "self-training rounds: round r > 1 trains a fresh segmenter on round r-1's predictions "
        "of the training split (with eval_scales / eval_flip and pseudo.refine); 1: none",
        check=AT_LEAST_ONE,
    )
    eval_scales: list[float] = option([1.0], "evaluation scales (multi-scale inference)")
    eval_flip: bool = option(False, "evaluation with horizontal flip")
    eval_crf: bool = option(
        False,
        "also score the predictions after a dense CRF (the `crf` extra), as VOC "
        "papers report it, beside the plain figure",
    )


@dataclass
class TrainerConfig:
    accelerator: str = choice(
        "auto", "auto", "cpu", "gpu", "cuda", "mps", help="Lightning accelerator"
    )
    devices: Union[int, str, list[int]] = option(
        "auto", "Lightning devices: a count, -1 (all), 'auto', or a list of device indices"
    )
    num_nodes: int = option(
        1, "machines (Lightning num_nodes); data.batch_size is the global batch over all"
    )
    strategy: str = option("auto", "Lightning strategy (e.g. ddp, ddp_spawn)")
    precision: str = choice(
        "32-true",
        "32-true",
        "16-mixed",
        "bf16-mixed",
        "32",
        "16",
        "bf16",
        help="Lightning precision",
    )
    deterministic: Optional[bool] = option(
        None,
        "Lightning deterministic (GPU determinism; CPU runs are "
        "deterministic anyway); null = Lightning's default",
    )
    sync_batchnorm: bool = option(
        True,
        "with several GPU processes, batch norm over the global batch, so the "
        "result follows the single-process run (torch offers it on GPU only)",
    )
    gradient_clip_val: Optional[float] = option(
        None,
        "clip gradients to this norm (training stages)",
        check=Range(low=0, open_low=True, wording="must be > 0 (or null)"),
    )
    accumulate_grad_batches: int = option(
        1, "optimizer step every this many batches (training stages)"
    )
    max_time: Optional[str] = option(
        None, "stop a training stage after DD:HH:MM:SS (it then counts as done)"
    )
    log_every_n_steps: int = option(10, "logging interval")
    limit_train_batches: Optional[float] = option(
        None, "Lightning limit (int batches or float fraction)"
    )
    limit_val_batches: Optional[float] = option(
        None, "Lightning limit (int batches or float fraction)"
    )
