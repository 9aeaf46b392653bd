"""Evaluation: COCO metrics (fastdet's native evaluator, pycocotools as the alternative backend), PR/F1 curves,
confusion matrix, and model speed."""

from fastdet.eval.coco import (
    STAT_NAMES,
    CocoEvaluation,
    collect_detections,
    evaluate_detections,
    evaluate_model,
    load_ground_truth,
)
from fastdet.eval.cocoeval import COCOeval
from fastdet.eval.curves import (
    F1Curves,
    PrecisionRecallCurves,
    confusion_matrix,
    confusion_matrix_from_evaluation,
    f1_confidence_curves,
    f1_confidence_from_evaluation,
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
    "COCOeval",
    "STAT_NAMES",
    "CocoEvaluation",
    "F1Curves",
    "PrecisionRecallCurves",
    "collect_detections",
    "confusion_matrix",
    "confusion_matrix_from_evaluation",
    "count_flops",
    "evaluate_detections",
    "evaluate_model",
    "evaluate_segmentation",
    "f1_confidence_curves",
    "f1_confidence_from_evaluation",
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
