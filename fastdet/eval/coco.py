"""COCO box metrics, computed by fastdet's native evaluator (default) or by pycocotools, with known pitfalls handled.

The matching and the 101-point interpolated precision are pycocotools' protocol, unchanged: ``backend="native"``
computes them with :class:`fastdet.eval.COCOeval` (native ops, identical arrays, far faster), ``backend="pycocotools"``
with pycocotools itself. What this module adds is everything around it that commonly goes wrong:

* detections are converted from xyxy model output to the xywh result format, with model labels mapped to the
  dataset's category ids (``label_to_category_id``); the native backend takes them as arrays, with no per-detection
  dicts and no ``COCO.loadRes`` round trip;
* ``COCOeval.summarize`` looks up ``maxDets == 100`` by value for the first statistic, so a custom maximum gives -1
  (or silently mixes limits); the 12 statistics are computed here directly from the accumulated arrays instead;
* ground truth lacking ``area``, ``iscrowd``, ``id`` or ``info`` is completed (pycocotools raises KeyError);
* ``COCO.loadRes([])`` raises IndexError; an empty detection list here is a valid input that scores AP 0;
* images without annotations are fine (they contribute false positives only);
* pycocotools writes an ``ignore`` flag into every ground-truth annotation; this module evaluates against shallow
  copies, so a caller's dict or COCO object is never modified.

A statistic that is undefined (no ground truth in that area range) is NaN, where pycocotools reports -1.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "CocoEvaluation",
    "STAT_NAMES",
    "collect_detections",
    "evaluate_detections",
    "evaluate_model",
    "load_ground_truth",
]

# Names of the 12 standard statistics, in pycocotools' order. "AR100" is renamed to "AR<max_detections>" when a
# custom maximum is used, so a key never claims a limit that was not applied.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


@dataclass
class CocoEvaluation:
    """Result of a COCO box evaluation.

    Attributes:
        stats: the 12 standard statistics by name (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR<max>, ARs, ARm,
            ARl), as floats in [0, 1]; NaN where undefined (no ground truth in that range).
        per_class_ap: category name -> AP@[.50:.95] (area all, max detections); NaN for a category without ground
            truth.
        precision: pycocotools' accumulated precision, ``ndarray[T, R, K, A, M]`` (IoU thresholds x 101 recall points
            x categories x area ranges x max-detection limits), -1 where undefined.
        recall: pycocotools' accumulated recall, ``ndarray[T, K, A, M]``.
        scores: pycocotools' accumulated scores, ``ndarray[T, R, K, A, M]`` (confidence at each recall point).
        category_ids: dataset category ids, in the order of the K axis.
        category_names: their names, same order.
        iou_thresholds: ``ndarray[T]``; recall_thresholds: ``ndarray[R]``; max_detections: the M limits.
        summary: the statistics as text, in pycocotools' layout.
        matches: (native backend) each detection's COCO outcome per IoU threshold, from which
            :func:`fastdet.eval.f1_confidence_from_evaluation` draws F1 curves, with the annotations
            :func:`fastdet.eval.confusion_matrix_from_evaluation` matches again class-agnostically; None with the
            pycocotools backend.
    """

    stats: dict[str, float]
    per_class_ap: dict[str, float]
    precision: np.ndarray
    recall: np.ndarray
    scores: np.ndarray
    category_ids: list[int]
    category_names: list[str]
    iou_thresholds: np.ndarray
    recall_thresholds: np.ndarray
    max_detections: list[int]
    summary: str = field(repr=False)
    num_detections: int = 0
    # the native evaluator's per-detection outcomes (fastdet.eval.cocoeval.CocoMatches); None with pycocotools
    matches: object = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.summary


def _import_pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as error:  # pragma: no cover - pycocotools is a declared dependency
        raise ImportError("fastdet.eval needs pycocotools: pip install pycocotools") from error
    return COCO, COCOeval


def _completed_annotations(annotations: Iterable[Mapping]) -> list[dict]:
    """Shallow copies of the annotations with ``id``, ``area`` and ``iscrowd`` filled in where missing."""
    completed = []
    used_ids = {ann["id"] for ann in annotations if "id" in ann}
    next_id = max(used_ids, default=0) + 1
    for position, ann in enumerate(annotations):
        if not isinstance(ann, Mapping):
            raise TypeError(f"ground_truth['annotations'][{position}] must be a dict, got {type(ann).__name__}")
        for key in ("image_id", "category_id", "bbox"):
            if key not in ann:
                raise ValueError(f"ground_truth['annotations'][{position}] lacks the required key {key!r}")
        bbox = ann["bbox"]
        if len(bbox) != 4:
            raise ValueError(f"ground_truth['annotations'][{position}]['bbox'] must be [x, y, w, h], got {bbox!r}")
        ann = dict(ann)
        if "id" not in ann:
            ann["id"] = next_id
            next_id += 1
        if "area" not in ann:
            # COCO's own area is the segmentation area; for box-only data the box area is the natural stand-in
            # (it is what COCO.loadRes assigns to detections too).
            ann["area"] = float(bbox[2]) * float(bbox[3])
        ann.setdefault("iscrowd", 0)
        completed.append(ann)
    return completed


def load_ground_truth(ground_truth):
    """A fresh pycocotools ``COCO`` from a dataset dict, a path to a COCO JSON file, or a ``COCO`` object.

    The result holds shallow copies of the annotations, completed with ``id``/``area``/``iscrowd`` where missing and
    with an ``info`` entry, so that pycocotools can evaluate against it without touching the caller's data."""
    COCO, _ = _import_pycocotools()
    if isinstance(ground_truth, (str, os.PathLike)):
        path = os.fspath(ground_truth)
        if not os.path.isfile(path):
            raise ValueError(f"ground_truth path {path!r} does not exist")
        with open(path) as handle:
            dataset = json.load(handle)
    elif isinstance(ground_truth, COCO):
        dataset = ground_truth.dataset
    elif isinstance(ground_truth, Mapping):
        dataset = ground_truth
    else:
        raise TypeError(
            f"ground_truth must be a COCO dataset dict, a path to a COCO JSON file or a pycocotools COCO object, "
            f"got {type(ground_truth).__name__}"
        )
    for key in ("images", "categories"):
        if key not in dataset:
            raise ValueError(f"ground_truth lacks the required key {key!r}")
    completed = {
        "info": copy.deepcopy(dataset.get("info", {})),
        "licenses": copy.deepcopy(dataset.get("licenses", [])),
        "images": [dict(image) for image in dataset["images"]],
        "categories": [dict(category) for category in dataset["categories"]],
        "annotations": _completed_annotations(dataset.get("annotations", [])),
    }
    for position, image in enumerate(completed["images"]):
        if "id" not in image:
            raise ValueError(f"ground_truth['images'][{position}] lacks the required key 'id'")
    for position, category in enumerate(completed["categories"]):
        if "id" not in category:
            raise ValueError(f"ground_truth['categories'][{position}] lacks the required key 'id'")
    coco = COCO()
    coco.dataset = completed
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _as_numpy(value, name: str, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu", torch.float64 if np.issubdtype(dtype, np.floating) else torch.int64)
        return value.numpy().astype(dtype, copy=False)
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a tensor, an array or a sequence of numbers: {error}") from None


def _label_lookup(label_to_category_id: Mapping[int, int] | None):
    """Vectorised label -> category id mapping: (lookup array indexed by label, -1 where unmapped) or None."""
    if label_to_category_id is None:
        return None
    if not isinstance(label_to_category_id, Mapping):
        raise TypeError(
            f"label_to_category_id must be a mapping {{model label: category id}}, "
            f"got {type(label_to_category_id).__name__}"
        )
    if not label_to_category_id:
        raise ValueError("label_to_category_id must not be empty")
    labels = np.fromiter((int(k) for k in label_to_category_id), dtype=np.int64)
    if labels.min() < 0:
        raise ValueError(f"label_to_category_id keys must be non-negative labels, got {int(labels.min())}")
    lookup = np.full(int(labels.max()) + 1, -1, dtype=np.int64)
    lookup[labels] = np.fromiter((int(v) for v in label_to_category_id.values()), dtype=np.int64)
    return lookup


def _detections_to_results(detections: Sequence[Mapping], label_to_category_id) -> np.ndarray:
    """Flatten per-image detections into pycocotools' result rows ``[image_id, x, y, w, h, score, category_id]``."""
    if isinstance(detections, Mapping) or not isinstance(detections, Sequence):
        raise TypeError(
            "detections must be a list of dicts with 'image_id', 'boxes', 'scores' and 'labels', "
            f"got {type(detections).__name__}"
        )
    blocks = []
    for position, det in enumerate(detections):
        if not isinstance(det, Mapping):
            raise TypeError(f"detections[{position}] must be a dict, got {type(det).__name__}")
        missing = [key for key in ("image_id", "boxes", "scores", "labels") if key not in det]
        if missing:
            raise ValueError(f"detections[{position}] lacks the key(s) {missing}")
        boxes = _as_numpy(det["boxes"], f"detections[{position}]['boxes']", np.float64)
        if boxes.size % 4:
            raise ValueError(f"detections[{position}]['boxes'] must have shape [N, 4], got {boxes.shape}")
        boxes = boxes.reshape(-1, 4)
        scores = _as_numpy(det["scores"], f"detections[{position}]['scores']", np.float64).reshape(-1)
        labels = _as_numpy(det["labels"], f"detections[{position}]['labels']", np.int64).reshape(-1)
        if not (boxes.shape[0] == scores.shape[0] == labels.shape[0]):
            raise ValueError(
                f"detections[{position}] has {boxes.shape[0]} boxes, {scores.shape[0]} scores and {labels.shape[0]} "
                f"labels; they must match"
            )
        image_id = det["image_id"]
        image_id = int(image_id.item() if isinstance(image_id, torch.Tensor) else image_id)
        block = np.empty((boxes.shape[0], 7), dtype=np.float64)
        block[:, 0] = image_id
        block[:, 1:3] = boxes[:, :2]
        block[:, 3:5] = boxes[:, 2:] - boxes[:, :2]  # xyxy -> xywh
        block[:, 5] = scores
        block[:, 6] = labels
        blocks.append(block)
    rows = np.concatenate(blocks) if blocks else np.zeros((0, 7))
    if not np.isfinite(rows[:, 1:6]).all():
        raise ValueError("detections contain non-finite boxes or scores")
    lookup = _label_lookup(label_to_category_id)
    if lookup is not None and rows.shape[0]:
        labels = rows[:, 6].astype(np.int64)
        known = (labels >= 0) & (labels < lookup.shape[0])
        categories = np.where(known, lookup[np.clip(labels, 0, lookup.shape[0] - 1)], -1)
        if (categories < 0).any():
            unknown = sorted(set(labels[categories < 0].tolist()))
            raise ValueError(f"detections contain labels {unknown} that label_to_category_id does not map")
        rows[:, 6] = categories
    return rows


def _results_coco(coco_gt, rows: np.ndarray):
    """The detection-side COCO object, built as ``COCO.loadRes`` would but also for zero detections."""
    COCO, _ = _import_pycocotools()
    # COCOeval reads detections as per-box dicts, so building them is unavoidable. COCO.loadRes also attaches a
    # polygon per box; bbox evaluation never reads it, so it is left out
    annotations = [
        {"id": index + 1, "image_id": int(image_id), "category_id": int(category_id), "bbox": [x, y, w, h],
         "score": score, "area": w * h, "iscrowd": 0}
        for index, (image_id, x, y, w, h, score, category_id) in enumerate(rows.tolist())
    ]
    result = COCO()
    result.dataset = {
        "info": coco_gt.dataset.get("info", {}),
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
        "annotations": annotations,
    }
    with contextlib.redirect_stdout(io.StringIO()):
        result.createIndex()
    return result


def _max_detection_limits(max_detections: int) -> list[int]:
    if isinstance(max_detections, bool) or not isinstance(max_detections, (int, np.integer)) or max_detections < 1:
        raise ValueError(f"max_detections must be a positive integer, got {max_detections!r}")
    return sorted({limit for limit in (1, 10, int(max_detections)) if limit <= max_detections})


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else float("nan")


def _summarise(precision, recall, iou_thresholds, area_labels, limits):
    """The 12 standard statistics from the accumulated arrays, indexing max detections by position (not by value)."""
    area = {label: index for index, label in enumerate(area_labels)}
    top = len(limits) - 1

    def iou_index(threshold):
        return int(np.flatnonzero(np.isclose(iou_thresholds, threshold))[0])

    def ap(area_label="all", iou=None):
        p = precision if iou is None else precision[iou_index(iou): iou_index(iou) + 1]
        return _mean_defined(p[:, :, :, area[area_label], top])

    def ar(limit_index, area_label="all"):
        return _mean_defined(recall[:, :, area[area_label], limit_index])

    limit_index = {limit: i for i, limit in enumerate(limits)}
    stats = {
        "AP": ap(), "AP50": ap(iou=0.5), "AP75": ap(iou=0.75),
        "APs": ap("small"), "APm": ap("medium"), "APl": ap("large"),
    }
    for limit in (1, 10):
        if limit in limit_index:
            stats[f"AR{limit}"] = ar(limit_index[limit])
    stats[f"AR{limits[-1]}"] = ar(top)
    stats.update({"ARs": ar(top, "small"), "ARm": ar(top, "medium"), "ARl": ar(top, "large")})
    return stats


def _summary_text(stats: dict[str, float], iou_thresholds, limits) -> str:
    span = f"{iou_thresholds[0]:0.2f}:{iou_thresholds[-1]:0.2f}"
    top = limits[-1]
    layout = [
        ("AP", "Average Precision", "(AP)", span, "all", top),
        ("AP50", "Average Precision", "(AP)", "0.50", "all", top),
        ("AP75", "Average Precision", "(AP)", "0.75", "all", top),
        ("APs", "Average Precision", "(AP)", span, "small", top),
        ("APm", "Average Precision", "(AP)", span, "medium", top),
        ("APl", "Average Precision", "(AP)", span, "large", top),
        *[(f"AR{limit}", "Average Recall", "(AR)", span, "all", limit) for limit in limits],
        ("ARs", "Average Recall", "(AR)", span, "small", top),
        ("ARm", "Average Recall", "(AR)", span, "medium", top),
        ("ARl", "Average Recall", "(AR)", span, "large", top),
    ]
    lines = []
    for key, title, kind, iou, area, limit in layout:
        value = stats[key]
        shown = "  nan" if value != value else f"{value:0.3f}"
        lines.append(f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | maxDets={limit:>3d} ] = {shown}")
    return "\n".join(lines)


def evaluate_detections(
    ground_truth,
    detections: Sequence[Mapping],
    label_to_category_id: Mapping[int, int] | None = None,
    max_detections: int = 100,
    iou_type: str = "bbox",
    backend: str = "native",
) -> CocoEvaluation:
    """COCO box evaluation of ``detections`` against ``ground_truth``.

    Args:
        ground_truth: a COCO dataset dict (``images``, ``categories``, ``annotations`` with xywh ``bbox``), a path to
            a COCO JSON file, or a pycocotools ``COCO`` object. Not modified.
        detections: one dict per image: ``image_id`` (int or 0-d tensor, a ground-truth image id), ``boxes``
            (Tensor/ndarray ``[N, 4]``, xyxy in original image pixels), ``scores`` ``[N]`` and ``labels`` ``[N]``.
            Images without a dict are images where nothing was detected. May be empty (every AP is then 0).
        label_to_category_id: maps model labels (contiguous 1..K) to the dataset's category ids. ``None`` means the
            labels already are category ids.
        max_detections: the per-image limit for AP and the largest AR limit (COCO's default: 100). The AR limits are
            1, 10 and ``max_detections`` (those not above it).
        iou_type: only ``"bbox"`` is supported (for masks use :class:`fastdet.eval.COCOeval` with ``"segm"``).
        backend: ``"native"`` (default: fastdet's evaluator, straight from the arrays) or ``"pycocotools"`` (the
            reference implementation, through ``COCOeval``); both give the same arrays and statistics.

    Returns:
        :class:`CocoEvaluation`.
    """
    if iou_type != "bbox":
        raise ValueError(f"iou_type must be 'bbox' (the only type fastdet evaluates), got {iou_type!r}")
    if backend not in ("native", "pycocotools"):
        raise ValueError(f"backend must be 'native' or 'pycocotools', got {backend!r}")
    limits = _max_detection_limits(max_detections)
    _, COCOeval = _import_pycocotools()
    coco_gt = load_ground_truth(ground_truth)
    rows = _detections_to_results(detections, label_to_category_id)

    known_images = np.asarray(coco_gt.getImgIds(), dtype=np.int64)
    image_ids = rows[:, 0].astype(np.int64)
    stray = ~np.isin(image_ids, known_images)
    if stray.any():
        raise ValueError(
            f"detections refer to image ids not in ground_truth: {sorted(set(image_ids[stray].tolist()))[:10]}"
        )
    category_ids = sorted(coco_gt.getCatIds())
    det_categories = rows[:, 6].astype(np.int64)
    stray = ~np.isin(det_categories, np.asarray(category_ids, dtype=np.int64))
    if stray.any():
        # pycocotools would silently ignore them, which hides a wrong label mapping
        hint = "" if label_to_category_id is not None else " (pass label_to_category_id to map model labels)"
        raise ValueError(
            f"detections have category ids {sorted(set(det_categories[stray].tolist()))[:10]} that are not "
            f"ground-truth categories {category_ids[:10]}{'...' if len(category_ids) > 10 else ''}{hint}"
        )

    if backend == "native":
        from fastdet.eval.cocoeval import evaluate_result_rows

        params, precision, recall, scores, matches = evaluate_result_rows(coco_gt, rows, limits)
    else:
        matches = None
        coco_dt = _results_coco(coco_gt, rows)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.maxDets = limits
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
        params = evaluator.params
        precision, recall, scores = (evaluator.eval[key] for key in ("precision", "recall", "scores"))
    stats = _summarise(precision, recall, params.iouThrs, params.areaRngLbl, limits)

    names = [coco_gt.cats[cid].get("name", str(cid)) for cid in params.catIds]
    duplicated = {name for name in names if names.count(name) > 1}
    names = [f"{name} ({cid})" if name in duplicated else name for name, cid in zip(names, params.catIds)]
    all_area = list(params.areaRngLbl).index("all")
    per_class_precision = precision[:, :, :, all_area, -1]  # [T, R, K]
    per_class_ap = {
        name: _mean_defined(per_class_precision[:, :, k]) for k, name in enumerate(names)
    }
    return CocoEvaluation(
        stats=stats,
        per_class_ap=per_class_ap,
        precision=precision,
        recall=recall,
        scores=scores,
        category_ids=list(params.catIds),
        category_names=names,
        iou_thresholds=np.asarray(params.iouThrs),
        recall_thresholds=np.asarray(params.recThrs),
        max_detections=limits,
        summary=_summary_text(stats, params.iouThrs, limits),
        num_detections=int(rows.shape[0]),
        matches=matches,
    )


def _image_id(target, position: int) -> int:
    if not isinstance(target, Mapping) or "image_id" not in target:
        raise ValueError(f"every target must be a dict with an 'image_id' (target {position} of a batch is not)")
    image_id = target["image_id"]
    if isinstance(image_id, torch.Tensor):
        if image_id.numel() != 1:
            raise ValueError(f"target 'image_id' must hold one id, got a tensor of shape {tuple(image_id.shape)}")
        return int(image_id.item())
    return int(image_id)


def collect_detections(model, data_loader, device, amp: bool = False) -> list[dict]:
    """Run ``model`` (eval mode, no gradients) over ``data_loader`` and return per-image detection dicts on the CPU
    (``image_id``, ``boxes``, ``scores``, ``labels``), ready for :func:`evaluate_detections`.

    ``data_loader`` yields ``(images, targets)``: a list of ``[C, H, W]`` tensors (or a batched tensor) and a list of
    dicts with ``image_id``. The model follows torchvision's detection contract: ``model(images)`` returns one dict per
    image with boxes in original image coordinates; a model whose ``needs_image_ids`` is true (R-CNN, Fast R-CNN or
    SPP-Net on a proposals file) is called as ``model(images, image_ids=[...])``. ``amp`` runs the forward under
    bfloat16 autocast. The model's training flag is restored afterwards."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    detections = []
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for batch_index, batch in enumerate(data_loader):
                if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                    raise ValueError(
                        f"data_loader must yield (images, targets) pairs; batch {batch_index} is a "
                        f"{type(batch).__name__}"
                    )
                images, targets = batch
                images = [image.to(device, non_blocking=True) for image in images]
                if len(images) != len(targets):
                    raise ValueError(
                        f"batch {batch_index} has {len(images)} images but {len(targets)} targets"
                    )
                if getattr(model, "needs_image_ids", False):  # proposals looked up by image id (R-CNN family)
                    outputs = model(images, image_ids=[_image_id(t, i) for i, t in enumerate(targets)])
                else:
                    outputs = model(images)
                if len(outputs) != len(images):
                    raise ValueError(f"model returned {len(outputs)} outputs for {len(images)} images")
                for position, (target, output) in enumerate(zip(targets, outputs)):
                    detections.append({
                        "image_id": _image_id(target, position),
                        "boxes": output["boxes"].detach().float().cpu(),
                        "scores": output["scores"].detach().float().cpu(),
                        "labels": output["labels"].detach().cpu(),
                    })
                    if "masks" in output:  # a mask model: RLE for fastdet.eval.segm
                        from fastdet.eval.segm import masks_to_rles

                        detections[-1]["segmentation"] = masks_to_rles(output["masks"])
    finally:
        model.train(was_training)
    return detections


def evaluate_model(
    model,
    data_loader,
    ground_truth,
    device,
    label_to_category_id: Mapping[int, int] | None = None,
    amp: bool = False,
    max_detections: int = 100,
    backend: str = "native",
) -> CocoEvaluation:
    """Run a detector over ``data_loader`` (see :func:`collect_detections`) and evaluate it with
    :func:`evaluate_detections` (``backend`` ``"native"`` or ``"pycocotools"``) against ``ground_truth``."""
    detections = collect_detections(model, data_loader, device, amp=amp)
    return evaluate_detections(ground_truth, detections, label_to_category_id, max_detections=max_detections,
                               backend=backend)
