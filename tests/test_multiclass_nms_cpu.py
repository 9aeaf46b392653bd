"""multiclass_nms' fused CPU kernel (a threshold pass, partial top-k selection, per-class greedy NMS, fixed-size
output) against the device-agnostic path it replaces on the CPU and against the pure-PyTorch reference: the outputs
must be bit-identical, ties, exact thresholds, NaN/Inf and every dtype included."""

from __future__ import annotations

import pytest
import torch

from fastdet import ops
from fastdet.ops import reference
from tests.test_nms import clustered_boxes, fresh_seed, tied


def _generic(boxes, scores, *args, **kwargs):
    """The device-agnostic path (top-k, nms_fixed, compaction): multiclass_nms takes it when autograd needs the
    selected boxes."""
    out = ops.multiclass_nms(boxes.detach().requires_grad_(True), scores, *args, **kwargs)
    return tuple(t.detach() for t in out)


def _inputs(B, N, C, seed, per_class, dtype):
    g = torch.Generator().manual_seed(seed)
    if per_class:
        boxes = torch.stack([clustered_boxes(N * C, seed + b)[0].reshape(N, C, 4) for b in range(B)])
    else:
        boxes = torch.stack([clustered_boxes(N, seed + b)[0] for b in range(B)])
    scores = torch.rand(B, N, C, generator=g)
    return boxes, scores


def _assert_equal(got, exp, seed):
    for name, a, b in zip(["boxes", "scores", "labels", "num_detections"], got, exp):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # bit-identical; a NaN box (drawn on purpose) may be among the detections, and NaN != NaN for torch.equal
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=f"{name} differs, seed={seed}")


@pytest.mark.parametrize("per_class", [False, True], ids=["shared", "per_class"])
@pytest.mark.parametrize("class_agnostic", [False, True], ids=["per_category", "agnostic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 37, 300, 5000])
def test_fused_matches_generic_path_and_reference(per_class, class_agnostic, dtype, top_k):
    seed = fresh_seed()
    B, N, C = 3, 300, 7
    boxes, scores = _inputs(B, N, C, seed, per_class, dtype)
    scores[0] = tied(scores[0], 8)  # many exact ties, across boxes and across classes of one box
    scores[1, :4, 2] = float("nan")
    scores[1, 4:8, 1] = 0.25  # exactly at the score threshold: fails (strictly greater passes)
    scores[2, 10:20] = 1.0
    boxes[2, 3] = float("inf")
    boxes[2, 5] = float("nan")
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    args = (0.25, 0.5, 40, top_k)
    got = ops.multiclass_nms(boxes, scores, *args, class_agnostic=class_agnostic)
    _assert_equal(got, _generic(boxes, scores, *args, class_agnostic=class_agnostic), seed)
    _assert_equal(got, reference.multiclass_nms(boxes, scores, *args, class_agnostic=class_agnostic), seed)


@pytest.mark.parametrize("score_threshold", [float("-inf"), -1.0, 0.0, 0.5, 1.0, float("inf")])
def test_fused_thresholds_and_non_contiguous(score_threshold):
    seed = fresh_seed()
    boxes, scores = _inputs(2, 120, 5, seed, False, torch.float32)
    scores = tied(scores, 4).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous, exact 0.5 and 1.0 ties
    boxes = boxes.transpose(1, 2).contiguous().transpose(1, 2)
    assert not boxes.is_contiguous() and not scores.is_contiguous()
    before = (boxes.clone(), scores.clone())
    args = (score_threshold, 0.3, 25, 200)
    got = ops.multiclass_nms(boxes, scores, *args)
    _assert_equal(got, _generic(boxes, scores, *args), seed)
    assert torch.equal(before[0], boxes) and torch.equal(before[1], scores), "inputs modified"


def test_fused_detector_sized_batch_matches_generic_path():
    # SSD300-like: 8732 priors x 21 classes, many passing candidates cut by the partial selection
    seed = fresh_seed()
    boxes, scores = _inputs(2, 8732, 21, seed, False, torch.float32)
    args = (0.05, 0.45, 200, 4000)
    _assert_equal(ops.multiclass_nms(boxes, scores, *args), _generic(boxes, scores, *args), seed)


def test_fused_kernel_under_compile_and_opcheck():
    seed = fresh_seed()
    boxes, scores = _inputs(2, 50, 3, seed, False, torch.float32)
    compiled = torch.compile(lambda b, s: ops.multiclass_nms(b, s, 0.2, 0.5, 8, 30), fullgraph=True,
                             backend="aot_eager", dynamic=True)
    _assert_equal(compiled(boxes, scores), ops.multiclass_nms(boxes, scores, 0.2, 0.5, 8, 30), seed)
    torch.library.opcheck(torch.ops.fastdet._multiclass_nms_kernel, (boxes, scores, 0.2, 0.5, 8, 30, False))


def test_fused_kernel_rejects_bad_layout():
    with pytest.raises(RuntimeError, match="scores must be a contiguous"):
        torch.ops.fastdet._multiclass_nms_kernel(torch.zeros(1, 2, 4), torch.zeros(1, 3, 2).transpose(1, 2), 0.1,
                                                 0.5, 3, 3, False)
    with pytest.raises(RuntimeError, match="boxes must be a contiguous"):
        torch.ops.fastdet._multiclass_nms_kernel(torch.zeros(1, 3, 4), torch.zeros(1, 2, 2), 0.1, 0.5, 3, 3, False)


@pytest.mark.cuda
def test_cuda_large_categorised_nms_fixed_matches_cpu():
    # above 8192 candidates per image, CUDA's sync-free NMS with categories runs one block per category in O(N)
    # memory instead of the dense N x N mask; results must be those of the CPU kernel
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device available")
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, N = 2, 12_000
    boxes = torch.stack([clustered_boxes(N, seed + b)[0] for b in range(B)])
    scores = tied(torch.rand(B, N, generator=g), 50)
    idxs = torch.randint(0, 90, (B, N), generator=g)
    cpu = ops.nms_fixed(boxes, scores, idxs, 0.45, 500)
    gpu = ops.nms_fixed(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.45, 500)
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1]), f"seed={seed}"
    args = (0.05, 0.45, 200, 36_000)
    big_scores = torch.rand(1, 8732, 91, generator=g)
    big_boxes = clustered_boxes(8732, seed)[0][None]
    _assert_equal(ops.multiclass_nms(big_boxes.cuda(), big_scores.cuda(), *args),
                  tuple(t.cuda() for t in ops.multiclass_nms(big_boxes, big_scores, *args)), seed)
