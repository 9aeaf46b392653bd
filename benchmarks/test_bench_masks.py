"""Mask R-CNN's mask ops: paste_masks_in_image (inference post-processing) and project_masks_on_boxes (training
targets), fastdet against torchvision's functions in torchvision.models.detection.roi_heads.

paste: N detections' 28 x 28 probability masks pasted into a height x width image (boxes: detector-like, clipped to
the image). project: P proposals' 28 x 28 targets from G ("M" in the label) bool ground-truth masks of the image.
The reference pastes one detection at a time like torchvision, so it is timed only at the smallest size.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from benchmarks.common import IMPLEMENTATIONS, cases, clustered_detections, implementation

MASK = 28


def masks_impl(op: str, impl: str, case):
    if impl == "torchvision":
        try:
            return getattr(importlib.import_module("torchvision.models.detection.roi_heads"), op)
        except Exception as exc:
            pytest.skip(f"torchvision not importable ({type(exc).__name__}: {exc})")
    return implementation(op, impl, case, python_loop_reference=True)


def image_boxes(case, n, seed):
    height, width = case.params["height"], case.params["width"]
    boxes = clustered_detections(n, seed=seed).boxes
    boxes = boxes * torch.tensor([width / 1333.0, height / 800.0] * 2)
    boxes = torch.maximum(boxes.clamp(min=0), torch.zeros(4))
    boxes = torch.minimum(boxes, torch.tensor([width - 1.0, height - 1.0] * 2))
    return boxes.contiguous().to(case.device)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases("paste_masks"))
def test_paste_masks_in_image(bench, case, impl):
    fn = masks_impl("paste_masks_in_image", impl, case)
    n = case.params["n"]
    g = torch.Generator().manual_seed(40)
    masks = torch.rand(n, 1, MASK, MASK, generator=g).to(case.device)
    boxes = image_boxes(case, n, seed=41)
    shape = (case.params["height"], case.params["width"])
    out_bytes = n * shape[0] * shape[1] * 4
    bench(lambda: fn(masks, boxes, shape), op="paste_masks_in_image", case=case, impl=impl,
          bytes_moved=out_bytes + masks.numel() * 4)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases("project_masks"))
def test_project_masks_on_boxes(bench, case, impl):
    fn = masks_impl("project_masks_on_boxes", impl, case)
    if impl == "reference" and not case.smallest:
        pytest.skip("the reference is timed only at the smallest size")
    p, g_count = case.params["n"], case.params["m"]
    g = torch.Generator().manual_seed(42)
    gt = (torch.rand(g_count, case.params["height"], case.params["width"], generator=g) > 0.5).to(case.device)
    boxes = image_boxes(case, p, seed=43)
    idx = torch.randint(g_count, (p,), generator=g).to(case.device)
    bench(lambda: fn(gt, boxes, idx, MASK), op="project_masks_on_boxes", case=case, impl=impl)
