"""Rotated boxes: box_convert's rotated formats and rotated box_iou against torchvision 0.29, nms_rotated and
batched_nms_rotated against the pure-PyTorch reference, operator registration and argument errors.

Every test draws fresh inputs from the ``seed`` fixture; failure messages carry the seed, and FASTDET_TEST_SEED=<seed>
replays it.
"""

from __future__ import annotations

import pytest
import torch

from fastdet import ops
from fastdet.ops import reference as ref

torchvision = pytest.importorskip("torchvision")
tv_ops = torchvision.ops

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
ROTATED = ("xywhr", "cxcywhr", "xyxyxyxy")
EDGE_ANGLES = (0.0, 90.0, 180.0, -45.0, 45.0, -90.0, 270.0, 360.0, 30.0)

# Rotated IoU of float32 boxes is computed in float32: a few ulps of 1 on random boxes (measured max ~4e-7 against the
# exact IoU over 3M random pairs).
F32_ATOL = 1e-6
# float64 boxes are computed in float64; the result is float32 (torchvision's dtype), so half an ulp of 1.
F64_ATOL = 6e-8
# torchvision's own kernel is not exact: over 3M random pairs its float64 results differed from the exact IoU by more
# than 1e-6 for 12 pairs (by up to 0.024, confirmed by area sampling), and by up to ~5e-7 elsewhere; its float32
# results are off by several percent more often. Comparisons with torchvision therefore allow that many outliers, and
# only where torchvision also disagrees with the independent reference.
TV_ATOL = 1e-6
TV_MAX_OUTLIER_FRACTION = 1e-3


def random_rotated(n: int, gen: torch.Generator, dtype=torch.float32, scale=50.0, min_side=1.0, max_side=20.0,
                   batch=None) -> torch.Tensor:
    """cxcywhr boxes: centres in [0, scale), sides in [min_side, max_side), angles in [-180, 180)."""
    lead = (batch,) if batch is not None else ()
    centre = torch.rand(*lead, n, 2, generator=gen, dtype=torch.float64) * scale
    sides = torch.rand(*lead, n, 2, generator=gen, dtype=torch.float64) * (max_side - min_side) + min_side
    angle = torch.rand(*lead, n, 1, generator=gen, dtype=torch.float64) * 360 - 180
    return torch.cat((centre, sides, angle), dim=-1).to(dtype)


def tv_iou_exact(boxes1: torch.Tensor, boxes2: torch.Tensor, fmt: str = "cxcywhr") -> torch.Tensor:
    """torchvision's rotated IoU evaluated in float64 (its float32 kernel is more often off by percents)."""
    return tv_ops.box_iou(boxes1.cpu().double(), boxes2.cpu().double(), fmt=fmt)


def assert_matches_torchvision(got: torch.Tensor, boxes1: torch.Tensor, boxes2: torch.Tensor, fmt: str = "cxcywhr",
                               msg: str = "") -> None:
    """got (float32) equals torchvision's float64 result to TV_ATOL except at torchvision's rare outliers (see
    TV_MAX_OUTLIER_FRACTION), where it must equal the reference instead."""
    got = got.cpu().double()
    expected = tv_iou_exact(boxes1, boxes2, fmt).double()
    outliers = (got - expected).abs() > TV_ATOL
    if outliers.any():
        b1 = ops.box_convert(boxes1.cpu().double(), fmt, "cxcywhr") if fmt != "cxcywhr" else boxes1.cpu().double()
        b2 = ops.box_convert(boxes2.cpu().double(), fmt, "cxcywhr") if fmt != "cxcywhr" else boxes2.cpu().double()
        exact = ref.box_iou_rotated(b1, b2).double()
        assert outliers.double().mean() <= TV_MAX_OUTLIER_FRACTION, f"{int(outliers.sum())} outliers {msg}"
        torch.testing.assert_close(got[outliers], exact[outliers], rtol=0, atol=F32_ATOL, msg=msg)


# --------------------------------------------------------------------------------------------------------- box_convert


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("in_fmt", ROTATED)
@pytest.mark.parametrize("out_fmt", ROTATED)
def test_box_convert_rotated_matches_torchvision(in_fmt, out_fmt, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    boxes = random_rotated(40, gen, torch.float64, scale=200.0, min_side=2.0, max_side=60.0)
    boxes[:len(EDGE_ANGLES), 4] = torch.tensor(EDGE_ANGLES, dtype=torch.float64)
    source = tv_ops.box_convert(boxes, "cxcywhr", in_fmt).to(dtype).reshape(2, 20, -1)  # leading dims too
    expected = tv_ops.box_convert(source, in_fmt, out_fmt)
    got = ops.box_convert(source, in_fmt, out_fmt)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=f"seed={seed}")
    if in_fmt == out_fmt:
        assert got.data_ptr() != source.data_ptr()  # a copy, as torchvision


@pytest.mark.parametrize("fmt", ["xywhr", "xyxyxyxy"])
def test_box_convert_rotated_round_trip(fmt, seed):
    gen = torch.Generator().manual_seed(seed)
    boxes = random_rotated(50, gen, torch.float64, min_side=1.0, max_side=30.0)
    # angles in (-180, 180]: atan2's range, so the round trip through xyxyxyxy returns the same angle
    boxes[:4, 4] = torch.tensor([0.0, 90.0, 180.0, -45.0], dtype=torch.float64)
    back = ops.box_convert(ops.box_convert(boxes, "cxcywhr", fmt), fmt, "cxcywhr")
    torch.testing.assert_close(back, boxes, rtol=0, atol=1e-9, msg=f"seed={seed}")


def test_box_convert_rotated_edge_angles_give_exact_corners():
    boxes = torch.tensor([[10.0, 20.0, 4.0, 2.0, 0.0], [10.0, 20.0, 4.0, 2.0, 90.0], [10.0, 20.0, 4.0, 2.0, 180.0]],
                         dtype=torch.float64)
    corners = ops.box_convert(boxes, "cxcywhr", "xyxyxyxy").reshape(3, 4, 2)
    expected = torch.tensor([
        [[8, 19], [12, 19], [12, 21], [8, 21]],  # unrotated: TL, TR, BR, BL (y down)
        [[9, 22], [9, 18], [11, 18], [11, 22]],  # 90 degrees counter-clockwise in the image: the top edge points up
        [[12, 21], [8, 21], [8, 19], [12, 19]],
    ], dtype=torch.float64)
    torch.testing.assert_close(corners, expected, rtol=0, atol=1e-12)


def test_box_convert_rotated_errors():
    boxes = torch.rand(3, 5)
    with pytest.raises(NotImplementedError, match="axis-aligned and a rotated"):
        ops.box_convert(boxes[:, :4], "xyxy", "cxcywhr")
    with pytest.raises(NotImplementedError, match="axis-aligned and a rotated"):
        ops.box_convert(boxes, "cxcywhr", "xyxy")
    with pytest.raises(ValueError, match=r"boxes in format 'xyxyxyxy' must have shape \[\.\.\., 8\]"):
        ops.box_convert(boxes, "xyxyxyxy", "cxcywhr")
    with pytest.raises(ValueError, match=r"must have shape \[\.\.\., 5\]"):
        ops.box_convert(boxes[:, :4], "xywhr", "cxcywhr")
    with pytest.raises(TypeError, match="boxes must be a torch.Tensor"):
        ops.box_convert([[0, 0, 1, 1, 0]], "xywhr", "cxcywhr")
    with pytest.raises(ValueError, match="in_fmt"):
        ops.box_convert(boxes, "xyxyr", "cxcywhr")


# ------------------------------------------------------------------------------------------------------- rotated IoU


@pytest.mark.parametrize("device", DEVICES)
def test_box_iou_rotated_random_matches_torchvision(device, seed):
    gen = torch.Generator().manual_seed(seed)
    b1 = random_rotated(120, gen)
    b2 = random_rotated(90, gen)
    exact = ref.box_iou_rotated(b1.double(), b2.double())  # an independent algorithm, in float64
    got = ops.box_iou(b1.to(device), b2.to(device), fmt="cxcywhr")
    assert got.dtype == torch.float32 and got.shape == (120, 90)
    assert (exact > 0).float().mean() > 0.05  # plenty of overlapping pairs
    torch.testing.assert_close(got.cpu(), exact, rtol=0, atol=F32_ATOL, msg=f"seed={seed}")
    assert_matches_torchvision(got, b1, b2, msg=f"seed={seed}")
    # float64 boxes: float64 computation, float32 result (torchvision's dtype)
    got64 = ops.box_iou(b1.double().to(device), b2.double().to(device), fmt="cxcywhr")
    assert got64.dtype == torch.float32
    torch.testing.assert_close(got64.cpu(), exact, rtol=0, atol=F64_ATOL, msg=f"seed={seed}")
    assert_matches_torchvision(got64, b1, b2, msg=f"seed={seed}")


def test_box_iou_rotated_where_torchvision_is_wrong():
    # A pair on which torchvision's float64 kernel returns 0.2165; the exact IoU (area sampling on a 3000 x 3000 grid
    # gives 0.22828) is what fastdet returns in float32 and float64.
    b1 = torch.tensor([[14.365899085998535, 47.02708435058594, 6.476978778839111, 17.742069244384766,
                        -51.53243637084961]])
    b2 = torch.tensor([[12.178001403808594, 40.29165267944336, 18.13849639892578, 14.442078590393066,
                        -83.66873931884766]])
    exact = 0.22828225253172693
    for dtype in (torch.float32, torch.float64):
        got = ops.box_iou(b1.to(dtype), b2.to(dtype), fmt="cxcywhr").item()
        assert abs(got - exact) < F32_ATOL
    assert abs(ref.box_iou_rotated(b1, b2).item() - exact) < F32_ATOL


@pytest.mark.parametrize("fmt", ["xywhr", "xyxyxyxy"])
@pytest.mark.parametrize("device", DEVICES)
def test_box_iou_rotated_other_formats(fmt, device, seed):
    gen = torch.Generator().manual_seed(seed)
    b1 = tv_ops.box_convert(random_rotated(40, gen, torch.float64), "cxcywhr", fmt)
    b2 = tv_ops.box_convert(random_rotated(30, gen, torch.float64), "cxcywhr", fmt)
    got = ops.box_iou(b1.to(device), b2.to(device), fmt=fmt)
    assert_matches_torchvision(got, b1, b2, fmt=fmt, msg=f"seed={seed}")


@pytest.mark.parametrize("device", DEVICES)
def test_box_iou_rotated_special_cases(device):
    boxes = torch.tensor([
        [0.0, 0.0, 2.0, 2.0, 0.0],
        [0.0, 0.0, 2.0, 2.0, 90.0],  # the same square
        [0.0, 0.0, 2.0, 2.0, 180.0],
        [0.0, 0.0, 2.0, 2.0, -45.0],  # a diamond: intersection 8 (sqrt 2 - 1), IoU 1 / sqrt 2
        [100.0, 100.0, 3.0, 1.0, 30.0],  # disjoint from all others
        [0.0, 0.0, 0.0, 2.0, 0.0],  # zero width
        [0.0, 0.0, 0.0, 0.0, 45.0],  # zero size
        [0.0, 0.0, -2.0, 2.0, 0.0],  # negative width: negative area
    ], dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        b = boxes.to(dtype).to(device)
        got = ops.box_iou(b, b, fmt="cxcywhr").cpu()
        expected = tv_ops.box_iou(boxes, boxes, fmt="cxcywhr")
        torch.testing.assert_close(got, expected, rtol=0, atol=F32_ATOL)
        torch.testing.assert_close(got[:3, :3], torch.ones(3, 3), rtol=0, atol=F32_ATOL)  # identical boxes -> 1
        torch.testing.assert_close(got[0, 3], torch.tensor(2**-0.5, dtype=torch.float32), rtol=0, atol=F32_ATOL)
        assert (got[4, :4] == 0).all() and (got[:4, 4] == 0).all()  # disjoint -> exactly 0
        assert (got[5:, :] == 0).all() and (got[:, 5:] == 0).all()  # degenerate -> 0, never NaN


@pytest.mark.parametrize("device", DEVICES)
def test_box_iou_rotated_never_exceeds_one(device, seed):
    gen = torch.Generator().manual_seed(seed)
    for dtype in (torch.float32, torch.float64):
        boxes = random_rotated(200, gen, dtype, scale=1000.0).to(device)
        self_iou = ops.box_iou(boxes, boxes, fmt="cxcywhr").diagonal()
        assert (self_iou <= 1).all() and (self_iou >= 1 - F32_ATOL).all(), f"seed={seed}"
        # so a threshold of 1 never suppresses, even exact duplicates
        twice = torch.cat((boxes, boxes))
        scores = torch.rand(400, generator=gen).to(device)
        assert len(ops.nms_rotated(twice, scores, 1.0)) == 400


@pytest.mark.parametrize("device", DEVICES)
def test_box_iou_rotated_axis_aligned_equals_box_iou(device, seed):
    gen = torch.Generator().manual_seed(seed)
    b1 = random_rotated(60, gen, torch.float64)
    b2 = random_rotated(50, gen, torch.float64)
    b1[:, 4] = 0.0
    b2[:, 4] = torch.where(torch.rand(50, generator=gen) < 0.5, 0.0, 180.0).double()
    plain = tv_ops.box_iou(b1[:, :4], b2[:, :4], fmt="cxcywh")
    got = ops.box_iou(b1.to(device), b2.to(device), fmt="cxcywhr").cpu()
    torch.testing.assert_close(got, plain.float(), rtol=0, atol=F64_ATOL, msg=f"seed={seed}")
    # 90 degrees with width and height swapped is the same axis-aligned box
    swapped = b2.clone()
    swapped[:, 2], swapped[:, 3], swapped[:, 4] = b2[:, 3], b2[:, 2], 90.0
    got90 = ops.box_iou(b1.to(device), swapped.to(device), fmt="cxcywhr").cpu()
    torch.testing.assert_close(got90, plain.float(), rtol=0, atol=F64_ATOL, msg=f"seed={seed}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("device", DEVICES)
def test_box_iou_rotated_low_precision_and_integer_inputs(dtype, device, seed):
    # torchvision rejects these dtypes; fastdet computes in float32 on the exactly widened values.
    gen = torch.Generator().manual_seed(seed)
    b1 = random_rotated(30, gen, torch.float64, scale=40.0, min_side=2.0).round().to(dtype)
    b2 = random_rotated(20, gen, torch.float64, scale=40.0, min_side=2.0).round().to(dtype)
    got = ops.box_iou(b1.to(device), b2.to(device), fmt="cxcywhr")
    assert got.dtype == torch.float32
    assert_matches_torchvision(got, b1.float(), b2.float(), msg=f"seed={seed}")


@pytest.mark.parametrize("device", DEVICES)
def test_box_iou_rotated_batched_and_broadcast(device, seed):
    gen = torch.Generator().manual_seed(seed)
    b1 = random_rotated(25, gen, batch=3).to(device)
    b2 = random_rotated(17, gen, batch=3).to(device)
    got = ops.box_iou(b1, b2, fmt="cxcywhr")
    assert got.shape == (3, 25, 17)
    for b in range(3):  # the batched form equals the 2-D form, bitwise
        assert torch.equal(got[b], ops.box_iou(b1[b], b2[b], fmt="cxcywhr"))
    broadcast = ops.box_iou(b1, b2[0], fmt="cxcywhr")  # [3, N, 5] x [M, 5]
    for b in range(3):
        assert torch.equal(broadcast[b], ops.box_iou(b1[b], b2[0], fmt="cxcywhr"))
    # the native op's own batched form
    assert torch.equal(torch.ops.fastdet.box_iou_rotated(b1, b2), got)


@pytest.mark.parametrize("device", DEVICES)
def test_box_iou_rotated_non_contiguous_and_empty(device, seed):
    gen = torch.Generator().manual_seed(seed)
    b1 = random_rotated(20, gen).to(device)
    b2 = random_rotated(15, gen).to(device)
    expected = ops.box_iou(b1, b2, fmt="cxcywhr")
    wide1 = torch.zeros(20, 10, device=device)
    wide1[:, ::2] = b1  # stride 2 along the coordinates
    b2_t = b2.t().contiguous().t()  # column-major
    b1_in, b2_in = wide1[:, ::2], b2_t
    assert not b1_in.is_contiguous() and not b2_in.is_contiguous()
    before1, before2 = b1_in.clone(), b2_in.clone()
    assert torch.equal(ops.box_iou(b1_in, b2_in, fmt="cxcywhr"), expected)
    assert torch.equal(b1_in, before1) and torch.equal(b2_in, before2)  # inputs untouched
    assert ops.box_iou(b1[:0], b2, fmt="cxcywhr").shape == (0, 15)
    assert ops.box_iou(b1, b2[:0], fmt="cxcywhr").shape == (20, 0)
    assert ops.box_iou(b1[:0], b2[:0], fmt="xywhr").shape == (0, 0)
    assert ops.box_iou(b1[None, :0], b2[None], fmt="cxcywhr").shape == (1, 0, 15)


def test_box_iou_rotated_errors():
    b = torch.rand(4, 5)
    with pytest.raises(ValueError, match=r"boxes1 in format 'cxcywhr' must have shape \[\.\.\., N, 5\]"):
        ops.box_iou(torch.rand(4, 4), b, fmt="cxcywhr")
    with pytest.raises(ValueError, match=r"boxes2 in format 'xyxyxyxy' must have shape \[\.\.\., N, 8\]"):
        ops.box_iou(torch.rand(4, 8), b, fmt="xyxyxyxy")
    with pytest.raises(ValueError, match=r"boxes1 .* must have shape"):
        ops.box_iou(torch.rand(5), b, fmt="cxcywhr")
    with pytest.raises(TypeError, match="boxes1 must be a real floating-point or integer tensor"):
        ops.box_iou(b.bool(), b, fmt="cxcywhr")
    with pytest.raises(ValueError, match="do not broadcast"):
        ops.box_iou(torch.rand(2, 4, 5), torch.rand(3, 4, 5), fmt="cxcywhr")
    with pytest.raises(ValueError, match="fmt"):
        ops.box_iou(b, b, fmt="cxcywhrr")
    op = torch.ops.fastdet.box_iou_rotated
    with pytest.raises(RuntimeError, match=r"boxes1 must have shape \[N, 5\] or \[B, N, 5\]"):
        op(torch.rand(4, 4), b)
    with pytest.raises(RuntimeError, match="boxes1 and boxes2 must have the same dtype"):
        op(b.double(), b)
    with pytest.raises(RuntimeError, match="same batch size"):
        op(torch.rand(2, 4, 5), torch.rand(3, 4, 5))
    with pytest.raises(RuntimeError, match="both be batched"):
        op(torch.rand(2, 4, 5), b)
    with pytest.raises(RuntimeError, match="boxes2 must be a floating-point tensor"):
        op(b, b.long())


# ------------------------------------------------------------------------------------------------------- nms_rotated


def clustered_rotated(n: int, gen: torch.Generator, dtype=torch.float64):
    """Boxes jittered around a few centres (so many pairs overlap) with random scores."""
    centres = random_rotated(max(1, n // 8), gen, torch.float64, scale=60.0, min_side=5.0, max_side=25.0)
    pick = torch.randint(0, centres.shape[0], (n,), generator=gen)
    boxes = centres[pick] + torch.randn(n, 5, generator=gen, dtype=torch.float64) * torch.tensor(
        [1.5, 1.5, 1.0, 1.0, 8.0], dtype=torch.float64)
    boxes[:, 2:4] = boxes[:, 2:4].abs() + 0.5
    scores = torch.rand(n, generator=gen, dtype=torch.float64)
    return boxes.to(dtype), scores.to(dtype)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("device", DEVICES)
def test_nms_rotated_matches_reference(threshold, device, seed):
    gen = torch.Generator().manual_seed(seed)
    boxes, scores = clustered_rotated(150, gen)
    expected = ref.nms_rotated(boxes, scores, threshold)
    got = ops.nms_rotated(boxes.to(device), scores.to(device), threshold)
    assert got.dtype == torch.int64
    assert got.cpu().tolist() == expected.tolist(), f"seed={seed}"
    assert 0 < len(expected) < 150 or threshold == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_nms_rotated_float32_matches_reference(device, seed):
    gen = torch.Generator().manual_seed(seed)
    boxes, scores = clustered_rotated(120, gen, torch.float32)
    threshold = 0.5
    # float32 IoU differs from the reference's float64 by ~1e-7: redraw pairs that sit on the threshold.
    ious = ref.box_iou_rotated(boxes.double(), boxes.double()).double()
    if ((ious - threshold).abs() < 1e-5).any():
        pytest.skip("a pair's IoU is within float32 rounding of the threshold")
    expected = ref.nms_rotated(boxes, scores, threshold)
    assert ops.nms_rotated(boxes.to(device), scores.to(device), threshold).cpu().tolist() == expected.tolist()
    for dtype in (torch.float16, torch.bfloat16):  # low-precision boxes: float32 IoU on the widened values
        b, s = boxes.to(dtype), scores.to(dtype)
        exp = ref.nms_rotated(b.double(), s, threshold)
        assert ops.nms_rotated(b.to(device), s.to(device), threshold).cpu().tolist() == exp.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_nms_rotated_ties_and_threshold_boundary(device):
    # Axis-aligned cases with exactly representable IoU: box 1 overlaps box 0 with IoU exactly 0.5 (kept at 0.5,
    # suppressed just below); equal scores are visited by increasing index.
    boxes = torch.tensor([
        [0.0, 0.0, 2.0, 1.0, 0.0],
        [0.5, 0.0, 1.0, 1.0, 0.0],  # inter 1, union 2: IoU 0.5 with box 0
        [0.5, 0.0, 1.0, 1.0, 90.0],  # box 1 rotated by 90 degrees: the same square
        [10.0, 10.0, 1.0, 1.0, 45.0],
    ])
    scores = torch.tensor([0.9, 0.9, 0.9, 0.9])
    for dtype in (torch.float32, torch.float64, torch.float16):
        b, s = boxes.to(dtype).to(device), scores.to(dtype).to(device)
        assert ops.nms_rotated(b, s, 0.5).cpu().tolist() == [0, 1, 3]  # 1 survives 0 (IoU == threshold), kills 2
        assert ops.nms_rotated(b, s, 0.4999).cpu().tolist() == [0, 3]
        assert ops.nms_rotated(b, s, 1.0).cpu().tolist() == [0, 1, 2, 3]
    assert ref.nms_rotated(boxes, scores, 0.5).tolist() == [0, 1, 3]
    flipped = torch.tensor([0.1, 0.9, 0.9, 0.2])
    assert ops.nms_rotated(boxes.to(device), flipped.to(device), 0.5).cpu().tolist() == [1, 3, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_batched_nms_rotated_matches_reference(device, seed):
    gen = torch.Generator().manual_seed(seed)
    boxes, scores = clustered_rotated(200, gen)
    idxs = torch.randint(-2, 3, (200,), generator=gen)  # negative categories too
    scores[:20] = scores[20:40]  # ties across and within categories
    expected = ref.batched_nms_rotated(boxes, scores, idxs, 0.4)
    got = ops.batched_nms_rotated(boxes.to(device), scores.to(device), idxs.to(device), 0.4)
    assert got.cpu().tolist() == expected.tolist(), f"seed={seed}"
    # one category == nms_rotated; categories separate (each category alone gives its own survivors)
    same = ops.batched_nms_rotated(boxes.to(device), scores.to(device), torch.zeros_like(idxs).to(device), 0.4)
    assert same.cpu().tolist() == ops.nms_rotated(boxes, scores, 0.4).tolist()
    for category in idxs.unique().tolist():
        members = (idxs == category).nonzero().flatten()
        alone = members[ops.nms_rotated(boxes[members], scores[members], 0.4)]
        assert sorted(alone.tolist()) == sorted(x for x in expected.tolist() if idxs[x] == category)
    # int32 categories
    got32 = ops.batched_nms_rotated(boxes.to(device), scores.to(device), idxs.int().to(device), 0.4)
    assert got32.cpu().tolist() == expected.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_nms_rotated_empty_and_degenerate(device):
    empty = torch.zeros(0, 5, device=device)
    assert ops.nms_rotated(empty, torch.zeros(0, device=device), 0.5).tolist() == []
    no_idxs = torch.zeros(0, dtype=torch.long, device=device)
    assert ops.batched_nms_rotated(empty, torch.zeros(0, device=device), no_idxs, 0.5).tolist() == []
    assert ops.box_iou(empty, empty, fmt="cxcywhr").shape == (0, 0)
    # zero-size boxes never suppress or get suppressed; NaN scores are visited first, as torch.sort places them
    boxes = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0, 10.0]],
                         device=device)
    scores = torch.tensor([0.5, 0.4, float("nan")], device=device)
    assert ops.nms_rotated(boxes, scores, 0.0).cpu().tolist() == [2, 0, 1]
    # a box with a NaN coordinate neither suppresses nor is suppressed
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0, 0.0], [float("nan"), 0.0, 2.0, 2.0, 0.0], [0.0, 0.0, 2.0, 2.0, 5.0]],
                         device=device)
    scores = torch.tensor([0.5, 0.9, 0.4], device=device)
    assert ops.nms_rotated(boxes, scores, 0.5).cpu().tolist() == [1, 0]
    assert ref.nms_rotated(boxes.cpu(), scores.cpu(), 0.5).tolist() == [1, 0]


def test_private_keep_flags_rejects_ungrouped_categories():
    boxes = torch.rand(1, 3, 5)
    with pytest.raises(RuntimeError, match="categories must be sorted within each image"):
        torch.ops.fastdet._nms_rotated_keep_flags(boxes, torch.tensor([[2, 1, 2]]), 0.5)


def test_nms_rotated_errors():
    boxes, scores = torch.rand(4, 5), torch.rand(4)
    cases = [
        (lambda: ops.nms_rotated(torch.rand(4, 4), scores, 0.5), RuntimeError, r"boxes must have shape \[N, 5\]"),
        (lambda: ops.nms_rotated(boxes[None], scores, 0.5), RuntimeError, r"boxes must have shape \[N, 5\]"),
        (lambda: ops.nms_rotated(boxes, torch.rand(3), 0.5), RuntimeError, r"scores must have shape \[4\]"),
        (lambda: ops.nms_rotated(boxes.long(), scores, 0.5), RuntimeError, "boxes must be a floating-point"),
        (lambda: ops.nms_rotated(boxes, scores.long(), 0.5), RuntimeError, "scores must be a floating-point"),
        (lambda: ops.nms_rotated(boxes, scores, -0.1), ValueError, "iou_threshold must be a non-negative"),
        (lambda: ops.nms_rotated(boxes, scores, float("nan")), ValueError, "iou_threshold must be a non-negative"),
        (lambda: ops.nms_rotated([1.0], scores, 0.5), TypeError, "boxes must be a torch.Tensor"),
        (lambda: ops.batched_nms_rotated(boxes, scores, torch.rand(4), 0.5), RuntimeError,
         "idxs must be an integer tensor"),
        (lambda: ops.batched_nms_rotated(boxes, scores, torch.zeros(5, dtype=torch.long), 0.5), RuntimeError,
         r"idxs must have shape \[4\]"),
        (lambda: ops.batched_nms_rotated(boxes, scores, None, 0.5), TypeError, "idxs must be a torch.Tensor"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()


# ------------------------------------------------------------------------------------------ registration and compile


def test_opcheck_rotated_ops(seed):
    gen = torch.Generator().manual_seed(seed)
    b1, b2 = random_rotated(12, gen), random_rotated(9, gen)
    torch.library.opcheck(torch.ops.fastdet.box_iou_rotated, (b1, b2))
    torch.library.opcheck(torch.ops.fastdet.box_iou_rotated, (b1[None].repeat(2, 1, 1), b2[None].repeat(2, 1, 1)))
    torch.library.opcheck(torch.ops.fastdet._box_iou_rotated_kernel, (b1[None], b2[None]))
    boxes, scores = clustered_rotated(40, gen, torch.float32)
    idxs = torch.randint(0, 3, (40,), generator=gen)
    dynamic_tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.fastdet.nms_rotated, (boxes, scores, 0.5), test_utils=dynamic_tests)
    torch.library.opcheck(torch.ops.fastdet.batched_nms_rotated, (boxes, scores, idxs, 0.5), test_utils=dynamic_tests)
    torch.library.opcheck(torch.ops.fastdet._nms_rotated_keep_flags, (boxes[None], None, 0.5))


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_rotated(dynamic, seed):
    gen = torch.Generator().manual_seed(seed)

    def iou(a, b):
        return ops.box_iou(a, b, fmt="cxcywhr") * 2

    compiled = torch.compile(iou, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for n, m in ((30, 20), (17, 25)):
        b1, b2 = random_rotated(n, gen), random_rotated(m, gen)
        assert torch.equal(compiled(b1, b2), iou(b1, b2))

    def post(boxes, scores, idxs):
        return boxes[ops.nms_rotated(boxes, scores, 0.5)], ops.batched_nms_rotated(boxes, scores, idxs, 0.5)

    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    try:
        compiled_post = torch.compile(post, fullgraph=True, dynamic=dynamic, backend="aot_eager")
        for n in (60, 45):
            boxes, scores = clustered_rotated(n, gen, torch.float32)
            idxs = torch.randint(0, 3, (n,), generator=gen)
            for got, expected in zip(compiled_post(boxes, scores, idxs), post(boxes, scores, idxs)):
                assert torch.equal(got, expected)
    finally:
        torch._dynamo.config.capture_dynamic_output_shape_ops = False


def test_export_rotated_with_dynamic_box_count(seed):
    gen = torch.Generator().manual_seed(seed)

    class Post(torch.nn.Module):
        def forward(self, boxes, scores, idxs):
            return ops.batched_nms_rotated(boxes, scores, idxs, 0.5), ops.box_iou(boxes, boxes, fmt="cxcywhr")

    n = torch.export.Dim("n", min=2)
    boxes, scores = clustered_rotated(40, gen, torch.float32)
    idxs = torch.randint(0, 3, (40,), generator=gen)
    exported = torch.export.export(Post(), (boxes, scores, idxs), dynamic_shapes=({0: n}, {0: n}, {0: n}))
    boxes, scores = clustered_rotated(25, gen, torch.float32)
    idxs = torch.randint(0, 3, (25,), generator=gen)
    for got, expected in zip(exported.module()(boxes, scores, idxs), Post()(boxes, scores, idxs)):
        assert torch.equal(got, expected)
