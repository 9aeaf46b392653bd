"""Precision-recall curves, F1 against confidence, and the confusion matrix, as arrays and as PNG plots.

Labels follow fastdet's detection contract: object classes are the contiguous labels ``1..K`` and label 0 is the
background. PR curves come from the COCO evaluator's accumulated precision (COCO matching),
:func:`f1_confidence_from_evaluation` reads F1 curves from the native evaluator's per-detection outcomes (COCO
matching, no second pass), and :func:`confusion_matrix_from_evaluation` has the native evaluator match
class-agnostically (pycocotools' ``useCats=0`` rules: greedy by score, crowd regions ignored). For the pycocotools
backend, :func:`f1_confidence_curves` and :func:`confusion_matrix` match detections to ground truth here, vectorised
over all images of a chunk with :func:`fastdet.ops.box_iou`:

* every (detection, ground truth) pair in the same image with IoU >= ``iou_threshold`` is a candidate (for F1 the
  classes must also agree; the confusion matrix matches class-agnostically so that confusions between classes show);
* candidates are taken in order of decreasing IoU, keeping each detection's best ground truth and then each ground
  truth's best remaining detection. This is the usual confusion-matrix matching (as in the YOLO family); it can
  differ from COCO's score-ordered greedy matching when several detections overlap one object.

Plots use matplotlib's Agg canvas directly (no pyplot), so they work without a display and leave global state alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastdet.ops import box_iou

__all__ = [
    "F1Curves",
    "PrecisionRecallCurves",
    "confusion_matrix",
    "confusion_matrix_from_evaluation",
    "f1_confidence_curves",
    "f1_confidence_from_evaluation",
    "match_detections",
    "plot_confusion_matrix",
    "plot_f1_confidence",
    "plot_precision_recall",
    "precision_recall_curves",
    "targets_from_coco",
]

# Upper bound on detections x ground truths x images per IoU launch, so memory stays bounded on large datasets.
_PAIRS_PER_CHUNK = 1 << 22


def _boxes_labels(entry, position: int, name: str, with_scores: bool):
    if not isinstance(entry, Mapping):
        raise TypeError(f"{name}[{position}] must be a dict, got {type(entry).__name__}")
    keys = ("boxes", "labels", "scores") if with_scores else ("boxes", "labels")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ValueError(f"{name}[{position}] lacks the key(s) {missing}")
    boxes = torch.as_tensor(entry["boxes"], dtype=torch.float32).detach().cpu().reshape(-1, 4)
    labels = torch.as_tensor(entry["labels"]).detach().cpu().reshape(-1).long()
    scores = None
    if with_scores:
        scores = torch.as_tensor(entry["scores"], dtype=torch.float32).detach().cpu().reshape(-1)
    if labels.shape[0] != boxes.shape[0] or (scores is not None and scores.shape[0] != boxes.shape[0]):
        raise ValueError(f"{name}[{position}]: boxes, labels (and scores) must have the same length")
    return boxes, labels, scores


def _flatten(detections, targets, num_classes: int):
    """Concatenate the per-image lists into flat tensors with an image index per box."""
    if not isinstance(detections, Sequence) or not isinstance(targets, Sequence):
        raise TypeError("detections and targets must be lists of per-image dicts")
    if len(detections) != len(targets):
        raise ValueError(
            f"detections and targets must describe the same images in the same order; got {len(detections)} and "
            f"{len(targets)} entries"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    det = [_boxes_labels(d, i, "detections", True) for i, d in enumerate(detections)]
    gt = [_boxes_labels(t, i, "targets", False) for i, t in enumerate(targets)]
    det_counts = torch.tensor([d[0].shape[0] for d in det], dtype=torch.long)
    gt_counts = torch.tensor([g[0].shape[0] for g in gt], dtype=torch.long)
    flat = {
        "det_boxes": torch.cat([d[0] for d in det]) if det else torch.zeros(0, 4),
        "det_labels": torch.cat([d[1] for d in det]) if det else torch.zeros(0, dtype=torch.long),
        "det_scores": torch.cat([d[2] for d in det]) if det else torch.zeros(0),
        "gt_boxes": torch.cat([g[0] for g in gt]) if gt else torch.zeros(0, 4),
        "gt_labels": torch.cat([g[1] for g in gt]) if gt else torch.zeros(0, dtype=torch.long),
        "det_counts": det_counts,
        "gt_counts": gt_counts,
    }
    for key in ("det_labels", "gt_labels"):
        labels = flat[key]
        if labels.numel() and (labels.min() < 1 or labels.max() > num_classes):
            raise ValueError(
                f"{'detection' if key == 'det_labels' else 'target'} labels must lie in 1..num_classes={num_classes} "
                f"(0 is the background), got values in [{int(labels.min())}, {int(labels.max())}]"
            )
    if not torch.isfinite(flat["det_boxes"]).all() or not torch.isfinite(flat["gt_boxes"]).all():
        raise ValueError("boxes must be finite")
    return flat


def _pad(values: torch.Tensor, counts: torch.Tensor, width: int, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter a flat ``[sum(counts), ...]`` tensor into ``[len(counts), width, ...]`` plus a validity mask."""
    images = counts.shape[0]
    image_of = torch.repeat_interleave(torch.arange(images), counts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(values.shape[0]) - starts[image_of]
    padded = values.new_full((images, width, *values.shape[1:]), fill)
    padded[image_of, slot] = values
    valid = torch.zeros(images, width, dtype=torch.bool)
    valid[image_of, slot] = True
    return padded, valid


def match_detections(
    det_boxes: torch.Tensor,
    det_labels: torch.Tensor,
    det_counts: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    gt_counts: torch.Tensor,
    iou_threshold: float,
    class_aware: bool,
) -> torch.Tensor:
    """One-to-one matching of flat detections to flat ground truths of the same image (see the module docstring).

    Args:
        det_boxes (Tensor[D, 4]), det_labels (Tensor[D]): all detections, image after image (xyxy).
        det_counts (Tensor[B]): detections per image.
        gt_boxes (Tensor[G, 4]), gt_labels (Tensor[G]), gt_counts (Tensor[B]): the same for the ground truth.
        iou_threshold: minimum IoU of a match.
        class_aware: whether a match also needs equal labels.

    Returns:
        Tensor[D] int64: for each detection the flat index of its ground truth, or -1.
    """
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    matched = torch.full((det_boxes.shape[0],), -1, dtype=torch.long)
    images = det_counts.shape[0]
    if images == 0 or det_boxes.shape[0] == 0 or gt_boxes.shape[0] == 0:
        return matched
    det_starts = torch.cumsum(det_counts, 0) - det_counts
    gt_starts = torch.cumsum(gt_counts, 0) - gt_counts
    max_det, max_gt = int(det_counts.max()), int(gt_counts.max())
    per_image = max(max_det * max_gt, 1)
    chunk = max(_PAIRS_PER_CHUNK // per_image, 1)
    for first in range(0, images, chunk):  # a loop over memory-bounded chunks of images, not over images
        last = min(first + chunk, images)
        d_lo, d_hi = int(det_starts[first]), int(det_starts[last - 1] + det_counts[last - 1])
        g_lo, g_hi = int(gt_starts[first]), int(gt_starts[last - 1] + gt_counts[last - 1])
        if d_hi == d_lo or g_hi == g_lo:
            continue
        d_counts, g_counts = det_counts[first:last], gt_counts[first:last]
        dets, det_valid = _pad(det_boxes[d_lo:d_hi], d_counts, max_det, 0.0)
        gts, gt_valid = _pad(gt_boxes[g_lo:g_hi], g_counts, max_gt, 0.0)
        iou = box_iou(dets, gts)  # [chunk, max_det, max_gt]; padded pairs are masked below (their IoU is NaN)
        candidate = det_valid[:, :, None] & gt_valid[:, None, :] & (iou >= iou_threshold)
        if class_aware:
            d_lab, _ = _pad(det_labels[d_lo:d_hi], d_counts, max_det, -1)
            g_lab, _ = _pad(gt_labels[g_lo:g_hi], g_counts, max_gt, -2)
            candidate &= d_lab[:, :, None] == g_lab[:, None, :]
        image, det_slot, gt_slot = candidate.nonzero(as_tuple=True)
        if image.numel() == 0:
            continue
        order = torch.argsort(iou[image, det_slot, gt_slot], descending=True, stable=True)
        image, det_slot, gt_slot = image[order], det_slot[order], gt_slot[order]
        det_flat = det_starts[first + image] + det_slot
        gt_flat = gt_starts[first + image] + gt_slot
        # best ground truth per detection, then best detection per ground truth (first occurrence = highest IoU)
        keep = _first_occurrences(det_flat)
        det_flat, gt_flat = det_flat[keep], gt_flat[keep]
        keep = _first_occurrences(gt_flat)
        matched[det_flat[keep]] = gt_flat[keep]
    return matched


def _first_occurrences(keys: torch.Tensor) -> torch.Tensor:
    """Sorted positions of the first occurrence of each distinct key."""
    _, first = np.unique(keys.numpy(), return_index=True)
    return torch.from_numpy(np.sort(first))


def confusion_matrix(
    detections: Sequence[Mapping],
    targets: Sequence[Mapping],
    num_classes: int,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.25,
) -> np.ndarray:
    """Detection confusion matrix with a background row and column.

    Args:
        detections: per-image dicts with ``boxes`` (xyxy), ``scores``, ``labels`` (1..K).
        targets: per-image dicts with ``boxes`` (xyxy) and ``labels`` (1..K), in the same image order.
        num_classes: K.
        iou_threshold: minimum IoU for a detection to be matched to a ground truth (class-agnostic matching).
        score_threshold: detections scoring below it are discarded first.

    Returns:
        ndarray[K + 1, K + 1] int64, ``matrix[predicted, true]``, index 0 the background: a matched pair counts at
        ``[det label, gt label]``, an unmatched detection (false positive) at ``[det label, 0]`` and a missed ground
        truth at ``[0, gt label]``. ``matrix[0, 0]`` is always 0.
    """
    flat = _flatten(detections, targets, num_classes)
    keep = flat["det_scores"] >= score_threshold
    image_of = torch.repeat_interleave(torch.arange(flat["det_counts"].shape[0]), flat["det_counts"])
    det_counts = torch.bincount(image_of[keep], minlength=flat["det_counts"].shape[0])
    det_labels = flat["det_labels"][keep]
    matched = match_detections(
        flat["det_boxes"][keep], det_labels, det_counts,
        flat["gt_boxes"], flat["gt_labels"], flat["gt_counts"], iou_threshold, class_aware=False,
    )
    size = num_classes + 1
    gt_labels = flat["gt_labels"]
    true = torch.where(matched >= 0, gt_labels[matched.clamp(min=0)], 0)
    gt_found = torch.zeros(gt_labels.shape[0], dtype=torch.bool)
    gt_found[matched[matched >= 0]] = True
    predicted = torch.cat([det_labels, torch.zeros(int((~gt_found).sum()), dtype=torch.long)])
    true = torch.cat([true, gt_labels[~gt_found]])
    counts = torch.bincount(predicted * size + true, minlength=size * size)
    return counts.reshape(size, size).numpy().astype(np.int64)


def confusion_matrix_from_evaluation(evaluation, iou_threshold: float = 0.5, score_threshold: float = 0.25,
                                     max_detections: int | None = None) -> np.ndarray:
    """Detection confusion matrix with COCO's own matching, from a native :class:`fastdet.eval.CocoEvaluation`.

    The native evaluator matches the evaluated detections scoring at least ``score_threshold`` to the ground truth
    once more, class-agnostically, exactly as pycocotools' ``COCOeval`` with ``params.useCats = 0``, ``iouThrs =
    [iou_threshold]`` and area range "all": per image, detections in descending score order (stable; only the
    ``max_detections`` best, default the evaluation's limit) each take the free ground truth of highest IoU (at least
    ``iou_threshold``) whatever its category, preferring regular ground truth to crowd regions. A crowd region can
    absorb any number of detections.

    Args:
        evaluation: a :class:`fastdet.eval.CocoEvaluation` from the native backend.
        iou_threshold: IoU of a match, in [0, 1] (any value; it need not be one of the evaluated thresholds).
        score_threshold: detections scoring below it are left out first.
        max_detections: per-image limit (default: ``evaluation.max_detections[-1]``).

    Returns:
        ndarray[K + 1, K + 1] int64, ``matrix[predicted, true]``, index 0 the background and index ``k + 1`` the
        category ``evaluation.category_ids[k]`` (names: ``evaluation.category_names``): a detection matched to a
        regular ground truth counts at ``[det label, gt label]``, an unmatched detection (false positive) at
        ``[det label, 0]`` and a regular ground truth no detection matched (missed) at ``[0, gt label]``.
        ``matrix[0, 0]`` is always 0. Crowd ground truth is never counted, and a detection matched to a crowd region
        is ignored: neither a true nor a false positive (COCO's rule). Layout as :func:`confusion_matrix`. The counts
        are those of pycocotools' own per-image outcomes (``evalImgs``), including its reading of a ground-truth id
        0 as "no match".
    """
    matches = getattr(evaluation, "matches", None)
    if matches is None:
        raise ValueError("confusion_matrix_from_evaluation needs an evaluation from the native backend "
                         "(evaluate_detections(..., backend='native')); use confusion_matrix otherwise")
    if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be a number in [0, 1], got {iou_threshold!r}")
    if isinstance(score_threshold, bool) or not isinstance(score_threshold, (int, float, np.floating, np.integer)) \
            or not np.isfinite(score_threshold):
        raise ValueError(f"score_threshold must be a finite number, got {score_threshold!r}")
    if max_detections is None:
        max_detections = int(evaluation.max_detections[-1])
    if isinstance(max_detections, bool) or not isinstance(max_detections, (int, np.integer)) or max_detections < 1:
        raise ValueError(f"max_detections must be a positive integer, got {max_detections!r}")
    return matches.confusion_matrix(float(iou_threshold), float(score_threshold), int(max_detections))


@dataclass
class F1Curves:
    """Precision, recall and F1 against the confidence threshold.

    ``confidence`` is ``ndarray[P]`` (0 to 1); ``precision``, ``recall`` and ``f1`` are ``ndarray[K, P]`` for labels
    1..K (row ``k - 1``) and ``mean_f1`` is ``ndarray[P]`` averaged over classes with ground truth. Precision is NaN
    where a class has no detection above the threshold, recall where it has no ground truth, F1 where it has neither.
    ``best_threshold`` maximises ``mean_f1``."""

    confidence: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    mean_f1: np.ndarray
    num_ground_truth: np.ndarray
    best_threshold: float
    best_f1: float


def f1_confidence_curves(
    detections: Sequence[Mapping],
    targets: Sequence[Mapping],
    num_classes: int,
    iou_threshold: float = 0.5,
    num_points: int = 101,
) -> F1Curves:
    """Per-class precision, recall and F1 at ``num_points`` confidence thresholds evenly spaced in [0, 1].

    Detections are matched once, class-aware, at ``iou_threshold``; a threshold ``c`` then keeps the detections with
    ``score >= c``. Inputs as in :func:`confusion_matrix`."""
    flat = _flatten(detections, targets, num_classes)
    matched = match_detections(
        flat["det_boxes"], flat["det_labels"], flat["det_counts"],
        flat["gt_boxes"], flat["gt_labels"], flat["gt_counts"], iou_threshold, class_aware=True,
    )
    num_gt = np.bincount(flat["gt_labels"].numpy() - 1, minlength=num_classes)[:num_classes]
    return _f1_curves(flat["det_scores"].double().numpy(), flat["det_labels"].numpy() - 1,
                      (matched >= 0).numpy(), None, num_gt, num_classes, num_points)


def _f1_curves(scores, rows, is_tp, counted, num_gt, num_classes: int, num_points: int) -> F1Curves:
    """F1Curves from each detection's score, class row (0..K-1) and outcome; ``counted`` (None: all) leaves out
    detections that are neither true nor false positives (COCO's ignored ones)."""
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an integer >= 2, got {num_points!r}")
    confidence = np.linspace(0.0, 1.0, num_points)
    # bin j holds the detections with confidence[j] <= score < confidence[j + 1]; counting from the top bin down
    # gives the detections at or above each threshold, for all classes at once
    bins = np.searchsorted(confidence, scores, side="right") - 1
    inside = bins >= 0 if counted is None else (bins >= 0) & counted
    detected = np.zeros((num_classes, num_points), dtype=np.int64)
    true_pos = np.zeros((num_classes, num_points), dtype=np.int64)
    np.add.at(detected, (rows[inside], bins[inside]), 1)
    np.add.at(true_pos, (rows[inside & is_tp], bins[inside & is_tp]), 1)
    detected = np.cumsum(detected[:, ::-1], axis=1)[:, ::-1]
    true_pos = np.cumsum(true_pos[:, ::-1], axis=1)[:, ::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(detected > 0, true_pos / detected, np.nan)
        recall = np.where(num_gt[:, None] > 0, true_pos / num_gt[:, None], np.nan)
        # F1 = 2TP / (2TP + FP + FN): defined whenever there is a detection or a ground truth
        denominator = detected + num_gt[:, None]  # (TP + FP) + (TP + FN)
        f1 = np.where(denominator > 0, 2 * true_pos / denominator, np.nan)
    with_gt = num_gt > 0
    mean_f1 = f1[with_gt].mean(axis=0) if with_gt.any() else np.full(num_points, np.nan)
    best = int(np.nanargmax(mean_f1)) if np.isfinite(mean_f1).any() else 0
    return F1Curves(confidence, precision, recall, f1, mean_f1, num_gt, float(confidence[best]),
                    float(mean_f1[best]))


def f1_confidence_from_evaluation(evaluation, iou_threshold: float = 0.5, num_points: int = 101) -> F1Curves:
    """Per-class precision, recall and F1 against confidence with COCO's own matching, read from a native
    :class:`fastdet.eval.CocoEvaluation` (its ``matches``: no second matching pass). Rows follow the evaluation's
    categories (``evaluation.category_names``); crowd ground truth and detections matched to it are left out, as
    COCO does, and only each image's ``max_detections`` best detections count."""
    matches = getattr(evaluation, "matches", None)
    if matches is None:
        raise ValueError("f1_confidence_from_evaluation needs an evaluation from the native backend "
                         "(evaluate_detections(..., backend='native'))")
    thresholds = np.asarray(evaluation.iou_thresholds)
    index = np.flatnonzero(np.isclose(thresholds, iou_threshold))
    if index.size == 0:
        raise ValueError(f"iou_threshold must be one of the evaluated thresholds {thresholds.tolist()}, "
                         f"got {iou_threshold}")
    t = int(index[0])
    return _f1_curves(matches.scores, matches.category_index, matches.true_positive[t], matches.counted[t],
                      matches.num_ground_truth, len(evaluation.category_ids), num_points)


@dataclass
class PrecisionRecallCurves:
    """Interpolated precision at COCO's 101 recall points, per class and averaged.

    ``recall`` is ``ndarray[R]``; ``precision`` ``ndarray[K, R]`` (NaN for a class without ground truth);
    ``mean_precision`` ``ndarray[R]``; ``average_precision`` ``ndarray[K]`` (the mean of each row: AP at
    ``iou_threshold``); ``class_names`` the K names."""

    recall: np.ndarray
    precision: np.ndarray
    mean_precision: np.ndarray
    average_precision: np.ndarray
    class_names: list[str]
    iou_threshold: float


def precision_recall_curves(evaluation, iou_threshold: float = 0.5) -> PrecisionRecallCurves:
    """PR curves from a :class:`fastdet.eval.CocoEvaluation` at one of its IoU thresholds (area "all", the largest
    max-detections limit)."""
    thresholds = np.asarray(evaluation.iou_thresholds)
    index = np.flatnonzero(np.isclose(thresholds, iou_threshold))
    if index.size == 0:
        raise ValueError(f"iou_threshold must be one of the evaluated thresholds {thresholds.tolist()}, "
                         f"got {iou_threshold}")
    precision = np.asarray(evaluation.precision)[index[0], :, :, 0, -1].T.astype(np.float64)  # [K, R]
    precision[precision < 0] = np.nan
    defined = np.isfinite(precision).all(axis=1)
    mean_precision = precision[defined].mean(axis=0) if defined.any() else np.full(precision.shape[1], np.nan)
    return PrecisionRecallCurves(
        recall=np.asarray(evaluation.recall_thresholds, dtype=np.float64),
        precision=precision,
        mean_precision=mean_precision,
        average_precision=precision.mean(axis=1),
        class_names=list(evaluation.category_names),
        iou_threshold=float(thresholds[index[0]]),
    )


def targets_from_coco(ground_truth, image_ids: Sequence[int], label_to_category_id: Mapping[int, int] | None = None):
    """Per-image targets (``boxes`` xyxy float32, ``labels``) in model label space for ``image_ids``, from COCO ground
    truth (dict, path or COCO object), for :func:`confusion_matrix` and :func:`f1_confidence_curves`. Crowd regions
    are left out. ``label_to_category_id`` is inverted to map category ids back to labels (``None``: labels are the
    category ids)."""
    from fastdet.eval.coco import load_ground_truth

    coco = load_ground_truth(ground_truth)
    annotations = [ann for ann in coco.dataset["annotations"] if not ann.get("iscrowd", 0)]
    ann_images = np.asarray([ann["image_id"] for ann in annotations], dtype=np.int64)
    ann_boxes = np.asarray([ann["bbox"] for ann in annotations], dtype=np.float32).reshape(-1, 4)
    ann_categories = np.asarray([ann["category_id"] for ann in annotations], dtype=np.int64)
    if label_to_category_id is None:
        ann_labels = ann_categories
    else:
        to_label = {int(category): int(label) for label, category in label_to_category_id.items()}
        unmapped = set(ann_categories.tolist()) - set(to_label)
        if unmapped:
            raise ValueError(f"ground-truth category ids {sorted(unmapped)[:10]} are not in label_to_category_id")
        ann_labels = np.asarray([to_label[c] for c in ann_categories.tolist()], dtype=np.int64)
    ann_boxes[:, 2:] += ann_boxes[:, :2]  # xywh -> xyxy
    order = np.argsort(ann_images, kind="stable")
    ann_images, ann_boxes, ann_labels = ann_images[order], ann_boxes[order], ann_labels[order]
    wanted = np.asarray([int(i) for i in image_ids], dtype=np.int64)
    starts = np.searchsorted(ann_images, wanted, side="left")
    ends = np.searchsorted(ann_images, wanted, side="right")
    return [
        {"boxes": torch.from_numpy(ann_boxes[s:e].copy()), "labels": torch.from_numpy(ann_labels[s:e].copy())}
        for s, e in zip(starts.tolist(), ends.tolist())
    ]


def _canvas(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path) -> str:
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def _class_label(names: Sequence[str] | None, k: int) -> str:
    return str(names[k]) if names is not None and k < len(names) else str(k + 1)


def plot_precision_recall(curves: PrecisionRecallCurves, path, max_legend: int = 20) -> str:
    """Write the per-class and mean PR curves as a PNG at ``path``; returns the path."""
    figure = _canvas(7, 6)
    axes = figure.add_subplot()
    show_legend = curves.precision.shape[0] <= max_legend
    for k in range(curves.precision.shape[0]):  # one line per class: plotting, not a numeric hot path
        if np.isfinite(curves.precision[k]).all():
            axes.plot(curves.recall, curves.precision[k], linewidth=1, alpha=0.7,
                      label=f"{curves.class_names[k]} {curves.average_precision[k]:.3f}" if show_legend else None)
    mean_ap = np.nanmean(curves.average_precision) if np.isfinite(curves.average_precision).any() else float("nan")
    axes.plot(curves.recall, curves.mean_precision, color="black", linewidth=2.5,
              label=f"all classes {mean_ap:.3f} AP@{curves.iou_threshold:.2f}")
    axes.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.02),
             title=f"Precision-recall (IoU {curves.iou_threshold:.2f})")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=7)
    return _save(figure, path)


def plot_f1_confidence(curves: F1Curves, path, class_names: Sequence[str] | None = None, max_legend: int = 20) -> str:
    """Write per-class and mean F1 against confidence as a PNG at ``path``; returns the path."""
    figure = _canvas(7, 6)
    axes = figure.add_subplot()
    show_legend = curves.f1.shape[0] <= max_legend
    for k in range(curves.f1.shape[0]):
        if curves.num_ground_truth[k] > 0:
            axes.plot(curves.confidence, curves.f1[k], linewidth=1, alpha=0.7,
                      label=_class_label(class_names, k) if show_legend else None)
    axes.plot(curves.confidence, curves.mean_f1, color="black", linewidth=2.5,
              label=f"all classes {curves.best_f1:.2f} at {curves.best_threshold:.2f}")
    axes.set(xlabel="Confidence", ylabel="F1", xlim=(0, 1), ylim=(0, 1.02), title="F1 against confidence")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=7)
    return _save(figure, path)


def plot_confusion_matrix(matrix: np.ndarray, path, class_names: Sequence[str] | None = None,
                          normalize: bool = True) -> str:
    """Write a confusion matrix from :func:`confusion_matrix` as a PNG at ``path``; returns the path. With
    ``normalize`` each true-class column is divided by its total, so a cell reads as the fraction of that class's
    objects predicted as the row's class."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(f"matrix must be square [K + 1, K + 1] with K >= 1, got shape {matrix.shape}")
    size = matrix.shape[0]
    if class_names is not None and len(class_names) != size - 1:
        raise ValueError(f"class_names must have {size - 1} names (one per class, no background), "
                         f"got {len(class_names)}")
    names = ["background"] + [_class_label(class_names, k) for k in range(size - 1)]
    shown = matrix
    if normalize:
        totals = matrix.sum(axis=0, keepdims=True)
        shown = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    side = min(max(4.0, 0.45 * size + 2), 24.0)
    figure = _canvas(side + 1, side)
    axes = figure.add_subplot()
    image = axes.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(shown.max(), 1))
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    if size <= 30:
        axes.set_xticks(range(size), names, rotation=90, fontsize=7)
        axes.set_yticks(range(size), names, fontsize=7)
        rows, cols = np.nonzero(shown)
        for r, c in zip(rows.tolist(), cols.tolist()):
            text = f"{shown[r, c]:.2f}" if normalize else f"{int(shown[r, c])}"
            axes.text(c, r, text, ha="center", va="center", fontsize=6,
                      color="white" if shown[r, c] > 0.5 * (shown.max() or 1) else "black")
    title = "Confusion matrix" + (" (column-normalised)" if normalize else "")
    axes.set(xlabel="True", ylabel="Predicted", title=title)
    return _save(figure, path)
