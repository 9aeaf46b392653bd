"""NMS family: nms, batched_nms (80 classes) and batched multi-class post-processing (multiclass_nms).

Inputs are clustered like a detector's raw output (see ``clustered_detections``), IoU threshold 0.5. The reference
is a Python loop, so it is timed only at each op's smallest size.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import (
    IMPLEMENTATIONS,
    cases,
    class_scores,
    clustered_detections,
    implementation,
    torchvision_ops,
    uniform_scores,
)

IOU_THRESHOLD = 0.5
# multiclass_nms settings of RetinaNet-style post-processing (mmdetection's defaults for it).
SCORE_THRESHOLD = 0.05
PRE_NMS_TOP_K = 1000
MAX_DETECTIONS = 100


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases("nms"))
def test_nms(bench, case, impl):
    fn = implementation("nms", impl, case, python_loop_reference=True)
    n = case.params["n"]
    boxes = clustered_detections(n).boxes.to(case.device)
    scores = uniform_scores(n).to(case.device)
    bench(lambda: fn(boxes, scores, IOU_THRESHOLD), op="nms", case=case, impl=impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases("batched_nms"))
def test_batched_nms(bench, case, impl):
    fn = implementation("batched_nms", impl, case, python_loop_reference=True)
    n, classes = case.params["n"], case.params["classes"]
    detections = clustered_detections(n, classes=classes)
    boxes, labels = detections.boxes.to(case.device), detections.labels.to(case.device)
    scores = uniform_scores(n).to(case.device)
    bench(lambda: fn(boxes, scores, labels, IOU_THRESHOLD), op="batched_nms", case=case, impl=impl)


def torchvision_multiclass_nms(boxes, scores, score_threshold, iou_threshold, max_detections, pre_nms_top_k):
    """The usual way to post-process a batch with torchvision: a Python loop over images, each filtered by score,
    cut to its top-k candidates and passed to ``torchvision.ops.batched_nms`` (as mmdetection and detectron2 do).
    Same thresholds, top-k and padded outputs as ``fastdet.ops.multiclass_nms``; it differs only in the order of
    exactly tied scores, which random scores do not have."""
    tv = torchvision_ops()
    batch, _, classes = scores.shape
    det_boxes = boxes.new_zeros(batch, max_detections, 4)
    det_scores = scores.new_zeros(batch, max_detections)
    det_labels = torch.full((batch, max_detections), -1, dtype=torch.int64, device=scores.device)
    num_detections = torch.zeros(batch, dtype=torch.int64, device=scores.device)
    for b in range(batch):
        flat = scores[b].reshape(-1)
        candidates = torch.nonzero(flat > score_threshold).squeeze(1)
        top_scores, order = flat[candidates].topk(min(pre_nms_top_k, candidates.numel()))
        candidates = candidates[order]
        cand_boxes, cand_labels = boxes[b, candidates // classes], candidates % classes
        kept = tv.batched_nms(cand_boxes, top_scores, cand_labels, iou_threshold)[:max_detections]
        k = kept.numel()
        det_boxes[b, :k] = cand_boxes[kept]
        det_scores[b, :k] = top_scores[kept]
        det_labels[b, :k] = cand_labels[kept]
        num_detections[b] = k
    return det_boxes, det_scores, det_labels, num_detections


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases("multiclass_nms"))
def test_multiclass_nms(bench, case, impl):
    info = {}
    if impl == "torchvision":
        torchvision_ops()  # skip with the reason when torchvision is missing
        fn = torchvision_multiclass_nms
        info["baseline"] = "per-image loop of torchvision.ops.batched_nms"
    else:
        fn = implementation("multiclass_nms", impl, case, python_loop_reference=True)
    batch, n, classes = case.params["batch"], case.params["n"], case.params["classes"]
    detections = clustered_detections(n, batch=batch, classes=classes)
    boxes = detections.boxes.to(case.device)
    scores = class_scores(detections.labels, classes).to(case.device)
    bench(
        lambda: fn(boxes, scores, SCORE_THRESHOLD, IOU_THRESHOLD, MAX_DETECTIONS, PRE_NMS_TOP_K),
        op="multiclass_nms",
        case=case,
        impl=impl,
        **info,
    )
