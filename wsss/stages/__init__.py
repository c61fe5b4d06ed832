"""The pipeline's stages, one module each, in the order they run:

- ``classifier``: the multi-label classifier on image-level labels;
- ``pseudo_masks``: calibrated Relevance-CAM pseudo-masks for the training split (refined in the
  image by ``par`` or ``crf`` when ``pseudo.refine`` asks);
- ``affinity``: with ``pseudo.refine=affinity``, learned affinities and the random walk;
- ``segmenter``: the segmentation network on those masks;
- ``evaluation``: the segmenter on the val split;

plus ``base`` (stage folders, hashes, resume, the Trainer factory) and ``report``.
"""

from wsss.stages.base import (STAGES, StageError, check_stage_folders, preflight_data, read_stage, save_config,
                              stage_dir)
from wsss.stages.affinity import train_affinity
from wsss.stages.classifier import load_classifier, train_classifier
from wsss.stages.evaluation import evaluate
from wsss.stages.pseudo_masks import make_pseudo_masks
from wsss.stages.report import build_report, write_report
from wsss.stages.segmenter import load_segmenter, train_segmenter

__all__ = ["STAGES", "StageError", "build_report", "check_stage_folders", "preflight_data", "evaluate", "load_classifier", "load_segmenter",
           "make_pseudo_masks", "read_stage", "save_config", "stage_dir", "train_affinity", "train_classifier",
           "train_segmenter", "write_report"]
