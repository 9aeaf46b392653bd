"""Box coding against torchvision's BoxCoder (when installed) and the reference, gradients (float64 gradcheck and the
reference's autograd), operator registration, torch.compile, decode_and_select's exact candidate order, and argument
errors. Fresh inputs from the ``seed`` fixture (FASTDET_TEST_SEED=<seed> replays a failure).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastdet import ops
from fastdet.ops import reference as ref

CLIP = math.log(1000.0 / 16)
WEIGHTS = {"rpn": (1.0, 1.0, 1.0, 1.0), "rcnn": (10.0, 10.0, 5.0, 5.0), "odd": (2.5, 0.5, 3.0, 1.5)}
ALL_WEIGHTS = pytest.mark.parametrize("weights", list(WEIGHTS.values()), ids=list(WEIGHTS))
ALL_DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch.")
)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def torchvision_box_coder():
    pytest.importorskip("torchvision", reason="torchvision is not installed; the torchvision parity case is skipped")
    from torchvision.models.detection._utils import BoxCoder

    return BoxCoder


def random_boxes(gen, n, *, scale=600.0, min_side=2.0, max_side=300.0, dtype=torch.float32, device="cpu"):
    corner = torch.rand(n, 2, generator=gen, dtype=torch.float64) * scale - 50
    size = min_side + torch.rand(n, 2, generator=gen, dtype=torch.float64) * (max_side - min_side)
    return torch.cat([corner, corner + size], dim=1).to(dtype).to(device)


def random_deltas(gen, rows, cols=4, *, spread=1.5, dtype=torch.float32, device="cpu"):
    return (torch.randn(rows, cols, generator=gen, dtype=torch.float64) * spread).to(dtype).to(device)


def coordinate_tolerance(dtype, boxes, extra_ulps=4, exact_on_cpu=True):
    """Decoded coordinates. On the CPU fastdet evaluates exp with torch's own kernel over arrays laid out like
    torchvision's (and the reference's), so the results are identical: tolerance 0. On CUDA exp is CUDA's expf (within
    ~2 ulp of torch's), and the corner c +/- exp(d) w / 2 carries that error times w, plus the final rounding of a value
    of magnitude <= the largest coordinate; float16/bfloat16 are compared after one rounding, so one ulp of the
    result."""
    if exact_on_cpu and boxes.device.type == "cpu":
        return {"rtol": 0, "atol": 0}
    eps = torch.finfo(torch.float32 if dtype in LOW_PRECISION else dtype).eps
    finite = boxes.double()[torch.isfinite(boxes.double())].abs()
    magnitude = float(finite.max()) if finite.numel() else 1.0
    if dtype in LOW_PRECISION:
        return {"rtol": torch.finfo(dtype).eps, "atol": torch.finfo(dtype).eps * magnitude * 8}
    return {"rtol": extra_ulps * eps, "atol": extra_ulps * eps * magnitude * 20}


def assert_close(actual, expected, *, seed, what="", **tol):
    torch.testing.assert_close(actual, expected, equal_nan=True,
                               msg=lambda d: f"{what} [seed={seed}; replay with FASTDET_TEST_SEED={seed}]\n{d}", **tol)


# --------------------------------------------------------------------------------------------------------------------
# decode / encode values
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("classes", [1, 3])
@ALL_WEIGHTS
def test_decode_matches_torchvision(device, dtype, classes, weights, seed):
    BoxCoder = torchvision_box_coder()
    gen = torch.Generator().manual_seed(seed)
    boxes = random_boxes(gen, 257, dtype=dtype, device=device)
    rel = random_deltas(gen, 257, 4 * classes, dtype=dtype, device=device)
    rel[:5, 2::4] = 10.0  # above the clip: exp(clip) * w
    got = ops.BoxCoder(weights).decode_single(rel, boxes)
    want = BoxCoder(weights).decode_single(rel, boxes)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_close(got, want, seed=seed, what="decode_single", **coordinate_tolerance(dtype, want))
    # the x/y centres involve no exp: those agree bit for bit
    centre = lambda t: (t[:, 0::4] + t[:, 2::4])  # noqa: E731
    assert_close(centre(got), centre(want), seed=seed, what="decoded centres", rtol=2 * torch.finfo(dtype).eps,
                 atol=4 * torch.finfo(dtype).eps * float(want.abs().max()))
    # the list API: [sum N_i, C, 4]
    split = [100, 0, 157]
    got_list = ops.BoxCoder(weights).decode(rel, list(boxes.split(split)))
    want_list = BoxCoder(weights).decode(rel, list(boxes.split(split)))
    assert got_list.shape == want_list.shape == (257, classes, 4)
    assert_close(got_list, want_list, seed=seed, what="decode", **coordinate_tolerance(dtype, want))


@ALL_DTYPES
@pytest.mark.parametrize("repeats", [1, 3])
@ALL_WEIGHTS
def test_decode_matches_reference(device, dtype, repeats, weights, seed):
    gen = torch.Generator().manual_seed(seed)
    boxes = random_boxes(gen, 64, dtype=dtype, device=device)
    rel = random_deltas(gen, 64 * repeats, 8, dtype=dtype, device=device)
    rel[0, 2] = float("nan")
    rel[1, 3] = 50.0
    rel[2, 2] = float("-inf")
    buffer = torch.full((*rel.shape, 2), float("nan"), dtype=dtype, device=device)
    buffer[..., 0] = rel
    strided = buffer[..., 0]  # same values, non-contiguous, NaN in the gaps
    for r in (strided, rel):
        got = ops.box_decode(r, boxes, weights)
        want = ref.box_decode(r, boxes, weights)
        assert got.dtype == dtype and got.shape == r.shape
        assert_close(got, want, seed=seed, what=f"decode repeats={repeats}", **coordinate_tolerance(dtype, want))
    assert torch.isnan(got[0, 0]) and torch.isnan(got[0, 2])  # NaN in, NaN out (not clamped away)
    assert torch.isfinite(got[1]).all()  # clipped, no overflow


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@ALL_WEIGHTS
def test_encode_matches_torchvision(device, dtype, weights, seed):
    BoxCoder = torchvision_box_coder()
    gen = torch.Generator().manual_seed(seed)
    gt = random_boxes(gen, 300, dtype=dtype, device=device)
    proposals = random_boxes(gen, 300, dtype=dtype, device=device)
    got = ops.BoxCoder(weights).encode_single(gt, proposals)
    want = BoxCoder(weights).encode_single(gt, proposals)
    # dx, dy: the same operations, bit for bit everywhere; dw, dh: bit for bit on the CPU (torch's own log), within an
    # ulp or two of log on CUDA (logf)
    eps = 0.0 if device == "cpu" else torch.finfo(dtype).eps
    assert_close(got[:, :2], want[:, :2], seed=seed, what="encode dx dy", rtol=0, atol=0)
    assert_close(got[:, 2:], want[:, 2:], seed=seed, what="encode dw dh", rtol=4 * eps, atol=4 * eps * max(weights))
    got_list = ops.BoxCoder(weights).encode([gt[:120], gt[120:]], [proposals[:120], proposals[120:]])
    want_list = BoxCoder(weights).encode([gt[:120], gt[120:]], [proposals[:120], proposals[120:]])
    for g, w in zip(got_list, want_list):
        assert_close(g, w, seed=seed, what="encode list", rtol=4 * eps, atol=4 * eps * max(weights))


@ALL_DTYPES
def test_encode_matches_reference_and_round_trips(device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    gt = random_boxes(gen, 200, dtype=dtype, device=device)
    proposals = random_boxes(gen, 200, dtype=dtype, device=device)
    weights = WEIGHTS["rcnn"]
    got = ops.box_encode(gt, proposals, weights)
    want = ref.box_encode(gt, proposals, weights)
    lowp = dtype in LOW_PRECISION
    if device == "cpu":
        tol = {"rtol": 0, "atol": 0}  # torch's own log on identically laid-out arrays: identical
    elif lowp:
        tol = {"rtol": torch.finfo(dtype).eps, "atol": 2 * torch.finfo(dtype).eps * 10}
    else:
        tol = {"rtol": 4 * torch.finfo(dtype).eps, "atol": 40 * torch.finfo(dtype).eps}
    assert_close(got, want, seed=seed, what="encode vs reference", **tol)
    if not lowp:
        back = ops.box_decode(got, proposals, weights, bbox_xform_clip=math.inf)
        assert_close(back, gt, seed=seed, what="decode(encode(x))", rtol=1e-5 if dtype == torch.float32 else 1e-12,
                     atol=1e-3 if dtype == torch.float32 else 1e-9)


def test_encode_mixed_dtypes_promote(device):
    gen = torch.Generator().manual_seed(0)
    gt = random_boxes(gen, 5, device=device)
    proposals = random_boxes(gen, 5, dtype=torch.float64, device=device)
    assert ops.box_encode(gt, proposals).dtype == torch.float64


@pytest.mark.parametrize("shape", [(0, 4), (0, 12)], ids=["C=1", "C=3"])
def test_decode_encode_empty(device, shape):
    rel = torch.zeros(shape, device=device, requires_grad=True)
    boxes = torch.zeros(0, 4, device=device, requires_grad=True)
    out = ops.box_decode(rel, boxes)
    assert out.shape == shape
    out.sum().backward()
    assert rel.grad.shape == shape and boxes.grad.shape == (0, 4)
    assert ops.box_encode(torch.zeros(0, 4, device=device), torch.zeros(0, 4, device=device)).shape == (0, 4)
    empty = ops.BoxCoder((1, 1, 1, 1)).decode(torch.zeros(0, 4, device=device), [torch.zeros(0, 4, device=device)])
    assert empty.shape == (0, 4)


# --------------------------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("repeats", [1, 2])
@ALL_WEIGHTS
def test_decode_gradcheck(device, weights, repeats, seed):
    gen = torch.Generator().manual_seed(seed)
    boxes = random_boxes(gen, 6, scale=20.0, max_side=10.0, dtype=torch.float64, device=device).requires_grad_(True)
    rel = random_deltas(gen, 6 * repeats, 8, spread=0.5, dtype=torch.float64, device=device)
    rel[0, 2] = 20.0 * weights[2]  # clipped: no gradient through the size delta, as torch.clamp
    rel.requires_grad_(True)
    try:
        torch.autograd.gradcheck(lambda r, b: ops.box_decode(r, b, weights, CLIP), (rel, boxes))
    except torch.autograd.gradcheck.GradcheckError as exc:
        raise AssertionError(f"gradcheck failed [seed={seed}]: {exc}") from None


@pytest.mark.parametrize("repeats", [1, 3])
def test_decode_gradients_match_reference(device, repeats, seed):
    gen = torch.Generator().manual_seed(seed)
    weights = WEIGHTS["odd"]
    boxes = random_boxes(gen, 9, dtype=torch.float64, device=device)
    rel = random_deltas(gen, 9 * repeats, 12, dtype=torch.float64, device=device)
    rel[0, 2] = CLIP * weights[2]  # exactly at the clip: torch.clamp passes no gradient there
    rel[1, 3] = 100.0
    upstream = torch.randn(rel.shape, generator=gen, dtype=torch.float64).to(device)

    def grads(module):
        r, b = rel.clone().requires_grad_(True), boxes.clone().requires_grad_(True)
        return torch.autograd.grad(module.box_decode(r, b, weights, CLIP), (r, b), upstream)

    got, want = grads(ops), grads(ref)
    if _clamp_passes_gradient_at_its_bound():
        # torch < 2.14 differentiates clamp(max=c) at x == c as 1, torch >= 2.14 as 0. fastdet's kernel is one build for
        # every torch and keeps the newer convention: no gradient through a size delta sitting exactly on the clip.
        want = (want[0].clone(), want[1])
        want[0][0, 2] = 0.0
    for g, w, name in zip(got, want, ("rel_codes", "boxes")):
        assert_close(g, w, seed=seed, what=f"d/d{name}", rtol=1e-10, atol=1e-9)


def _clamp_passes_gradient_at_its_bound() -> bool:
    x = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(x.clamp(max=1.0), x)
    return bool(grad != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_decode_gradient_low_precision(device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    boxes = random_boxes(gen, 16, dtype=dtype, device=device).requires_grad_(True)
    rel = random_deltas(gen, 16, 4, dtype=dtype, device=device).requires_grad_(True)
    ops.box_decode(rel, boxes).sum().backward()
    assert rel.grad.dtype == dtype and boxes.grad.dtype == dtype
    assert torch.isfinite(rel.grad).all() and torch.isfinite(boxes.grad).all()


def test_encode_gradcheck(device, seed):
    gen = torch.Generator().manual_seed(seed)
    gt = random_boxes(gen, 5, scale=20.0, max_side=10.0, dtype=torch.float64, device=device).requires_grad_(True)
    proposals = random_boxes(gen, 5, scale=20.0, max_side=10.0, dtype=torch.float64, device=device)
    proposals.requires_grad_(True)
    torch.autograd.gradcheck(lambda g, e: ops.box_encode(g, e, WEIGHTS["odd"]), (gt, proposals))


# --------------------------------------------------------------------------------------------------------------------
# decode_and_select
# --------------------------------------------------------------------------------------------------------------------


def dense_predictions(gen, B, N, C, *, device, dtype=torch.float32, ties=True, per_image_anchors=False):
    anchors = random_boxes(gen, B * N if per_image_anchors else N, dtype=dtype, device=device)
    anchors = anchors.reshape(B, N, 4) if per_image_anchors else anchors
    rel = random_deltas(gen, B * N, 4, dtype=dtype, device=device).reshape(B, N, 4)
    if ties:
        # scores on a coarse grid: many exact ties, including at the K-th value and at the threshold
        scores = torch.randint(0, 21, (B, N, C), generator=gen).to(torch.float64) / 20
    else:
        scores = torch.rand(B, N, C, generator=gen, dtype=torch.float64)
    return rel, anchors, scores.to(dtype).to(device)


def check_select(got, want, *, seed, what):
    boxes, scores, index, count = got
    w_boxes, w_scores, w_index, w_count = want
    assert torch.equal(index, w_index), f"{what}: candidate indices differ [seed={seed}]"
    assert torch.equal(count, w_count), f"{what}: counts differ [seed={seed}]"
    assert torch.equal(scores, w_scores), f"{what}: scores differ [seed={seed}]"
    # the gather-decode kernel uses the math library's exp (see fastdet.ops.box_coder), so ulps, not bits
    assert_close(boxes, w_boxes, seed=seed, what=f"{what} boxes",
                 **coordinate_tolerance(boxes.dtype, w_boxes, exact_on_cpu=False))


@pytest.mark.parametrize("top_k", [0, 1, 17, 200, 250])
@pytest.mark.parametrize("threshold", [0.5, -1.0, 0.05])
def test_decode_and_select_matches_reference(device, top_k, threshold, seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, C = 3, 200, 6
    rel, anchors, scores = dense_predictions(gen, B, N, C, device=device)
    scores[0, 5, 2] = float("nan")  # a NaN best score never passes
    scores[1, :, :] = 0.0  # an image whose every score ties (and fails a threshold >= 0)
    sizes = [(400, 500), (300, 320), (640, 480)]
    got = ops.decode_and_select(rel, anchors, scores, threshold, top_k, sizes, WEIGHTS["rcnn"])
    want = ref.decode_and_select(rel, anchors, scores, threshold, top_k, sizes, WEIGHTS["rcnn"])
    check_select(got, want, seed=seed, what=f"K={top_k} threshold={threshold}")
    boxes, cand_scores, index, count = got
    assert boxes.shape == (B, top_k, 4) and cand_scores.shape == (B, top_k, C) and index.shape == (B, top_k)
    assert (index[:, :].ge(0).sum(1) == count).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_decode_and_select_dtypes_and_layouts(device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    B, N, C = 2, 150, 3
    rel, anchors, scores = dense_predictions(gen, B, N, C, device=device, dtype=dtype, per_image_anchors=True)
    sizes = torch.tensor([[320, 400], [200, 250]], device=device)
    for sc in (scores, scores[..., 0]):  # [B, N, C] and one-class [B, N]
        got = ops.decode_and_select(rel, anchors, sc, 0.3, 40, sizes)
        want = ref.decode_and_select(rel, anchors, sc, 0.3, 40, sizes.tolist())
        check_select(got, want, seed=seed, what=f"{dtype} scores {tuple(sc.shape)}")
    got = ops.decode_and_select(rel, anchors, scores, 0.3, 40, None)  # no clipping
    want = ref.decode_and_select(rel, anchors, scores, 0.3, 40, None)
    check_select(got, want, seed=seed, what="unclipped")


def test_decode_and_select_threshold_is_exact(device):
    # 0.3 in float16 is 0.30004883 > 0.3: it passes a 0.3 threshold (exactly compared), and a score exactly equal to a
    # representable threshold does not (strictly greater).
    scores = torch.tensor([[[0.3], [0.25], [0.5]]], dtype=torch.float16, device=device)
    rel = torch.zeros(1, 3, 4, dtype=torch.float16, device=device)
    anchors = torch.tensor([[0, 0, 10, 10]] * 3, dtype=torch.float16, device=device)
    _, _, index, count = ops.decode_and_select(rel, anchors, scores, 0.3, 3)
    assert index.tolist() == [[2, 0, -1]] and count.tolist() == [2]
    _, _, index, _ = ops.decode_and_select(rel, anchors, scores, 0.25, 3)
    assert index.tolist() == [[2, 0, -1]]


def test_decode_and_select_order_and_padding(device):
    scores = torch.tensor([[[0.2, 0.9], [0.9, 0.1], [0.5, 0.5], [0.9, 0.0], [0.1, 0.0]]], device=device)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 5, device=device)
    rel = torch.zeros(1, 5, 4, device=device)
    boxes, cand, index, count = ops.decode_and_select(rel, anchors, scores, 0.3, 6, [(5, 8)])
    # best scores 0.9, 0.9, 0.5, 0.9, 0.1: ties at 0.9 by increasing index
    assert index.tolist() == [[0, 1, 3, 2, -1, -1]] and count.tolist() == [4]
    assert boxes[0, 0].tolist() == [0.0, 0.0, 8.0, 5.0]  # clipped to width 8, height 5
    assert boxes[0, 4:].eq(0).all() and torch.isneginf(cand[0, 4:]).all()


def test_decode_and_select_feeds_multiclass_nms(device, seed):
    gen = torch.Generator().manual_seed(seed)
    rel, anchors, scores = dense_predictions(gen, 2, 300, 4, device=device, ties=False)
    boxes, cand, _, _ = ops.decode_and_select(rel, anchors, scores, 0.05, 100, [(600, 600)] * 2)
    det_boxes, det_scores, labels, num = ops.multiclass_nms(boxes, cand, 0.05, 0.5, 20, 400)
    assert det_boxes.shape == (2, 20, 4) and num.le(20).all()
    assert torch.isfinite(det_scores).all()


def test_decode_and_select_empty(device):
    for B, N in ((0, 5), (2, 0)):
        rel = torch.zeros(B, N, 4, device=device)
        boxes, scores, index, count = ops.decode_and_select(rel, torch.zeros(N, 4, device=device),
                                                            torch.zeros(B, N, 3, device=device), 0.1, 4)
        assert boxes.shape == (B, 4, 4) and scores.shape == (B, 4, 3) and index.eq(-1).all() and count.eq(0).all()


# --------------------------------------------------------------------------------------------------------------------
# operator registration and torch.compile
# --------------------------------------------------------------------------------------------------------------------


def test_opcheck_box_coder_ops(device):
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.float16):
        boxes = random_boxes(gen, 5, dtype=dtype, device=device)
        rel = random_deltas(gen, 10, 8, dtype=dtype, device=device)
        grad_ok = dtype != torch.float16
        torch.library.opcheck(torch.ops.fastdet.box_decode.default,
                              (rel.requires_grad_(grad_ok), boxes.requires_grad_(grad_ok), [1.0, 2.0, 3.0, 4.0], CLIP))
        torch.library.opcheck(torch.ops.fastdet._box_decode_backward.default,
                              (torch.randn_like(rel), rel.detach(), boxes.detach(), [1.0, 2.0, 3.0, 4.0], CLIP),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        gt = random_boxes(gen, 5, dtype=dtype, device=device)
        torch.library.opcheck(torch.ops.fastdet.box_encode.default, (gt, boxes.detach(), [10.0, 10.0, 5.0, 5.0]))
        index = torch.tensor([[3, 0, -1], [4, -1, -1]], device=device)
        for sizes in (torch.tensor([[8.0, 9.0], [7.0, 6.0]], device=device), None):
            torch.library.opcheck(torch.ops.fastdet._decode_select_boxes.default,
                                  (rel.detach()[:10, :4].reshape(2, 5, 4), boxes.detach()[None], index, sizes,
                                   [1.0, 1.0, 1.0, 1.0], CLIP))


def test_compile_fullgraph_box_coder(device, seed):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    coder = ops.BoxCoder(WEIGHTS["rcnn"])

    def decode_loss(rel, boxes):
        return (coder.decode_single(rel * 1.0, boxes) - 1.0).abs().sum()

    def post_process(rel, anchors, scores):
        return ops.decode_and_select(rel, anchors, scores, 0.2, 16, [(300, 300)] * rel.shape[0])

    compiled_loss = torch.compile(decode_loss, fullgraph=True, backend="aot_eager")
    compiled_post = torch.compile(post_process, fullgraph=True, backend="aot_eager")
    for n in (12, 20):
        boxes = random_boxes(gen, n, dtype=torch.float64, device=device).requires_grad_(True)
        rel = random_deltas(gen, n, 4, dtype=torch.float64, device=device).requires_grad_(True)
        got = torch.autograd.grad(compiled_loss(rel, boxes), (rel, boxes))
        want = torch.autograd.grad(decode_loss(rel, boxes), (rel, boxes))
        for g, w in zip(got, want):
            assert_close(g, w, seed=seed, what="compiled decode gradient", rtol=1e-12, atol=1e-12)
        r, a, s = dense_predictions(gen, 2, n * 3, 3, device=device)
        for g, w in zip(compiled_post(r, a, s), post_process(r, a, s)):
            assert torch.equal(g, w), f"compiled decode_and_select differs [seed={seed}]"


# --------------------------------------------------------------------------------------------------------------------
# argument errors
# --------------------------------------------------------------------------------------------------------------------

_b = lambda n: torch.rand(n, 4)  # noqa: E731


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: ops.BoxCoder((1.0, 1.0, 1.0)), ValueError, r"weights must be 4 finite non-zero"),
        (lambda: ops.BoxCoder((1.0, 0.0, 1.0, 1.0)), ValueError, r"weights must be 4 finite non-zero"),
        (lambda: ops.BoxCoder((1.0, 1.0, 1.0, 1.0), bbox_xform_clip=float("nan")), ValueError, r"must not be NaN"),
        (lambda: ops.box_decode(torch.rand(6, 4), _b(4)), ValueError, r"multiple of the number of boxes"),
        (lambda: ops.box_decode(torch.rand(4, 5), _b(4)), ValueError, r"rel_codes must have shape \[R, 4 \* C\]"),
        (lambda: ops.box_decode(torch.rand(4, 4), torch.rand(4, 3)), ValueError, r"boxes must have shape \[N, 4\]"),
        (lambda: ops.box_decode(torch.rand(4, 4).long(), _b(4)), TypeError, r"rel_codes must be a floating-point"),
        (lambda: ops.box_decode(torch.rand(4, 4), _b(4).to("meta")), ValueError, r"same device"),
        (lambda: ops.box_encode(_b(3), _b(4)), ValueError, r"same number of boxes"),
        (lambda: ops.box_encode([[0, 0, 1, 1]], _b(1)), TypeError, r"must be a torch\.Tensor"),
        (lambda: ops.BoxCoder((1, 1, 1, 1)).decode(torch.rand(4, 4), _b(4)), TypeError, r"list or tuple"),
        (lambda: ops.decode_and_select(torch.rand(2, 5, 4), _b(5), torch.rand(2, 4, 3), 0.1, 3), ValueError,
         r"scores must have shape \[B, N, C\]"),
        (lambda: ops.decode_and_select(torch.rand(2, 5, 4), _b(6), torch.rand(2, 5, 3), 0.1, 3), ValueError,
         r"anchors must have shape"),
        (lambda: ops.decode_and_select(torch.rand(2, 5, 4), _b(5), torch.rand(2, 5, 0), 0.1, 3), ValueError,
         r"C >= 1"),
        (lambda: ops.decode_and_select(torch.rand(2, 5, 4), _b(5), torch.rand(2, 5, 3), 0.1, -1), ValueError,
         r"top_k must be a non-negative int"),
        (lambda: ops.decode_and_select(torch.rand(2, 5, 4), _b(5), torch.rand(2, 5, 3), float("nan"), 3), ValueError,
         r"score_threshold must not be NaN"),
        (lambda: ops.decode_and_select(torch.rand(2, 5, 4), _b(5), torch.rand(2, 5, 3), 0.1, 3, [(4, 4)]), ValueError,
         r"image_sizes must have shape \[B, 2\]"),
        (lambda: ops.decode_and_select(torch.rand(2, 5, 4), _b(5), torch.rand(2, 5, 3), 0.1, 3, [(4, -4)] * 2),
         ValueError, r"image_sizes must be non-negative"),
        (lambda: ops.decode_and_select(torch.rand(5, 4), _b(5), torch.rand(2, 5, 3), 0.1, 3), ValueError,
         r"rel_codes must have shape \[B, N, 4\]"),
    ],
    ids=["weights-3", "weights-zero", "clip-nan", "rows", "cols", "boxes-shape", "integer", "device", "encode-count",
         "not-tensor", "decode-list", "select-scores", "select-anchors", "select-no-classes", "select-top-k",
         "select-threshold", "select-sizes", "select-negative-size", "select-rank"],
)
def test_box_coder_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: torch.ops.fastdet.box_decode(torch.rand(4, 4), _b(4).double(), [1.0] * 4, CLIP), r"same dtype"),
        (lambda: torch.ops.fastdet.box_decode(torch.rand(4, 4), _b(4), [1.0] * 3, CLIP), r"weights must be 4"),
        (lambda: torch.ops.fastdet.box_decode(torch.rand(4, 4), _b(4), [1.0, 1.0, float("inf"), 1.0], CLIP),
         r"finite and non-zero"),
        (lambda: torch.ops.fastdet._decode_select_boxes(torch.rand(1, 3, 4), torch.rand(1, 3, 4),
                                                        torch.tensor([[3]]), None, [1.0] * 4, CLIP),
         r"index values must be in \[-1, 3\)"),
        (lambda: torch.ops.fastdet._decode_select_boxes(torch.rand(1, 3, 4), torch.rand(1, 3, 4),
                                                        torch.tensor([[0]], dtype=torch.int32), None, [1.0] * 4, CLIP),
         r"index must be an int64 tensor"),
        (lambda: torch.ops.fastdet.box_encode(_b(4), _b(4).double(), [1.0] * 4), r"same dtype"),
    ],
    ids=["dtype", "weights", "weights-inf", "index-range", "index-dtype", "encode-dtype"],
)
def test_native_box_coder_checks(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


@pytest.mark.cuda
def test_cuda_decode_select_bad_index_gives_nan_box():
    # CUDA cannot raise without a sync; a device assert would kill the context. A bad index gives a NaN box instead,
    # and the context stays usable.
    rel, anc = torch.rand(1, 3, 4, device="cuda"), torch.rand(1, 3, 4, device="cuda")
    index = torch.tensor([[3, 0, -1, -2]], device="cuda")
    out = torch.ops.fastdet._decode_select_boxes(rel, anc, index, None, [1.0] * 4, CLIP)
    assert out[0, [0, 3]].isnan().all() and out[0, 1].isfinite().all() and (out[0, 2] == 0).all()
    torch.cuda.synchronize()
    want = torch.ops.fastdet._decode_select_boxes(rel.cpu(), anc.cpu(), index[:, 1:3].cpu(), None, [1.0] * 4, CLIP)
    torch.testing.assert_close(out[:, 1:3].cpu(), want)


@pytest.mark.cuda
def test_cuda_paths_do_not_synchronise(seed):
    """decode_and_select (with tensor or list image sizes), a warm AnchorGenerator and decode must not wait on the
    device: torch's sync debug mode turns any synchronisation into an error."""
    device = "cuda"
    gen = torch.Generator().manual_seed(seed)
    rel, anchors, scores = dense_predictions(gen, 2, 500, 4, device=device)
    sizes = torch.tensor([[300, 400], [200, 200]], device=device)
    generator = ops.AnchorGenerator(((32,), (64,)), (0.5, 1.0, 2.0))

    class Images:
        tensors = torch.zeros(2, 3, 64, 64, device=device)
        image_sizes = [(64, 64)] * 2

    features = [torch.zeros(2, 1, 8, 8, device=device), torch.zeros(2, 1, 4, 4, device=device)]
    generator(Images, features)  # first call uploads the cell anchors once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.decode_and_select(rel, anchors, scores, 0.3, 64, sizes)
        ops.decode_and_select(rel, anchors, scores, 0.3, 64, [(300, 400), (200, 200)])
        generator(Images, features)
        generator(Images, [f[:, :, :6] for f in features])  # a new size: computed, still without a sync
        ops.box_decode(rel.reshape(-1, 4), anchors)
    finally:
        torch.cuda.set_sync_debug_mode(0)
