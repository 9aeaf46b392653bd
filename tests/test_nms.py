"""NMS family: fastdet.ops against fastdet.ops.reference (exact) and torchvision (exact where torchvision is exact)."""

from __future__ import annotations

import random

import pytest
import torch

from fastdet import ops
from fastdet.ops import reference

try:
    import torchvision.ops as tv
except Exception:  # pragma: no cover - torchvision is optional
    tv = None

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
needs_tv = pytest.mark.skipif(tv is None, reason="torchvision is not installed")


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def clustered_boxes(n, seed, device="cpu", dtype=torch.float32, num_centres=None, spread=6.0, scale=1000.0):
    """Boxes jittered around object centres, as a detector emits them (heavy, realistic overlap)."""
    g = torch.Generator().manual_seed(seed)
    num_centres = num_centres or max(n // 25, 1)
    centres = torch.rand(num_centres, 2, generator=g, dtype=torch.float64) * scale
    owner = torch.randint(0, num_centres, (n,), generator=g)
    ctr = centres[owner] + torch.randn(n, 2, generator=g, dtype=torch.float64) * spread
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 60 + 10
    boxes = torch.cat([ctr - wh / 2, ctr + wh / 2], dim=1)
    scores = torch.rand(n, generator=g, dtype=torch.float64)
    return boxes.to(device=device, dtype=dtype), scores.to(device=device, dtype=dtype)


def tied(scores, levels=5):
    """Quantise scores so that many are exactly equal."""
    return (scores * levels).floor() / levels


# ---------------------------------------------------------------------------------------------------------------- nms


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 300, 2500])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_nms_matches_reference(device, dtype, n, threshold):
    seed = fresh_seed()
    boxes, scores = clustered_boxes(n, seed, device, dtype)
    expected = reference.nms(boxes.cpu(), scores.cpu(), threshold)
    got = ops.nms(boxes, scores, threshold)
    assert got.dtype == torch.int64 and got.device == boxes.device
    assert torch.equal(got.cpu(), expected), f"seed={seed}"


@needs_tv
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [50, 1000, 5000])
def test_nms_matches_torchvision(device, dtype, n):
    seed = fresh_seed()
    boxes, scores = clustered_boxes(n, seed, device, dtype)
    assert torch.equal(ops.nms(boxes, scores, 0.5), tv.nms(boxes, scores, 0.5)), f"seed={seed}"


@needs_tv
@pytest.mark.parametrize("device", DEVICES)
def test_nms_tied_scores_follow_index_order(device):
    seed = fresh_seed()
    boxes, scores = clustered_boxes(3000, seed, device)
    scores = tied(scores, levels=3)
    got = ops.nms(boxes, scores, 0.5)
    assert torch.equal(got.cpu(), reference.nms(boxes.cpu(), scores.cpu(), 0.5)), f"seed={seed}"
    if device == "cpu":  # torchvision's CPU kernel also uses a stable sort
        assert torch.equal(got, tv.nms(boxes, scores, 0.5)), f"seed={seed}"
    # All boxes identical and all scores equal: only index 0 survives.
    same = torch.tensor([[1.0, 2.0, 30.0, 40.0]], device=device).repeat(100, 1)
    assert ops.nms(same, torch.ones(100, device=device), 0.5).tolist() == [0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_iou_exactly_at_threshold_is_not_suppressed(device, dtype):
    # [0, 0, 2, 1] and [0, 0, 1, 1]: inter 1, union 2 -> IoU exactly 0.5 in every dtype.
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]], device=device, dtype=dtype)
    scores = torch.tensor([0.9, 0.8], device=device, dtype=dtype)
    assert ops.nms(boxes, scores, 0.5).tolist() == [0, 1]
    assert ops.nms(boxes, scores, 0.4999).tolist() == [0]


@pytest.mark.parametrize("device", DEVICES)
def test_threshold_compared_exactly_in_float64(device):
    # IoU = 0.3 (1 * 0.3 / 1) rounds to the float32 0.30000001192..., which is above the float64 0.3: torchvision's CPU
    # kernel suppresses, and so must fastdet on every device.
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.3]], device=device)
    scores = torch.tensor([0.9, 0.8], device=device)
    iou = float(reference.box_iou(boxes[:1].cpu(), boxes[1:].cpu()))
    expected = [0] if iou > 0.3 else [0, 1]
    assert ops.nms(boxes, scores, 0.3).tolist() == expected
    if tv is not None:
        assert tv.nms(boxes.cpu(), scores.cpu(), 0.3).tolist() == expected


@pytest.mark.parametrize("device", DEVICES)
def test_nms_fp16_coordinates_in_the_thousands(device):
    seed = fresh_seed()
    boxes, scores = clustered_boxes(2000, seed, device, torch.float16, scale=6000.0)
    assert torch.equal(ops.nms(boxes, scores, 0.5).cpu(), reference.nms(boxes.cpu(), scores.cpu(), 0.5)), f"seed={seed}"


@pytest.mark.parametrize("device", DEVICES)
def test_nms_non_contiguous_inputs(device):
    seed = fresh_seed()
    boxes, scores = clustered_boxes(800, seed, device)
    wide = torch.zeros(800, 8, device=device)
    wide[:, ::2] = boxes  # stride 2 along the coordinates
    strided_boxes = wide[:, ::2]
    strided_scores = torch.stack([scores, scores], dim=1)[:, 0]
    assert not strided_boxes.is_contiguous() and not strided_scores.is_contiguous()
    assert torch.equal(ops.nms(strided_boxes, strided_scores, 0.5), ops.nms(boxes, scores, 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_nms_nan_and_degenerate_inputs(device):
    seed = fresh_seed()
    boxes, scores = clustered_boxes(400, seed, device)
    boxes[::17, 0] = float("nan")
    boxes[5::23] = boxes[5::23][:, [2, 3, 0, 1]]  # x2 < x1, y2 < y1
    boxes[7::29, 2] = float("inf")
    scores[3::31] = float("nan")
    got = ops.nms(boxes, scores, 0.5)
    assert torch.equal(got.cpu(), reference.nms(boxes.cpu(), scores.cpu(), 0.5)), f"seed={seed}"
    if tv is not None and device == "cpu":
        assert torch.equal(got, tv.nms(boxes, scores, 0.5)), f"seed={seed}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_nms_empty(device, dtype):
    boxes = torch.empty(0, 4, device=device, dtype=dtype)
    out = ops.nms(boxes, torch.empty(0, device=device, dtype=dtype), 0.5)
    assert out.shape == (0,) and out.dtype == torch.int64 and out.device == boxes.device
    out = ops.batched_nms(boxes, torch.empty(0, device=device, dtype=dtype),
                          torch.empty(0, dtype=torch.int64, device=device), 0.5)
    assert out.shape == (0,) and out.dtype == torch.int64


def test_nms_does_not_modify_inputs():
    boxes, scores = clustered_boxes(500, fresh_seed())
    idxs = torch.randint(0, 5, (500,))
    copies = boxes.clone(), scores.clone(), idxs.clone()
    ops.nms(boxes, scores, 0.5)
    ops.batched_nms(boxes, scores, idxs, 0.5)
    ops.nms_fixed(boxes, scores, idxs, 0.5, 50)
    assert torch.equal(boxes, copies[0]) and torch.equal(scores, copies[1]) and torch.equal(idxs, copies[2])


# -------------------------------------------------------------------------------------------------------- batched_nms


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("n,num_classes", [(10, 3), (600, 80), (4000, 80), (3000, 2)])
def test_batched_nms_matches_reference(device, dtype, n, num_classes):
    seed = fresh_seed()
    boxes, scores = clustered_boxes(n, seed, device, dtype)
    idxs = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed)).to(device)
    expected = reference.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5)
    assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5).cpu(), expected), f"seed={seed}"


@needs_tv
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [500, 6000])  # below and above torchvision's switch from offsets to a per-class loop
def test_batched_nms_matches_torchvision(device, n):
    seed = fresh_seed()
    boxes, scores = clustered_boxes(n, seed, device, torch.float64)
    idxs = torch.randint(0, 80, (n,), generator=torch.Generator().manual_seed(seed)).to(device)
    ours = ops.batched_nms(boxes, scores, idxs, 0.5)
    theirs = tv.batched_nms(boxes, scores, idxs, 0.5)
    # Continuous random scores have no ties, so the order is fully determined.
    assert torch.equal(ours, theirs), f"seed={seed}"


@pytest.mark.parametrize("device", DEVICES)
def test_batched_nms_fp16_where_coordinate_offsets_fail(device):
    # The coordinate-offset trick shifts each category by (max coordinate + 1) * category; in float16 the shifted
    # coordinates of high categories lose their fractional precision and distinct boxes merge. fastdet separates
    # categories in the kernel, so the result equals per-category NMS exactly.
    seed = fresh_seed()
    boxes, scores = clustered_boxes(1500, seed, device, torch.float16, scale=900.0)
    idxs = torch.randint(0, 60, (1500,), generator=torch.Generator().manual_seed(seed)).to(device)
    expected = reference.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5)
    assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5).cpu(), expected), f"seed={seed}"


@pytest.mark.parametrize("device", DEVICES)
def test_batched_nms_tied_scores_and_int32_categories(device):
    seed = fresh_seed()
    boxes, scores = clustered_boxes(2000, seed, device)
    scores = tied(scores, 4)
    idxs = torch.randint(-3, 40, (2000,), generator=torch.Generator().manual_seed(seed)).to(device, torch.int32)
    expected = reference.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu().long(), 0.5)
    assert torch.equal(ops.batched_nms(boxes, scores, idxs, 0.5).cpu(), expected), f"seed={seed}"


# ---------------------------------------------------------------------------------------------------------- nms_fixed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_idxs", [False, True])
@pytest.mark.parametrize("max_output", [0, 1, 40, 5000])
def test_nms_fixed_matches_reference(device, with_idxs, max_output):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, N = 3, 700
    boxes = torch.stack([clustered_boxes(N, seed + b, device)[0] for b in range(B)])
    scores = torch.rand(B, N, generator=g).to(device)
    scores[1] = tied(scores[1], 3)
    idxs = torch.randint(0, 7, (B, N), generator=g).to(device) if with_idxs else None
    keep, num = ops.nms_fixed(boxes, scores, idxs, 0.5, max_output)
    exp_keep, exp_num = reference.nms_fixed(boxes.cpu(), scores.cpu(), None if idxs is None else idxs.cpu(), 0.5,
                                            max_output)
    assert keep.shape == (B, max_output) and num.shape == (B,)
    assert torch.equal(keep.cpu(), exp_keep) and torch.equal(num.cpu(), exp_num), f"seed={seed}"
    for b in range(B):  # each image equals the variable-size op truncated
        full = (ops.batched_nms(boxes[b], scores[b], idxs[b], 0.5) if with_idxs else ops.nms(boxes[b], scores[b], 0.5))
        assert torch.equal(keep[b, : num[b]], full[:max_output])


@pytest.mark.parametrize("device", DEVICES)
def test_nms_fixed_unbatched_and_empty(device):
    boxes, scores = clustered_boxes(100, fresh_seed(), device)
    keep, num = ops.nms_fixed(boxes, scores, None, 0.5, 10)
    assert keep.shape == (10,) and num.shape == ()
    keep, num = ops.nms_fixed(torch.empty(0, 4, device=device), torch.empty(0, device=device), None, 0.5, 4)
    assert keep.tolist() == [-1] * 4 and int(num) == 0
    keep, num = ops.nms_fixed(torch.empty(2, 0, 4, device=device), torch.empty(2, 0, device=device), None, 0.5, 3)
    assert keep.shape == (2, 3) and (keep == -1).all() and num.tolist() == [0, 0]


# ------------------------------------------------------------------------------------------------------ multiclass_nms


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_class_boxes", [False, True])
@pytest.mark.parametrize("class_agnostic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_multiclass_nms_matches_reference(device, per_class_boxes, class_agnostic, dtype):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    B, N, C = 3, 400, 6
    if per_class_boxes:
        boxes = torch.stack([clustered_boxes(N * C, seed + b, device)[0].reshape(N, C, 4) for b in range(B)])
    else:
        boxes = torch.stack([clustered_boxes(N, seed + b, device)[0] for b in range(B)])
    scores = torch.rand(B, N, C, generator=g).to(device)
    scores[0] = tied(scores[0], 10)  # many ties, including across classes of one box
    scores[2, :5, 0] = float("nan")
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    args = (0.3, 0.5, 50, 300)
    got = ops.multiclass_nms(boxes, scores, *args, class_agnostic=class_agnostic)
    exp = reference.multiclass_nms(boxes.cpu(), scores.cpu(), *args, class_agnostic=class_agnostic)
    names = ["boxes", "scores", "labels", "num_detections"]
    for name, a, b in zip(names, got, exp):
        assert a.dtype == b.dtype, name
        assert torch.equal(a.cpu(), b), f"{name} differs, seed={seed}"
    det_boxes, det_scores, det_labels, num = got
    assert det_boxes.shape == (B, 50, 4) and num.shape == (B,)
    for b in range(B):
        n = int(num[b])
        assert (det_labels[b, n:] == -1).all() and (det_scores[b, n:] == 0).all()
        assert (det_scores[b, :n] > 0.3).all()


@pytest.mark.parametrize("device", DEVICES)
def test_multiclass_nms_nothing_passes(device):
    boxes = torch.rand(2, 10, 4, device=device)
    boxes[..., 2:] += 1
    scores = torch.rand(2, 10, 3, device=device) * 0.1
    det_boxes, det_scores, det_labels, num = ops.multiclass_nms(boxes, scores, 0.5, 0.5, 5, 100)
    assert num.tolist() == [0, 0] and (det_labels == -1).all() and (det_boxes == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_class_boxes", [False, True], ids=["shared", "per_class"])
@pytest.mark.parametrize("case", ["no_boxes", "no_classes", "top_k_0"])
def test_multiclass_nms_no_candidates(device, per_class_boxes, case):
    # Regression (fuzzing): no candidate at all raised "index 0 is out of bounds" instead of returning K padding slots.
    B, N, C = 2, {"no_boxes": 0}.get(case, 7), {"no_classes": 0}.get(case, 3)
    top_k = 0 if case == "top_k_0" else 100
    boxes = torch.rand(B, N, C, 4, dtype=torch.float64, device=device) if per_class_boxes else \
        torch.rand(B, N, 4, dtype=torch.float64, device=device)
    boxes[..., 2:] += 1
    scores = torch.rand(B, N, C, dtype=torch.float16, device=device)
    det_boxes, det_scores, det_labels, num = ops.multiclass_nms(boxes, scores, 0.0, 0.5, 5, top_k)
    assert det_boxes.shape == (B, 5, 4) and det_boxes.dtype == torch.float64 and (det_boxes == 0).all()
    assert det_scores.shape == (B, 5) and det_scores.dtype == torch.float16 and (det_scores == 0).all()
    assert det_labels.shape == (B, 5) and det_labels.dtype == torch.int64 and (det_labels == -1).all()
    assert num.shape == (B,) and num.dtype == torch.int64 and num.tolist() == [0, 0]
    assert {t.device for t in (det_boxes, det_scores, det_labels, num)} == {boxes.device}


# ---------------------------------------------------------------------------------------------- compile, opcheck, errors


def _opcheck_samples():
    boxes, scores = clustered_boxes(60, 1234)
    idxs = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(1))
    return boxes, scores, idxs


def test_opcheck_nms_family():
    boxes, scores, idxs = _opcheck_samples()
    # all default checks, including aot_dispatch_dynamic for the data-dependent output size
    torch.library.opcheck(torch.ops.fastdet.nms, (boxes, scores, 0.5))
    torch.library.opcheck(torch.ops.fastdet.batched_nms, (boxes, scores, idxs, 0.5))
    torch.library.opcheck(torch.ops.fastdet.nms_fixed, (boxes, scores, idxs, 0.5, 20))
    torch.library.opcheck(torch.ops.fastdet.nms_fixed, (boxes[None].repeat(2, 1, 1), scores[None].repeat(2, 1), None,
                                                        0.5, 20))
    flags_boxes = boxes[None]
    torch.library.opcheck(torch.ops.fastdet._nms_keep_flags, (flags_boxes, None, 0.5, True))


def test_compile_fullgraph_fixed_size_postprocess():
    B, N, C = 2, 200, 4
    boxes = torch.stack([clustered_boxes(N, 7 + b)[0] for b in range(B)])
    scores = torch.rand(B, N, C, generator=torch.Generator().manual_seed(3))

    def postprocess(boxes, scores):
        return ops.multiclass_nms(boxes, scores, 0.2, 0.5, 30, 400)

    compiled = torch.compile(postprocess, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(boxes, scores), postprocess(boxes, scores)):
        assert torch.equal(a, b)


def test_compile_fullgraph_nms_with_dynamic_output():
    boxes, scores = clustered_boxes(300, 11)

    def f(boxes, scores):
        keep = ops.nms(boxes, scores, 0.5)
        return boxes[keep]

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(boxes, scores), f(boxes, scores))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda b, s, i: ops.nms(b.long(), s, 0.5), "boxes must be a floating-point"),
        (lambda b, s, i: ops.nms(b[:, :3], s, 0.5), "boxes must have shape"),
        (lambda b, s, i: ops.nms(b[None], s, 0.5), "boxes must have shape"),
        (lambda b, s, i: ops.nms(b, s[:-1], 0.5), "scores must have shape"),
        (lambda b, s, i: ops.nms(b, s.long(), 0.5), "scores must be a floating-point"),
        (lambda b, s, i: ops.nms(b, s, -0.1), "iou_threshold must be a non-negative"),
        (lambda b, s, i: ops.nms(b, s, float("nan")), "iou_threshold must be a non-negative"),
        (lambda b, s, i: ops.nms(b, s.to("meta"), 0.5), "same device"),
        (lambda b, s, i: ops.batched_nms(b, s, i.float(), 0.5), "idxs must be an integer"),
        (lambda b, s, i: ops.batched_nms(b, s, i[:-1], 0.5), "idxs must have shape"),
        (lambda b, s, i: ops.nms_fixed(b, s, i, 0.5, -1), "max_output must be a non-negative"),
        (lambda b, s, i: ops.nms_fixed(b, s[None], i, 0.5, 3), "scores must have shape"),
        (lambda b, s, i: ops.multiclass_nms(b[None], s[None], 0.1, 0.5, 5, 10), "scores must have shape"),
        (lambda b, s, i: ops.multiclass_nms(b[None], s[None, :, None][:, :-1], 0.1, 0.5, 5, 10), "boxes must have"),
        (lambda b, s, i: ops.multiclass_nms(b[None], s[None, :, None], 0.1, 0.5, -5, 10), "max_detections"),
        (lambda b, s, i: ops.multiclass_nms(b[None], s[None, :, None], 0.1, 2.0 * float("nan"), 5, 10), "iou_thr"),
    ],
)
def test_bad_input_raises_clear_errors(call, message):
    boxes, scores, idxs = _opcheck_samples()
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        call(boxes, scores, idxs)


def test_top_k_stable_matches_a_stable_sort_with_ties_at_the_boundary():
    from fastdet.ops.nms import _top_k_stable

    g = torch.Generator().manual_seed(fresh_seed())
    for _ in range(50):
        n = int(torch.randint(1, 300, (1,), generator=g))
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        values = (torch.rand(3, n, generator=g) * 4).floor()  # few distinct values: ties everywhere
        values[0, ::3] = float("-inf")
        expected = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(_top_k_stable(values, k), expected), (n, k)
