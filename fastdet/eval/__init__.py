"""Evaluation: COCO metrics through pycocotools, PR/F1 curves, confusion matrix, and model speed."""

from fastdet.eval.coco import (
    STAT_NAMES,
    CocoEvaluation,
    collect_detections,
    evaluate_detections,
    evaluate_model,
    load_ground_truth,
)
from fastdet.eval.curves import (
    F1Curves,
    PrecisionRecallCurves,
    confusion_matrix,
    f1_confidence_curves,
    match_detections,
    plot_confusion_matrix,
    plot_f1_confidence,
    plot_precision_recall,
    precision_recall_curves,
    targets_from_coco,
)
from fastdet.eval.segm import evaluate_segmentation, masks_to_rles
from fastdet.eval.speed import count_flops, measure_fps

__all__ = [
    "STAT_NAMES",
    "CocoEvaluation",
    "F1Curves",
    "PrecisionRecallCurves",
    "collect_detections",
    "confusion_matrix",
    "count_flops",
    "evaluate_detections",
    "evaluate_model",
    "evaluate_segmentation",
    "f1_confidence_curves",
    "load_ground_truth",
    "masks_to_rles",
    "match_detections",
    "measure_fps",
    "plot_confusion_matrix",
    "plot_f1_confidence",
    "plot_precision_recall",
    "precision_recall_curves",
    "targets_from_coco",
]
