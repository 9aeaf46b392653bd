"""soft_nms / soft_nms_fixed: against ensemble-boxes (the external reference) and fastdet.ops.reference.soft_nms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastdet import ops
from fastdet.ops import reference
from tests.test_nms import fresh_seed

try:
    from ensemble_boxes import soft_nms as eb_soft_nms
    from ensemble_boxes.ensemble_boxes_nms import cpu_soft_nms_float
except Exception:  # pragma: no cover - ensemble-boxes is a test extra
    cpu_soft_nms_float = eb_soft_nms = None

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
needs_eb = pytest.mark.skipif(cpu_soft_nms_float is None, reason="ensemble-boxes is not installed")
METHODS = {"linear": 1, "gaussian": 2}


def normalised_boxes(n, seed, dtype=torch.float64, clustered=True):
    """Boxes in [0, 1] with positive area, clustered like a detector's output."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(max(n // 10, 1), 2, generator=g, dtype=torch.float64) * 0.8 + 0.1
    owner = torch.randint(0, centres.shape[0], (n,), generator=g)
    ctr = centres[owner] + torch.randn(n, 2, generator=g, dtype=torch.float64) * (0.01 if clustered else 0.3)
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.15 + 0.01
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1).clamp(0, 1)
    wh = boxes[:, 2:] - boxes[:, :2]
    boxes[:, 2:] = torch.where(wh > 0, boxes[:, 2:], boxes[:, :2] + 0.01)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    return boxes.to(dtype), scores.to(dtype)


def eb_run(boxes, scores, iou_threshold, sigma, thresh, method):
    """ensemble-boxes' kernel: kept indices (visit order) and their decayed scores (it decays sc in place)."""
    sc = scores.cpu().numpy().copy()
    keep = cpu_soft_nms_float(boxes.cpu().numpy().copy(), sc, iou_threshold, sigma, thresh, METHODS[method])
    return np.asarray(keep, dtype=np.int64), sc[sc > thresh]


@needs_eb
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["gaussian", "linear"])
@pytest.mark.parametrize("n", [1, 2, 50, 700])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_ensemble_boxes(device, method, n, dtype):
    seed = fresh_seed()
    boxes, scores = normalised_boxes(n, seed, dtype)
    if n >= 50:
        scores[::7] = scores[3]  # exact ties, resolved by ensemble-boxes' slot order
    iou, sigma, thresh = 0.3, 0.5, 0.001 if dtype == torch.float64 else 0.25
    keep, values = ops.soft_nms(boxes.to(device), scores.to(device), iou, sigma, thresh, method)
    exp_keep, exp_values = eb_run(boxes, scores, iou, sigma, thresh, method)
    assert keep.dtype == torch.int64 and values.dtype == dtype
    assert np.array_equal(keep.cpu().numpy(), exp_keep), f"seed={seed}"
    # exp() may differ in the last bit from numpy's; everything else is the same arithmetic
    np.testing.assert_allclose(values.cpu().numpy(), exp_values, rtol=1e-6 if dtype == torch.float32 else 1e-13)


@needs_eb
@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_public_ensemble_boxes_soft_nms_with_labels(method):
    # ensemble-boxes' public function: per label, boxes and *original* scores of the kept boxes, labels in order
    seed = fresh_seed()
    boxes, scores = normalised_boxes(400, seed)
    labels = torch.randint(0, 3, (400,), generator=torch.Generator().manual_seed(seed))
    eb_boxes, eb_scores, eb_labels = eb_soft_nms([boxes.numpy()], [scores.numpy()], [labels.numpy()], method=METHODS[
        method], iou_thr=0.4, sigma=0.3, thresh=0.01)
    got = []
    for c in range(3):
        members = torch.nonzero(labels == c).squeeze(1)
        keep, _ = ops.soft_nms(boxes[members], scores[members], 0.4, 0.3, 0.01, method)
        got.append(members[keep])
    got = torch.cat(got)
    np.testing.assert_array_equal(boxes[got].numpy(), eb_boxes)
    np.testing.assert_array_equal(scores[got].numpy(), eb_scores)
    np.testing.assert_array_equal(labels[got].numpy(), eb_labels)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["gaussian", "linear"])
def test_matches_reference_with_adversarial_inputs(device, method):
    seed = fresh_seed()
    boxes, scores = normalised_boxes(120, seed, torch.float32)
    boxes[5] = boxes[6]  # identical boxes
    boxes[7, 2:] = boxes[7, :2]  # zero area
    boxes[8] = float("nan")
    boxes[9, 0] = float("inf")
    scores[10:20] = 0.5  # ties
    scores[20] = float("nan")
    scores[21] = -0.5
    scores[22] = 0.25  # exactly at the threshold: dropped
    before = (boxes.clone(), scores.clone())
    keep, values = ops.soft_nms(boxes.to(device), scores.to(device), 0.3, 0.5, 0.25, method)
    exp_keep, exp_values = reference.soft_nms(boxes, scores, 0.3, 0.5, 0.25, method)
    assert torch.equal(keep.cpu(), exp_keep), f"seed={seed}"
    torch.testing.assert_close(values.cpu(), exp_values, rtol=1e-6, atol=0)
    torch.testing.assert_close(boxes, before[0], rtol=0, atol=0, equal_nan=True)  # inputs untouched
    torch.testing.assert_close(scores, before[1], rtol=0, atol=0, equal_nan=True)


@needs_eb
@pytest.mark.parametrize("method", ["gaussian", "linear"])
@pytest.mark.parametrize("thresh", [0.0, 0.3, 0.6])
def test_boxes_that_cannot_be_kept_are_pruned_without_changing_results(method, thresh):
    # Only ordinary boxes, so the CPU kernel drops boxes whose score fell to <= thresh and stops once only those are
    # left; NaN / inf / negative scores and scores exactly at the threshold stay in play as ensemble-boxes has them.
    seed = fresh_seed()
    boxes, scores = normalised_boxes(600, seed)
    scores[::11] = thresh
    scores[5], scores[6], scores[7], scores[8] = float("nan"), float("inf"), -float("inf"), -0.25
    boxes[40] = boxes[41]  # identical boxes: a linear weight of exactly 0
    keep, values = ops.soft_nms(boxes, scores, 0.3, 0.5, thresh, method)
    exp_keep, exp_values = eb_run(boxes, scores, 0.3, 0.5, thresh, method)
    assert np.array_equal(keep.numpy(), exp_keep), f"seed={seed}"
    np.testing.assert_allclose(values.numpy(), exp_values, rtol=1e-13)
    ref_keep, ref_values = reference.soft_nms(boxes, scores, 0.3, 0.5, thresh, method)
    assert torch.equal(keep, ref_keep), f"seed={seed}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_and_non_contiguous(device, dtype):
    seed = fresh_seed()
    boxes, scores = normalised_boxes(200, seed, torch.float32)
    boxes_nc = boxes.t().contiguous().t().to(dtype)
    scores_nc = torch.stack([scores, scores], 1).to(dtype)[:, 0]
    assert not boxes_nc.is_contiguous() and not scores_nc.is_contiguous()
    keep, values = ops.soft_nms(boxes_nc.to(device), scores_nc.to(device))
    exp_keep, exp_values = reference.soft_nms(boxes_nc, scores_nc)
    assert values.dtype == dtype and torch.equal(keep.cpu(), exp_keep), f"seed={seed}"
    torch.testing.assert_close(values.cpu(), exp_values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["gaussian", "linear"])
@pytest.mark.parametrize("with_idxs", [False, True])
def test_fixed_matches_reference(device, method, with_idxs):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    per_image = [normalised_boxes(150, seed + b) for b in range(3)]
    boxes = torch.stack([p[0] for p in per_image])
    scores = torch.stack([p[1] for p in per_image])
    idxs = torch.randint(0, 4, (3, 150), generator=g) if with_idxs else None
    for max_output in (0, 10, 200):
        got = ops.soft_nms_fixed(boxes.to(device), scores.to(device), None if idxs is None else idxs.to(device),
                                 max_output, 0.3, 0.5, 0.1, method)
        exp = reference.soft_nms_fixed(boxes, scores, idxs, max_output, 0.3, 0.5, 0.1, method)
        assert torch.equal(got[0].cpu(), exp[0]) and torch.equal(got[2].cpu(), exp[2]), f"seed={seed}"
        torch.testing.assert_close(got[1].cpu(), exp[1], rtol=1e-13, atol=0)
    # one image, unbatched
    got = ops.soft_nms_fixed(boxes[0].to(device), scores[0].to(device), None, 30)
    exp = reference.soft_nms_fixed(boxes[0], scores[0], None, 30)
    assert got[0].shape == (30,) and got[2].shape == () and torch.equal(got[0].cpu(), exp[0])


def test_empty_and_errors():
    keep, values = ops.soft_nms(torch.zeros(0, 4), torch.zeros(0))
    assert keep.shape == (0,) and values.shape == (0,)
    keep, values, num = ops.soft_nms_fixed(torch.zeros(2, 0, 4), torch.zeros(2, 0), None, 5)
    assert (keep == -1).all() and (values == 0).all() and num.tolist() == [0, 0]
    b, s = normalised_boxes(4, 1)
    with pytest.raises(ValueError, match="method must be"):
        ops.soft_nms(b, s, method="hard")
    with pytest.raises(ValueError, match="sigma must be"):
        ops.soft_nms(b, s, sigma=0.0)
    with pytest.raises(ValueError, match="iou_threshold must be"):
        ops.soft_nms(b, s, iou_threshold=float("nan"))
    with pytest.raises(ValueError, match="score_threshold must not be NaN"):
        ops.soft_nms(b, s, score_threshold=float("nan"))
    with pytest.raises(RuntimeError, match="scores must have shape"):
        ops.soft_nms(b, s[:3])
    with pytest.raises(RuntimeError, match="boxes must have shape"):
        ops.soft_nms(b[:, :3], s)
    with pytest.raises(RuntimeError, match="idxs must be an integer"):
        ops.soft_nms_fixed(b, s, s, 3)
    with pytest.raises(ValueError, match="max_output"):
        ops.soft_nms_fixed(b, s, None, -1)


def test_opcheck_and_compile():
    b, s = normalised_boxes(60, 3, torch.float32)
    idxs = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(torch.ops.fastdet.soft_nms, (b, s, 0.3, 0.5, 0.001, 2))
    torch.library.opcheck(torch.ops.fastdet.soft_nms_fixed, (b[None], s[None], idxs[None], 0.3, 0.5, 0.001, 1, 20))
    torch.library.opcheck(torch.ops.fastdet._soft_nms_kernel, (b[None].double(), s[None], None, 0.3, 0.5, 0.001, 2))

    def post(boxes, scores, idxs):
        return ops.soft_nms_fixed(boxes, scores, idxs, 25, score_threshold=0.05)

    compiled = torch.compile(post, fullgraph=True, backend="aot_eager", dynamic=True)
    for a, e in zip(compiled(b[None], s[None], idxs[None]), post(b[None], s[None], idxs[None])):
        assert torch.equal(a, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["soft", "soft_linear"])
@pytest.mark.parametrize("class_agnostic", [False, True])
def test_multiclass_nms_soft_method(device, method, class_agnostic):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, N, C = 2, 150, 4
    boxes = torch.stack([normalised_boxes(N, seed + b)[0] for b in range(B)]).float()
    scores = torch.rand(B, N, C, generator=g)
    scores[0, :3, 1] = float("nan")
    got = ops.multiclass_nms(boxes.to(device), scores.to(device), 0.2, 0.3, 40, 300, class_agnostic=class_agnostic,
                             method=method, sigma=0.4)
    # the same from the pieces: the top-300 passing candidates per image, soft_nms_fixed per class (reference)
    kind = "gaussian" if method == "soft" else "linear"
    for b in range(B):
        flat = scores[b].reshape(-1)
        passing = torch.nonzero(flat > 0.2).squeeze(1)
        order = passing[torch.sort(flat[passing], descending=True, stable=True).indices][:300]
        cand_boxes, cand_labels = boxes[b, order // C], order % C
        keep, values, num = reference.soft_nms_fixed(cand_boxes, flat[order], None if class_agnostic else cand_labels,
                                                     40, 0.3, 0.4, 0.2, kind)
        n = int(num)
        assert int(got[3][b]) == n, f"seed={seed}"
        assert torch.equal(got[2][b, :n].cpu(), cand_labels[keep[:n]]), f"seed={seed}"
        assert torch.equal(got[0][b, :n].cpu(), cand_boxes[keep[:n]]), f"seed={seed}"
        torch.testing.assert_close(got[1][b, :n].cpu(), values[:n], rtol=1e-6, atol=0)
        assert (got[2][b, n:] == -1).all() and (got[1][b, n:] == 0).all()
    with pytest.raises(ValueError, match="method must be"):
        ops.multiclass_nms(boxes, scores, 0.2, 0.3, 40, 300, method="matrix")


def test_multiclass_nms_soft_compiles_without_graph_breaks():
    boxes, _ = normalised_boxes(60, 9, torch.float32)
    boxes = boxes[None].repeat(2, 1, 1)
    scores = torch.rand(2, 60, 3, generator=torch.Generator().manual_seed(9))

    def post(b, s):
        return ops.multiclass_nms(b, s, 0.2, 0.5, 10, 40, method="soft")

    compiled = torch.compile(post, fullgraph=True, backend="aot_eager", dynamic=True)
    for a, e in zip(compiled(boxes, scores), post(boxes, scores)):
        assert torch.equal(a, e)


def test_cpu_scalar_exp_path_matches_vector_path(tmp_path):
    # The CPU kernel computes a step's gaussian weights with SLEEF's vector exp where the CPU and torch have it;
    # FASTDET_SOFT_NMS_SCALAR=1 forces libm's. The two differ by at most an ulp per weight: same kept boxes, same
    # order, scores to rounding.
    import os
    import subprocess
    import sys

    script = (
        "import sys, torch, fastdet.ops as ops\n"
        "from tests.test_soft_nms import normalised_boxes\n"
        "out = []\n"
        "for seed in range(6):\n"
        "    boxes, scores = normalised_boxes(1500, seed, torch.float64)\n"
        "    labels = torch.randint(0, 3, (1500,), generator=torch.Generator().manual_seed(seed))\n"
        "    out.append((ops.soft_nms(boxes, scores, 0.3, 0.5, 0.001, 'gaussian'),\n"
        "                ops.soft_nms_fixed(boxes, scores, labels, 200, 0.3, 0.1, 0.0, 'gaussian')))\n"
        "torch.save(out, sys.argv[1])\n"
    )
    results = []
    for scalar in ("1", "0"):
        path = tmp_path / f"scalar{scalar}.pt"
        env = dict(os.environ, FASTDET_SOFT_NMS_SCALAR=scalar)
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env, cwd=Path(__file__).parents[1])
        results.append(torch.load(path))
    for (single_s, fixed_s), (single_v, fixed_v) in zip(*results):
        assert torch.equal(single_s[0], single_v[0]) and torch.equal(fixed_s[0], fixed_v[0])
        assert torch.equal(fixed_s[2], fixed_v[2])
        torch.testing.assert_close(single_v[1], single_s[1], rtol=1e-13, atol=0)
        torch.testing.assert_close(fixed_v[1], fixed_s[1], rtol=1e-13, atol=0)
