"""Rotated boxes (cxcywhr, degrees): pairwise rotated IoU (fastdet vs torchvision's box_iou(fmt='cxcywhr') and the
reference) and rotated NMS (fastdet vs the reference; torchvision has no rotated NMS).

Inputs are the clustered detections of the other benchmarks, each box given a random orientation around its object's
(so boxes of one object overlap heavily). The references are timed only at each op's smallest size: rotated NMS is a
Python loop, and the reference IoU builds 24 candidate vertices per pair.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import IMPLEMENTATIONS, cases, clustered_detections, implementation, uniform_scores

IOU_THRESHOLD = 0.5


def rotated_detections(n: int, *, batch: int | None = None, classes: int = 80, seed: int = 0):
    """clustered_detections as cxcywhr boxes: centres and sides of the xyxy boxes, angles ~ U(-90, 90) per object
    cluster plus ~5 degrees of jitter per box (derived from the seeded boxes, so every implementation sees the same)."""
    detections = clustered_detections(n, batch=batch, classes=classes, seed=seed)
    x1, y1, x2, y2 = detections.boxes.unbind(-1)
    g = torch.Generator().manual_seed(seed + 100)
    angle = (torch.rand(x1.shape, generator=g) * 180 - 90) * 0.2 + 5 * torch.randn(x1.shape, generator=g)
    boxes = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1, angle), dim=-1)
    return boxes, detections.labels


def _rotated_iou(impl: str, case):
    if impl == "reference":
        reference = implementation("box_iou_rotated", impl, case, python_loop_reference=True)

        def ref_iou(a, b):
            if a.dim() == 2:
                return reference(a, b)
            return torch.stack([reference(x, y) for x, y in zip(a, b)])

        return ref_iou
    fn = implementation("box_iou", impl, case)
    if impl == "torchvision":
        def tv_iou(a, b):  # torchvision takes [N, 5] only: a loop over the batch
            if a.dim() == 2:
                return fn(a, b, fmt="cxcywhr")
            return torch.stack([fn(x, y, fmt="cxcywhr") for x, y in zip(a, b)])

        return tv_iou
    return lambda a, b: fn(a, b, fmt="cxcywhr")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases("rotated_iou"))
def test_rotated_box_iou(bench, case, impl):
    fn = _rotated_iou(impl, case)
    batch = case.params.get("batch")
    n, m = case.params["n"], case.params["m"]
    boxes1 = rotated_detections(n, batch=batch, seed=10)[0].to(case.device)
    boxes2 = rotated_detections(m, batch=batch, seed=11)[0].to(case.device)
    pairs = (batch or 1) * n * m
    bytes_moved = boxes1.nbytes + boxes2.nbytes + pairs * 4
    bench(lambda: fn(boxes1, boxes2), op="box_iou_rotated", case=case, impl=impl, bytes_moved=bytes_moved)


def _no_torchvision(impl: str, op: str):
    if impl == "torchvision":
        pytest.skip(f"torchvision has no {op}")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases("nms_rotated"))
def test_nms_rotated(bench, case, impl):
    _no_torchvision(impl, "nms_rotated")
    fn = implementation("nms_rotated", impl, case, python_loop_reference=True)
    n = case.params["n"]
    boxes = rotated_detections(n)[0].to(case.device)
    scores = uniform_scores(n).to(case.device)
    bench(lambda: fn(boxes, scores, IOU_THRESHOLD), op="nms_rotated", case=case, impl=impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases("batched_nms_rotated"))
def test_batched_nms_rotated(bench, case, impl):
    _no_torchvision(impl, "batched_nms_rotated")
    fn = implementation("batched_nms_rotated", impl, case, python_loop_reference=True)
    n, classes = case.params["n"], case.params["classes"]
    boxes, labels = rotated_detections(n, classes=classes)
    boxes, labels = boxes.to(case.device), labels.to(case.device)
    scores = uniform_scores(n).to(case.device)
    bench(lambda: fn(boxes, scores, labels, IOU_THRESHOLD), op="batched_nms_rotated", case=case, impl=impl)
