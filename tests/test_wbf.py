"""weighted_boxes_fusion and non_maximum_weighted: against ensemble-boxes (bit-exact) and fastdet.ops.reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from fastdet import ops
from fastdet.ops import reference
from tests.test_nms import fresh_seed
from tests.test_soft_nms import normalised_boxes

try:
    from ensemble_boxes import non_maximum_weighted as eb_nmw
    from ensemble_boxes import weighted_boxes_fusion as eb_wbf
except Exception:  # pragma: no cover - ensemble-boxes is a test extra
    eb_wbf = eb_nmw = None

needs_eb = pytest.mark.skipif(eb_wbf is None, reason="ensemble-boxes is not installed")
CONF_TYPES = ["avg", "max", "box_and_model_avg", "absent_model_aware_avg"]


def _models(seed, num_models, classes=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in range(num_models):
        n = int(torch.randint(0, 80, (1,), generator=g))
        boxes, scores = normalised_boxes(n, seed + 17 * m, dtype)
        out.append((boxes, scores, torch.randint(0, classes, (n,), generator=g)))
    return out


def _random_batch(seed, B, M, N):
    """Padded batched inputs: boxes [B, M, N, 4], scores, labels (4 classes) and random counts [B, M]."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.stack([torch.stack([normalised_boxes(N, seed + 7 * b + m)[0] for m in range(M)]) for b in range(B)])
    scores = torch.rand(B, M, N, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (B, M, N), generator=g)
    counts = torch.randint(0, N + 1, (B, M), generator=g)
    return boxes, scores, labels, counts


def _adversarial_batch(seed):
    """_random_batch(seed, 5, 4, 70) with ties, NaN and infinite scores, zero scores, NaN, swapped and out-of-range
    corners, and weights with a zero."""
    boxes, scores, labels, counts = _random_batch(seed, 5, 4, 70)
    scores[0, :, :10] = 0.5  # ties across models
    scores[1, 0, 3] = float("nan")  # skipped
    scores[1, 1, 4] = float("inf")  # weighted 0 below: NaN, skipped
    scores[2, 0, :5] = 0.0  # zero-score clusters: NaN fused boxes
    boxes[1, 2, 5] = float("nan")
    boxes[3, 1, :4] = boxes[3, 1, :4][:, [2, 3, 0, 1]]  # swapped corners
    boxes[4, 0, :3] += 0.6  # partly outside [0, 1]
    return boxes, scores, labels, counts, [1.0, 0.0, 2.5, 0.75]


def _assert_batched_matches_per_image(batched, single, boxes, scores, labels, counts, *options):
    fb, fs, fl, num = batched(boxes, scores, labels, counts, *options)
    B, M, N = boxes.shape[:3]
    assert fb.shape == (B, M * N, 4) and num.shape == (B,)
    for b in range(B):
        k = [int(c) for c in counts[b]]
        eb, es, el = single([boxes[b, m, : k[m]] for m in range(M)], [scores[b, m, : k[m]] for m in range(M)],
                            [labels[b, m, : k[m]] for m in range(M)], *options)
        n = int(num[b])
        assert n == len(es) and torch.equal(fb[b, :n], eb) and torch.equal(fs[b, :n], es)
        assert torch.equal(fl[b, :n], el) and (fl[b, n:] == -1).all() and (fs[b, n:] == 0).all()
    return fb


def _assert_cuda_matches_cpu(batched, seed, *options):
    boxes, scores, labels, counts, weights = _adversarial_batch(seed)
    cpu = batched(boxes, scores, labels, counts, weights, *options)
    cuda = batched(boxes.cuda(), scores.cuda(), labels.cuda(), counts.cuda(), weights, *options)
    for a, b in zip(cpu, cuda):
        assert b.device.type == "cuda"
        assert torch.equal(torch.nan_to_num(a, nan=7.0), torch.nan_to_num(b.cpu(), nan=7.0)), f"seed={seed}"


@needs_eb
@pytest.mark.parametrize("conf_type", CONF_TYPES)
@pytest.mark.parametrize("allows_overflow", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("num_models", [1, 3, 5])
def test_matches_ensemble_boxes_exactly(conf_type, allows_overflow, weighted, num_models):
    seed = fresh_seed()
    models = _models(seed, num_models)
    weights = [1.0 + m * 0.75 for m in range(num_models)] if weighted else None
    got = ops.weighted_boxes_fusion([m[0] for m in models], [m[1] for m in models], [m[2] for m in models], weights,
                                    0.55, 0.2, conf_type, allows_overflow)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = eb_wbf([m[0].numpy() for m in models], [m[1].numpy() for m in models], [m[2].numpy() for m in models],
                     weights=weights, iou_thr=0.55, skip_box_thr=0.2, conf_type=conf_type,
                     allows_overflow=allows_overflow)
    assert got[0].dtype == torch.float64 and got[2].dtype == torch.int64
    np.testing.assert_array_equal(got[0].numpy(), exp[0], err_msg=f"seed={seed}")
    np.testing.assert_array_equal(got[1].numpy(), exp[1], err_msg=f"seed={seed}")
    np.testing.assert_array_equal(got[2].numpy(), exp[2].astype(np.int64), err_msg=f"seed={seed}")


@needs_eb
def test_float32_inputs_and_out_of_range_boxes():
    seed = fresh_seed()
    models = _models(seed, 3, dtype=torch.float32)
    models[0][0][:3] = models[0][0][:3][:, [2, 3, 0, 1]]  # swapped corners
    models[1][0][:2] += 0.5  # partly outside [0, 1]: clipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = eb_wbf([m[0].numpy() for m in models], [m[1].numpy() for m in models], [m[2].numpy() for m in models],
                     iou_thr=0.4, skip_box_thr=0.0)
    got = ops.weighted_boxes_fusion([m[0] for m in models], [m[1] for m in models], [m[2] for m in models],
                                    iou_threshold=0.4)
    for a, e in zip(got, exp):
        np.testing.assert_array_equal(a.numpy(), e.astype(a.numpy().dtype), err_msg=f"seed={seed}")


@pytest.mark.parametrize("conf_type", CONF_TYPES)
def test_matches_reference_with_adversarial_inputs(conf_type):
    seed = fresh_seed()
    models = _models(seed, 3)
    models[0][1][:5] = 0.2  # exactly at the skip threshold: kept (score < threshold is skipped)
    models[1][1][:4] = models[2][1][:4] = 0.5  # ties across models
    if len(models[0][0]) > 6:
        models[0][0][5] = float("nan")  # skipped
        models[0][0][6, 2:] = models[0][0][6, :2]  # zero area: skipped
    got = ops.weighted_boxes_fusion([m[0] for m in models], [m[1] for m in models], [m[2] for m in models],
                                    [2.0, 1.0, 0.5], 0.5, 0.2, conf_type)
    exp = reference.weighted_boxes_fusion([m[0] for m in models], [m[1] for m in models], [m[2] for m in models],
                                          [2.0, 1.0, 0.5], 0.5, 0.2, conf_type)
    for a, e in zip(got, exp):
        assert torch.equal(a, e), f"seed={seed}"


def test_batched_form_matches_per_image_calls():
    seed = fresh_seed()
    _assert_batched_matches_per_image(ops.weighted_boxes_fusion_batched, ops.weighted_boxes_fusion,
                                      *_random_batch(seed, 4, 3, 30))


def test_empty_errors_and_opcheck():
    boxes, scores, labels = ops.weighted_boxes_fusion([torch.zeros(0, 4)], [torch.zeros(0)], [torch.zeros(0)])
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)
    b, s = normalised_boxes(5, 1)
    lab = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match="conf_type must be"):
        ops.weighted_boxes_fusion([b], [s], [lab], conf_type="median")
    with pytest.raises(ValueError, match="weights must have one entry per model"):
        ops.weighted_boxes_fusion([b], [s], [lab], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="weights must be finite"):
        ops.weighted_boxes_fusion([b], [s], [lab], weights=[-1.0])
    with pytest.raises(ValueError, match="one entry per model"):
        ops.weighted_boxes_fusion([b, b], [s], [lab, lab])
    with pytest.raises(RuntimeError, match="labels must be an integer"):
        ops.weighted_boxes_fusion_batched(b[None, None], s[None, None], s[None, None])
    args = (b[None, None], s[None, None], lab[None, None], torch.tensor([[5]]), torch.ones(1, dtype=torch.float64),
            0.55, 0.0, 0, False)
    torch.library.opcheck(torch.ops.fastdet.weighted_boxes_fusion, args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device available")
@pytest.mark.parametrize("conf_type", CONF_TYPES)
@pytest.mark.parametrize("allows_overflow", [False, True])
def test_cuda_matches_cpu_bit_for_bit(conf_type, allows_overflow):
    _assert_cuda_matches_cpu(ops.weighted_boxes_fusion_batched, fresh_seed(), 0.55, 0.1, conf_type, allows_overflow)


# --- non-maximum weighted -------------------------------------------------------------------------------------------


def _lists(models):
    return [m[0] for m in models], [m[1] for m in models], [m[2] for m in models]


@needs_eb
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("num_models", [1, 3, 5])
@pytest.mark.parametrize("iou_threshold, skip_box_threshold", [(0.55, 0.0), (0.3, 0.2), (0.0, 0.05)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nmw_matches_ensemble_boxes_exactly(weighted, num_models, iou_threshold, skip_box_threshold, dtype):
    seed = fresh_seed()
    models = _models(seed, num_models, dtype=dtype)
    if num_models > 1 and len(models[0][0]) > 3:
        models[0][0][:3] = models[0][0][:3][:, [2, 3, 0, 1]]  # swapped corners
        models[1][0][:2] += 0.5  # partly outside [0, 1]: clipped
    weights = [1.0 + m * 0.75 for m in range(num_models)] if weighted else None
    got = ops.non_maximum_weighted(*_lists(models), weights, iou_threshold, skip_box_threshold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = eb_nmw(*[[t.numpy() for t in part] for part in _lists(models)], weights=weights,
                     iou_thr=iou_threshold, skip_box_thr=skip_box_threshold)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[2].dtype == torch.int64
    np.testing.assert_array_equal(got[0].numpy(), exp[0], err_msg=f"seed={seed}")
    np.testing.assert_array_equal(got[1].numpy(), exp[1], err_msg=f"seed={seed}")
    np.testing.assert_array_equal(got[2].numpy(), exp[2].astype(np.int64), err_msg=f"seed={seed}")


def test_nmw_matches_reference_with_adversarial_inputs():
    seed = fresh_seed()
    models = _models(seed, 3)
    models[0][1][:5] = 0.2  # exactly at the skip threshold: kept
    models[1][1][:4] = models[2][1][:4] = 0.5  # ties across models
    models[2][0][:4] = models[1][0][:4]  # identical boxes: IoU exactly 1 with their cluster's first box
    if len(models[0][0]) > 6:
        models[0][0][5] = float("nan")  # skipped
        models[0][0][6, 2:] = models[0][0][6, :2]  # zero area: skipped
    args = (*_lists(models), [2.0, 1.0, 0.5], 0.5, 0.2)
    got = ops.non_maximum_weighted(*args)
    exp = reference.non_maximum_weighted(*args)
    for a, e in zip(got, exp):
        assert a.dtype == e.dtype and torch.equal(a, e), f"seed={seed}"


def test_nmw_differs_from_wbf_as_specified():
    # Two boxes of one label: NMW keeps the first box's score and weights the second by score x IoU; WBF averages.
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.5]], dtype=torch.float64),
             torch.tensor([[0.1, 0.1, 0.5, 0.6]], dtype=torch.float64)]
    scores = [torch.tensor([0.9], dtype=torch.float64), torch.tensor([0.6], dtype=torch.float64)]
    labels = [torch.tensor([1]), torch.tensor([1])]
    b, s, lab = ops.non_maximum_weighted(boxes, scores, labels, iou_threshold=0.5)
    iou = 0.16 / 0.2
    w2 = 0.6 * iou
    expected_y2 = (0.9 * 0.5 + w2 * 0.6) / (0.9 + w2)
    assert lab.tolist() == [1] and s.tolist() == [pytest.approx(0.9)]
    assert b[0, 3].item() == pytest.approx(expected_y2, rel=1e-6)
    assert b[0, :3].tolist() == pytest.approx([0.1, 0.1, 0.5], rel=1e-6)
    wb, ws, _ = ops.weighted_boxes_fusion(boxes, scores, labels, iou_threshold=0.5)
    assert ws.tolist() == [pytest.approx(0.75)]  # (0.9 + 0.6) / 2 models


def test_nmw_batched_form_matches_per_image_calls():
    seed = fresh_seed()
    fb = _assert_batched_matches_per_image(ops.non_maximum_weighted_batched, ops.non_maximum_weighted,
                                           *_random_batch(seed, 4, 3, 30), [1.0, 2.0, 0.5])
    assert fb.dtype == torch.float32


def test_nmw_empty_errors_and_opcheck():
    boxes, scores, labels = ops.non_maximum_weighted([torch.zeros(0, 4)], [torch.zeros(0)], [torch.zeros(0)])
    assert boxes.shape == (0, 4) and boxes.dtype == torch.float32 and scores.shape == (0,) and labels.shape == (0,)
    b, s = normalised_boxes(5, 1)
    lab = torch.zeros(5, dtype=torch.int64)
    with pytest.raises(ValueError, match="weights must be finite"):
        ops.non_maximum_weighted([b], [s], [lab], weights=[0.0])
    with pytest.raises(ValueError, match="weights must have one entry per model"):
        ops.non_maximum_weighted([b], [s], [lab], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="one entry per model"):
        ops.non_maximum_weighted([b, b], [s], [lab, lab])
    with pytest.raises(TypeError, match="boxes must be a torch.Tensor"):
        ops.non_maximum_weighted_batched(b.numpy(), s, lab)
    with pytest.raises(RuntimeError, match="non_maximum_weighted fuses at most 64 models"):
        ops.non_maximum_weighted_batched(torch.rand(1, 65, 2, 4), torch.rand(1, 65, 2), torch.zeros(1, 65, 2).long())
    inputs = (b[None, None], s[None, None], lab[None, None])
    before = [t.clone() for t in inputs]
    args = (*inputs, torch.tensor([[5]]), torch.ones(1, dtype=torch.float64), 0.55, 0.0)
    torch.library.opcheck(torch.ops.fastdet.non_maximum_weighted, args)
    assert all(torch.equal(x, y) for x, y in zip(before, inputs))  # inputs untouched


def test_nmw_under_compile():
    b, s = normalised_boxes(40, 3)
    lab = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(0))
    boxes, scores, labels = b.reshape(2, 2, 10, 4), s.reshape(2, 2, 10), lab.reshape(2, 2, 10)
    eager = ops.non_maximum_weighted_batched(boxes, scores, labels)
    compiled = torch.compile(ops.non_maximum_weighted_batched, fullgraph=True)(boxes, scores, labels)
    for a, e in zip(compiled, eager):
        assert torch.equal(a, e)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device available")
def test_nmw_cuda_matches_cpu_bit_for_bit():
    _assert_cuda_matches_cpu(ops.non_maximum_weighted_batched, fresh_seed(), 0.55, 0.1)
