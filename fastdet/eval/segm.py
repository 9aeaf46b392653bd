"""COCO mask AP ("segm"), next to the box metrics of :mod:`fastdet.eval.coco`: fastdet's native evaluator by default
(pycocotools' protocol and numbers, with per-detection matches for F1 curves), or pycocotools itself.

Detections carry their masks as compressed RLE (``"segmentation"``: one ``{"size", "counts"}`` per detection), which
:func:`fastdet.eval.collect_detections` fills from a mask model's ``"masks"`` output (probabilities thresholded at
0.5, torchvision's reference-script rule). Ground-truth annotations need a ``segmentation`` (polygons or RLE); an
annotation without one is scored by its box (filled), as :mod:`fastdet.data.masks` decodes it.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fastdet.eval.coco import (
    CocoEvaluation,
    _detections_to_results,
    _import_pycocotools,
    _max_detection_limits,
    _mean_defined,
    _summarise,
    _summary_text,
    load_ground_truth,
)

__all__ = ["evaluate_segmentation", "masks_to_rles"]

MASK_THRESHOLD = 0.5


def masks_to_rles(masks: torch.Tensor, threshold: float = MASK_THRESHOLD) -> list[dict]:
    """``[N, 1, H, W]`` (or ``[N, H, W]``) mask probabilities -> one compressed COCO RLE per detection (pixels with
    probability above ``threshold``)."""
    from pycocotools import mask as mask_api

    if masks.dim() == 4:
        masks = masks[:, 0]
    binary = (masks.detach() > threshold).to(torch.uint8).cpu().numpy()
    if binary.shape[0] == 0:
        return []
    rles = mask_api.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def _ground_truth_with_masks(coco_gt):
    """Annotations lacking a segmentation get their box as a polygon (pycocotools' segm evaluation needs one)."""
    for ann in coco_gt.dataset["annotations"]:
        if not ann.get("segmentation"):
            x, y, w, h = ann["bbox"]
            ann["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]
    return coco_gt


def evaluate_segmentation(ground_truth, detections: Sequence[Mapping],
                          label_to_category_id: Mapping[int, int] | None = None,
                          max_detections: int = 100, backend: str = "native") -> CocoEvaluation:
    """COCO mask evaluation: as :func:`fastdet.eval.evaluate_detections` (same arguments, same statistics, 12 of
    them; ``backend`` ``"native"`` (default, with ``matches`` for
    :func:`fastdet.eval.f1_confidence_from_evaluation`) or ``"pycocotools"``), with each detection's
    ``"segmentation"`` RLE in place of its box."""
    if backend not in ("native", "pycocotools"):
        raise ValueError(f"backend must be 'native' or 'pycocotools', got {backend!r}")
    COCO, COCOeval = _import_pycocotools()
    if backend == "native":
        from fastdet.eval.cocoeval import COCOeval
    limits = _max_detection_limits(max_detections)
    coco_gt = _ground_truth_with_masks(load_ground_truth(ground_truth))
    for position, det in enumerate(detections):
        if "segmentation" not in det or len(det["segmentation"]) != len(det["scores"]):
            raise ValueError(f"detections[{position}] needs one 'segmentation' RLE per detection (a mask model's "
                             "output collected by fastdet.eval.collect_detections)")
    rows = _detections_to_results(detections, label_to_category_id)
    rles = [rle for det in detections for rle in det["segmentation"]]
    annotations = []
    for index, ((image_id, x, y, w, h, score, category_id), rle) in enumerate(zip(rows.tolist(), rles)):
        annotations.append({"id": index + 1, "image_id": int(image_id), "category_id": int(category_id),
                            "segmentation": rle, "score": score, "iscrowd": 0, "bbox": [x, y, w, h],
                            "area": float(_mask_area(rle))})
    result = COCO()
    result.dataset = {"info": coco_gt.dataset.get("info", {}), "images": list(coco_gt.dataset["images"]),
                      "categories": list(coco_gt.dataset["categories"]), "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        result.createIndex()
        evaluator = COCOeval(coco_gt, result, iouType="segm")
        evaluator.params.maxDets = limits
        evaluator.evaluate()
        evaluator.accumulate()
    matches = evaluator.matches() if backend == "native" else None
    params = evaluator.params
    precision, recall = evaluator.eval["precision"], evaluator.eval["recall"]
    stats = _summarise(precision, recall, params.iouThrs, params.areaRngLbl, limits)
    names = [coco_gt.cats[cid].get("name", str(cid)) for cid in params.catIds]
    all_area = list(params.areaRngLbl).index("all")
    per_class_ap = {name: _mean_defined(precision[:, :, k, all_area, -1]) for k, name in enumerate(names)}
    return CocoEvaluation(stats=stats, per_class_ap=per_class_ap, precision=precision, recall=recall,
                          scores=evaluator.eval["scores"], category_ids=list(params.catIds), category_names=names,
                          iou_thresholds=np.asarray(params.iouThrs), recall_thresholds=np.asarray(params.recThrs),
                          max_detections=limits, summary=_summary_text(stats, params.iouThrs, limits),
                          num_detections=int(rows.shape[0]), matches=matches)


def _mask_area(rle: dict) -> float:
    from pycocotools import mask as mask_api

    return float(mask_api.area({"size": rle["size"], "counts": rle["counts"].encode("ascii")}))
