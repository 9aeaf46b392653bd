"""Pairwise IoU family: one N x M matrix (4096 x 4096) and a batch of small ones (16 x 1000 x 100).

All three implementations are vectorised, so the reference runs at every size. The output (float32) dominates the
memory traffic, so each result records the bytes moved and the report gives achieved GB/s.
"""

from __future__ import annotations

import pytest

from benchmarks.common import IMPLEMENTATIONS, cases, clustered_detections, implementation

PAIRWISE_OPS = ("box_iou", "generalized_box_iou", "distance_box_iou", "complete_box_iou")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases("pairwise_iou"))
@pytest.mark.parametrize("op", PAIRWISE_OPS)
def test_pairwise_iou(bench, op, case, impl):
    fn = implementation(op, impl, case)
    batch = case.params.get("batch")
    n, m = case.params["n"], case.params["m"]
    boxes1 = clustered_detections(n, batch=batch, seed=10).boxes.to(case.device)
    boxes2 = clustered_detections(m, batch=batch, seed=11).boxes.to(case.device)
    pairs = (batch or 1) * n * m
    # Lower bound of the traffic: both inputs read once, the float32 output written once.
    bytes_moved = boxes1.nbytes + boxes2.nbytes + pairs * 4
    bench(lambda: fn(boxes1, boxes2), op=op, case=case, impl=impl, bytes_moved=bytes_moved)
