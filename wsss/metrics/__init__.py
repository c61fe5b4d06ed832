"""Metrics: segmentation scores (mIoU, Dice, accuracies) and the classifier's mAP / F1 in
``segmentation.py``; CAM faithfulness (Average Drop / Increase, insertion / deletion AUC,
Libra-CAM's five metrics) in ``faithfulness.py``. Every name is importable from ``wsss.metrics``."""

from wsss.label_maps import IGNORE_INDEX
from wsss.metrics.faithfulness import (
    LIBRA_METRICS,
    ForwardCounter,
    Normalize,
    average_drop_increase,
    class_scores,
    insertion_deletion_auc,
    libra_metrics,
    libra_scores,
    libra_summary,
)
from wsss.metrics.segmentation import (
    MultiLabelScores,
    SegmentationScores,
    miou_reference,
    scores_from_confusion,
)

__all__ = [
    "IGNORE_INDEX",
    "LIBRA_METRICS",
    "ForwardCounter",
    "MultiLabelScores",
    "Normalize",
    "SegmentationScores",
    "average_drop_increase",
    "class_scores",
    "insertion_deletion_auc",
    "libra_metrics",
    "libra_scores",
    "libra_summary",
    "miou_reference",
    "scores_from_confusion",
]
