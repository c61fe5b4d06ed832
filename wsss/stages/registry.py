"""The pipeline's stages, in the order `wsss run` runs them, each described once: its name and
folder, what its config hash reads and chains, the splits it reads, the figure the console
prints, its run function and its `wsss` subcommand. The pipeline, the CLI, the report and the
stage bookkeeping read this list; adding a stage is its module plus one entry here.

This module imports neither torch nor the stages: `wsss --help` reads it to list the
subcommands, and a stage's module is imported when the stage first runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

if TYPE_CHECKING:
    from wsss.config import Config

StageFunction = Callable[["Config"], dict[str, Any]]

# what changes a trained network; not the devices or the strategy (the global batch is fixed)
TRAINING = (
    "run.seed",
    "trainer.precision",
    "trainer.deterministic",
    "trainer.gradient_clip_val",
    "trainer.accumulate_grad_batches",
)
# data keys no stage's result depends on: how batches load, and the split only evaluation reads
DATA_NOT_READ = ("data.num_workers", "data.test_split")
# test-time augmentation is evaluation's choice, not part of the trained segmenter
TEST_TIME = ("segmenter.eval_scales", "segmenter.eval_flip", "segmenter.eval_crf")
# the context-decoupling keys: read by its round only, never by the first classifier
CONTEXT_DECOUPLING = (
    "classifier.context_decoupling",
    "classifier.paste_probability",
    "classifier.paste_min_scale",
)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    Its config hash (``config_hash`` in its ``stage.json``) covers the config ``groups`` it reads,
    less the ``unread`` keys, and the ``inputs`` it chains, in order: a stage's name stands for
    that stage's hash (a change upstream redoes this stage), a dotted ``group.key`` for the key's
    value. ``inputs`` is a function of the config where the config decides what the stage reads.
    """

    name: str
    command: str  # the `wsss` subcommand that runs this stage alone
    help: str  # that subcommand's help
    run: StageFunction
    groups: tuple[str, ...] = ()
    unread: tuple[str, ...] = ()
    inputs: Union[tuple[str, ...], Callable[[Config], tuple[str, ...]]] = ()
    splits: tuple[str, ...] = ()  # the data splits it reads, by role: train, val, test
    key_figure: tuple[Optional[str], Optional[str]] = (None, None)  # (record group or None, key)
    optional: bool = (
        False  # runs only when the config asks for it (in brackets in `wsss run --help`)
    )
    folder: str = ""  # its folder in the run directory; empty: the stage's name

    def __post_init__(self) -> None:
        if not self.folder:
            object.__setattr__(self, "folder", self.name)

    def inputs_for(self, cfg: Config) -> tuple[str, ...]:
        return self.inputs(cfg) if callable(self.inputs) else self.inputs


def _imported(path: str) -> StageFunction:
    """The stage function at ``module:name``, imported at its first call: the stage modules load
    torch and Lightning, which the registry's readers (`wsss --help`) do not need."""
    module, _, name = path.partition(":")

    def run(cfg: Config) -> dict[str, Any]:
        return getattr(importlib.import_module(module), name)(cfg)

    run.__name__ = run.__qualname__ = name
    return run


def training_masks_stage(cfg: Config) -> Optional[str]:
    """The stage whose masks the segmenter trains on; None when ``segmenter.masks`` names the
    ground truth or a folder of masks."""
    if cfg.segmenter.masks != "pseudo":
        return None
    if cfg.classifier.context_decoupling:  # the masks of the round-2 classifier
        return "decoupled_pseudo_masks"
    return "affinity" if cfg.pseudo.refine == "affinity" else "pseudo_masks"


def _segmenter_inputs(cfg: Config) -> tuple[str, ...]:
    return (training_masks_stage(cfg) or "segmenter.masks", *TRAINING)


# Self-training rounds. Round 1 is the segmenter stage; each later round r is a stage of its own,
# ``segmenter_round<r>``, made from the one registry entry ROUNDS by ``expand``: it writes the
# training split's masks from round r-1's segmenter and trains a fresh segmenter on them.
ROUNDS = "segmenter_rounds"
ROUND_PREFIX = "segmenter_round"
# what a round's masks read besides the previous segmenter: its test-time augmentation and the
# pseudo-mask stage's refinement and ignore band
ROUND_MASKS = (
    "segmenter.eval_scales",
    "segmenter.eval_flip",
    "pseudo.refine",
    "pseudo.par_iterations",
    "pseudo.ignore_band",
)


def round_name(index: int) -> str:
    """The stage name of self-training round ``index`` (round 1 is the segmenter stage)."""
    return "segmenter" if index == 1 else f"{ROUND_PREFIX}{index}"


def round_index(name: str) -> Optional[int]:
    """The round a stage name stands for (1 for the segmenter), or None."""
    if name == "segmenter":
        return 1
    digits = name[len(ROUND_PREFIX) :] if name.startswith(ROUND_PREFIX) else ""
    return int(digits) if digits.isdigit() and int(digits) > 1 else None


def round_stage(index: int) -> Stage:
    """Round ``index`` > 1 as a stage: the ROUNDS entry with its own name, folder and chain."""
    template = stage_named(ROUNDS)
    return replace(
        template,
        name=round_name(index),
        folder=round_name(index),
        inputs=(round_name(index - 1), *ROUND_MASKS, *TRAINING),
        run=_round_runner(index),
    )


def _round_runner(index: int) -> StageFunction:
    """Runs round ``index`` alone (``wsss.stages.rounds.train_round``), imported at its call."""

    def run(cfg: Config) -> dict[str, Any]:
        return importlib.import_module("wsss.stages.rounds").train_round(cfg, index)

    run.__name__ = run.__qualname__ = f"train_round_{index}"
    return run


def final_segmenter(cfg: Config) -> str:
    """The stage whose segmenter evaluation scores: the last self-training round."""
    return round_name(cfg.segmenter.rounds)


def expand(cfg: Config, stages: Optional[Sequence[Stage]] = None) -> tuple[Stage, ...]:
    """The stages a config runs, in order: the ROUNDS entry becomes one stage per round after
    the first (none with ``segmenter.rounds=1``)."""
    out: list[Stage] = []
    for stage in REGISTRY if stages is None else stages:
        if stage.name == ROUNDS:
            out += [round_stage(r) for r in range(2, cfg.segmenter.rounds + 1)]
        else:
            out.append(stage)
    return tuple(out)


def _evaluation_inputs(cfg: Config) -> tuple[str, ...]:
    return (final_segmenter(cfg), *TEST_TIME, "data.val_split", "data.test_split")


REGISTRY: tuple[Stage, ...] = (
    Stage(
        "classifier",
        command="train-classifier",
        help="train the multi-label classifier on image-level labels",
        run=_imported("wsss.stages.classifier:train_classifier"),
        groups=("data", "classifier"),
        unread=(*DATA_NOT_READ, *CONTEXT_DECOUPLING),
        inputs=TRAINING,
        splits=("train", "val"),
        key_figure=("metrics", "val/mAP"),
    ),
    Stage(
        "pseudo_masks",
        command="make-pseudo-masks",
        help="write Relevance-CAM pseudo-masks for the training split",
        run=_imported("wsss.stages.pseudo_masks:make_pseudo_masks"),
        # how many maps a batch holds and how many panels are drawn change no mask
        groups=("cam", "pseudo"),
        unread=("cam.batch_size", "pseudo.num_panels"),
        inputs=("classifier",),
        splits=("train",),
        key_figure=(None, "pseudo_miou"),
    ),
    Stage(
        "decoupled_classifier",
        command="train-decoupled-classifier",
        help="with classifier.context_decoupling: a second classifier on copy-paste images "
        "cut with the pseudo-masks",
        run=_imported("wsss.stages.decoupled:train_decoupled_classifier"),
        groups=("data", "classifier"),
        unread=DATA_NOT_READ,
        inputs=("pseudo_masks", *TRAINING),
        splits=("train", "val"),
        key_figure=("metrics", "val/mAP"),
        optional=True,
    ),
    Stage(
        "decoupled_pseudo_masks",
        command="make-decoupled-pseudo-masks",
        help="with classifier.context_decoupling: the pseudo-masks again, from the second "
        "classifier",
        run=_imported("wsss.stages.decoupled:make_decoupled_pseudo_masks"),
        groups=("cam", "pseudo"),
        unread=("cam.batch_size", "pseudo.num_panels"),
        inputs=("decoupled_classifier",),
        splits=("train",),
        key_figure=(None, "pseudo_miou"),
        optional=True,
    ),
    Stage(
        "affinity",
        command="train-affinity",
        help="with pseudo.refine=affinity: learn inter-pixel affinities, write random-walk refined masks",
        run=_imported("wsss.stages.affinity:train_affinity"),
        groups=("affinity",),
        inputs=("pseudo_masks", *TRAINING),
        splits=("train",),
        key_figure=(None, "refined_miou"),
        optional=True,
    ),
    Stage(
        "segmenter",
        command="train-segmenter",
        help="train the segmentation network on the masks segmenter.masks names",
        run=_imported("wsss.stages.segmenter:train_segmenter"),
        groups=("data", "segmenter"),
        unread=(*DATA_NOT_READ, *TEST_TIME, "segmenter.rounds"),
        inputs=_segmenter_inputs,
        splits=("train", "val"),
        key_figure=("metrics", "val/miou"),
    ),
    Stage(
        ROUNDS,
        command="train-segmenter-rounds",
        help="with segmenter.rounds > 1: self-training rounds, each writing the training split's "
        "masks from the previous segmenter and training a fresh one on them",
        run=_imported("wsss.stages.rounds:train_rounds"),
        groups=("data", "segmenter"),
        # a round does not depend on how many rounds follow it
        unread=(*DATA_NOT_READ, *TEST_TIME, "segmenter.rounds"),
        splits=("train", "val"),
        key_figure=("metrics", "val/miou"),
        optional=True,
    ),
    Stage(
        "evaluation",
        command="evaluate",
        help="segmenter mIoU on the val split; predictions as palette PNGs",
        run=_imported("wsss.stages.evaluation:evaluate"),
        inputs=_evaluation_inputs,
        splits=("val", "test"),
        key_figure=(None, "miou"),
    ),
)

STAGES = tuple(stage.name for stage in REGISTRY)


def stage_named(name: str) -> Stage:
    """The registered stage called ``name``."""
    for stage in REGISTRY:
        if stage.name == name:
            return stage
    if (index := round_index(name)) is not None and index > 1:
        return round_stage(index)
    raise KeyError(
        f"no stage {name!r}; the stages are {', '.join(stage.name for stage in REGISTRY)}"
    )
