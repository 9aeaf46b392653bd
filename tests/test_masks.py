"""fastdet.ops mask ops (paste_masks_in_image, project_masks_on_boxes) against torchvision's Mask R-CNN functions and
the reference: values, dtypes, edge boxes, operator registration, torch.compile and bad input.

paste_masks_in_image: float32 is bitwise torchvision's for patches with h + w > 128 (torch's generic interpolation
kernel, whose arithmetic fastdet reproduces) and within a few ulps below that (torch switches to its channels-last
kernel for small outputs); other dtypes within a few ulps. project_masks_on_boxes: bitwise torchvision's on the
CPU. On CUDA, fastdet's kernels are compared with its CPU kernels. Every test draws fresh inputs from the ``seed`` fixture.
"""

from __future__ import annotations

import pytest
import torch

from fastdet import ops
from fastdet.ops import reference as ref

H, W = 90, 130


def tv_roi_heads():
    pytest.importorskip("torchvision", reason="torchvision is not installed; the torchvision parity case is skipped")
    from torchvision.models.detection import roi_heads

    return roi_heads


def assert_close(actual, expected, *, seed, what="", **tolerance):
    torch.testing.assert_close(actual, expected, equal_nan=True,
                               msg=lambda d: f"{what} [seed={seed}; replay with FASTDET_TEST_SEED={seed}]\n{d}",
                               **tolerance)


def random_boxes(gen, n, *, height=H, width=W, min_side=0.0, max_side=None, inside=False, dtype=torch.float32):
    """``[n, 4]`` boxes with sides from sub-pixel to about the image; corners spread beyond the image unless
    ``inside``."""
    max_side = max_side if max_side is not None else max(height, width)
    side = min_side + torch.rand(n, 2, generator=gen, dtype=torch.float64) * (max_side - min_side)
    if inside:
        xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * (torch.tensor([width, height]) - side).clamp(min=0)
    else:
        xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([width, height]) * 1.2 - side * 0.5
    return torch.cat([xy, xy + side], dim=1).to(dtype)


def torchvision_can_paste(boxes, masks, height, width, padding=1):
    """torchvision's slicing only works when every grown box overlaps the image (see the op's docstring)."""
    grown, ints = ref.masks._expanded_int_boxes(boxes, float(masks.shape[-1] + 2 * padding) / masks.shape[-1])
    x0, y0, x1, y1 = ints.unbind(1)
    return bool(((x0 < width) & (y0 < height) & (x1 >= 0) & (y1 >= 0)).all())


def patch_sizes(boxes, m, padding=1):
    _, ints = ref.masks._expanded_int_boxes(boxes, float(m + 2 * padding) / m)
    return (ints[:, 2] - ints[:, 0] + 1).clamp(min=1) + (ints[:, 3] - ints[:, 1] + 1).clamp(min=1)


# --------------------------------------------------------------------------------------------------------------------
# paste_masks_in_image
# --------------------------------------------------------------------------------------------------------------------


ULP = {torch.float32: 2.0**-23, torch.float64: 2.0**-52, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("m", [28, 14, 7])
def test_paste_matches_torchvision(dtype, m, seed):
    tv = tv_roi_heads()
    gen = torch.Generator().manual_seed(seed)
    n = 40
    masks = torch.rand(n, 1, m, m, generator=gen).to(dtype)
    boxes = random_boxes(gen, n, min_side=0.3)
    # keep torchvision on its defined cases: grown boxes overlapping the image
    _, ints = ref.masks._expanded_int_boxes(boxes, float(m + 2) / m)
    keep = (ints[:, 0] < W) & (ints[:, 1] < H) & (ints[:, 2] >= 0) & (ints[:, 3] >= 0)
    masks, boxes = masks[keep], boxes[keep]
    got = ops.paste_masks_in_image(masks, boxes, (H, W))
    want = tv.paste_masks_in_image(masks, boxes, (H, W))
    assert got.shape == want.shape and got.dtype == want.dtype
    # a few ulps of the largest value (1) where torch uses its small-output kernel (float64: torch's source positions
    # are rounded differently, an ulp of a position of up to ~M moves a value by up to M ulps of 1) ...
    atol = 64 * ULP[dtype] if dtype == torch.float64 else 8 * ULP[dtype]
    assert_close(got.double(), want.double(), seed=seed, what="pasted masks", rtol=0, atol=atol)
    # ... and bitwise where it uses the generic kernel fastdet reproduces
    big = patch_sizes(boxes, m) > 128
    if dtype == torch.float32:
        assert torch.equal(got[big], want[big]), f"seed={seed}"


def test_paste_large_image_many_detections_bitwise(seed):
    tv = tv_roi_heads()
    gen = torch.Generator().manual_seed(seed)
    height, width = 480, 640
    masks = torch.rand(100, 1, 28, 28, generator=gen)
    boxes = random_boxes(gen, 100, height=height, width=width, min_side=140, max_side=500, inside=True)
    got = ops.paste_masks_in_image(masks, boxes, (height, width))
    assert torch.equal(got, tv.paste_masks_in_image(masks, boxes, (height, width))), f"seed={seed}"


@pytest.mark.parametrize("padding", [0, 1, 3])
def test_paste_matches_reference_with_edge_boxes(device, padding, seed):
    gen = torch.Generator().manual_seed(seed)
    n, m = 60, 12
    masks = torch.rand(n, m, m, generator=gen)
    boxes = random_boxes(gen, n, min_side=0.0)
    # degenerate and adversarial boxes: zero size, inverted, fully outside on every side, covering the image,
    # sub-pixel, NaN / Inf
    boxes[0] = torch.tensor([5.0, 5.0, 5.0, 5.0])
    boxes[1] = torch.tensor([40.0, 30.0, 20.0, 10.0])
    boxes[2] = torch.tensor([W + 40.0, 5.0, W + 80.0, 40.0])
    boxes[3] = torch.tensor([-120.0, 5.0, -60.0, 40.0])
    boxes[4] = torch.tensor([5.0, -120.0, 40.0, -60.0])
    boxes[5] = torch.tensor([5.0, H + 40.0, 40.0, H + 80.0])
    boxes[6] = torch.tensor([-50.0, -50.0, W + 50.0, H + 50.0])
    boxes[7] = torch.tensor([10.2, 10.3, 10.4, 10.5])
    boxes[8] = torch.tensor([float("nan"), 1.0, 20.0, 20.0])
    boxes[9] = torch.tensor([1.0, 1.0, float("inf"), 20.0])
    boxes[10] = torch.tensor([1.0, 1.0, 1e30, 20.0])
    want = ref.paste_masks_in_image(masks, boxes, (H, W), padding=padding)
    got = ops.paste_masks_in_image(masks.to(device), boxes.to(device), (H, W), padding=padding).cpu()
    assert_close(got, want, seed=seed, what="pasted masks vs reference", rtol=0, atol=3 * ULP[torch.float32])
    assert not got[2:6].any() and not got[8:11].any(), "boxes outside the image or non-finite paste nothing"
    # 3-d masks are 4-d masks with the channel squeezed
    assert torch.equal(got, ops.paste_masks_in_image(masks[:, None].to(device), boxes.to(device), (H, W),
                                                     padding=padding).cpu())


def test_paste_non_contiguous_and_mixed_dtypes(seed):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(20, 1, 16, 16, generator=gen)
    boxes = random_boxes(gen, 20, inside=True, min_side=2)
    want = ops.paste_masks_in_image(masks, boxes, (H, W))
    t_masks = masks.transpose(2, 3).contiguous().transpose(2, 3)
    t_boxes = torch.cat([boxes, boxes], 1)[:, ::2]
    t_boxes = torch.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]], 1).t().contiguous().t()
    assert not t_masks.is_contiguous() and not t_boxes.is_contiguous()
    assert torch.equal(ops.paste_masks_in_image(t_masks, t_boxes, (H, W)), want)
    # float64 boxes with float32 masks: the box arithmetic runs in float64, the result stays float32
    tv = tv_roi_heads()
    got = ops.paste_masks_in_image(masks, boxes.double(), (H, W))
    assert got.dtype == torch.float32
    assert_close(got, tv.paste_masks_in_image(masks, boxes.double(), (H, W)), seed=seed, rtol=0,
                 atol=3 * ULP[torch.float32])


def test_paste_does_not_modify_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(5, 1, 8, 8, generator=gen)
    boxes = random_boxes(gen, 5)
    m0, b0 = masks.clone(), boxes.clone()
    ops.paste_masks_in_image(masks, boxes, (H, W))
    assert torch.equal(masks, m0) and torch.equal(boxes, b0)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0)])
def test_paste_empty(device, shape):
    masks = torch.rand(3, 1, 8, 8, device=device)
    boxes = torch.tensor([[1.0, 1, 4, 4]] * 3, device=device)
    assert ops.paste_masks_in_image(masks, boxes, shape).shape == (3, 1, *shape)
    empty = ops.paste_masks_in_image(masks[:0], boxes[:0], (H, W))
    assert empty.shape == (0, 1, H, W) and empty.device.type == device


def test_paste_bad_input_names_the_argument():
    masks, boxes = torch.rand(2, 1, 8, 8), torch.tensor([[1.0, 1, 4, 4]] * 2)
    with pytest.raises(ValueError, match="masks must have shape"):
        ops.paste_masks_in_image(torch.rand(2, 2, 8, 8), boxes, (H, W))
    with pytest.raises(ValueError, match="boxes must have shape"):
        ops.paste_masks_in_image(masks, boxes[:1], (H, W))
    with pytest.raises(TypeError, match="masks must be a floating-point"):
        ops.paste_masks_in_image(masks.to(torch.uint8), boxes, (H, W))
    with pytest.raises(ValueError, match="padding"):
        ops.paste_masks_in_image(masks, boxes, (H, W), padding=-1)
    with pytest.raises(TypeError, match="image_shape"):
        ops.paste_masks_in_image(masks, boxes, 5)
    with pytest.raises(ValueError, match="image_shape"):
        ops.paste_masks_in_image(masks, boxes, (-1, 4))
    with pytest.raises(RuntimeError, match="non-empty M x M"):
        torch.ops.fastdet.paste_masks_in_image(torch.rand(2, 1, 0, 0), boxes, H, W, 1)
    with pytest.raises(RuntimeError, match="padding must be in"):
        torch.ops.fastdet.paste_masks_in_image(masks, boxes, H, W, -2)


@pytest.mark.cuda
def test_paste_cuda_is_bitwise_the_cpu_kernel(seed):
    gen = torch.Generator().manual_seed(seed)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        masks = torch.rand(50, 1, 28, 28, generator=gen).to(dtype)
        boxes = random_boxes(gen, 50, min_side=0.5)
        want = ops.paste_masks_in_image(masks, boxes, (H, W))
        got = ops.paste_masks_in_image(masks.cuda(), boxes.cuda(), (H, W)).cpu()
        assert torch.equal(got, want), f"{dtype} seed={seed}"


# --------------------------------------------------------------------------------------------------------------------
# project_masks_on_boxes
# --------------------------------------------------------------------------------------------------------------------


def random_gt(gen, g, height=H, width=W, dtype=torch.bool):
    masks = torch.rand(g, height, width, generator=gen) > 0.6
    if dtype == torch.bool:
        return masks
    if dtype == torch.uint8:
        return masks.to(torch.uint8)
    return torch.rand(g, height, width, generator=gen).to(dtype)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float32],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("box_dtype", [torch.float32, torch.float64], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("m", [28, 14])
def test_project_matches_torchvision(mask_dtype, box_dtype, m, seed):
    tv = tv_roi_heads()
    gen = torch.Generator().manual_seed(seed)
    g, p = 6, 64
    gt = random_gt(gen, g, dtype=mask_dtype)
    boxes = random_boxes(gen, p, dtype=box_dtype)
    boxes[0] = torch.tensor([10.0, 10.0, 10.0, 10.0])  # zero size: forced to 1 x 1 (aligned=False)
    boxes[1] = torch.tensor([30.0, 30.0, 20.0, 20.0])  # inverted
    boxes[2] = torch.tensor([-300.0, -300.0, 900.0, 900.0])  # far larger than the masks
    idx = torch.randint(g, (p,), generator=gen)
    got = ops.project_masks_on_boxes(gt, boxes, idx, m)
    want = tv.project_masks_on_boxes(gt, boxes, idx, m)
    assert got.dtype == want.dtype == box_dtype and got.shape == (p, m, m)
    assert torch.equal(got, want), f"seed={seed}"


def test_project_matches_reference(device, seed):
    gen = torch.Generator().manual_seed(seed)
    gt = random_gt(gen, 4, dtype=torch.uint8)
    boxes = random_boxes(gen, 30)
    idx = torch.randint(4, (30,), generator=gen, dtype=torch.int32)
    want = ref.project_masks_on_boxes(gt, boxes, idx.long(), 28)
    got = ops.project_masks_on_boxes(gt.to(device), boxes.to(device), idx.to(device), 28).cpu()
    # the reference sums in another order (bitwise parity with torchvision is tested above)
    assert_close(got, want, seed=seed, what="projected masks vs reference", rtol=1e-6, atol=1e-6)


def test_project_non_contiguous_and_empty(device, seed):
    gen = torch.Generator().manual_seed(seed)
    gt = random_gt(gen, 3, height=W, width=H).transpose(1, 2)  # [3, H, W], not contiguous
    boxes = random_boxes(gen, 10).to(device)
    idx = torch.randint(3, (10,), generator=gen).to(device)
    assert torch.equal(ops.project_masks_on_boxes(gt.to(device), boxes, idx, 7),
                       ops.project_masks_on_boxes(gt.contiguous().to(device), boxes, idx, 7))
    out = ops.project_masks_on_boxes(gt.to(device), boxes[:0], idx[:0], 7)
    assert out.shape == (0, 7, 7)
    out = ops.project_masks_on_boxes(gt[:0].to(device), boxes[:0], idx[:0], 7)
    assert out.shape == (0, 7, 7)


def test_project_bad_input_names_the_argument():
    gt, boxes, idx = torch.zeros(2, 10, 10, dtype=torch.bool), torch.tensor([[1.0, 1, 4, 4]]), torch.tensor([0])
    with pytest.raises(RuntimeError, match=r"matched_idxs\[0\] = 2"):
        ops.project_masks_on_boxes(gt, boxes, torch.tensor([2]), 7)
    with pytest.raises(RuntimeError, match=r"matched_idxs\[0\] = -1"):
        ops.project_masks_on_boxes(gt, boxes, torch.tensor([-1]), 7)
    with pytest.raises(TypeError, match="matched_idxs must be an integer"):
        ops.project_masks_on_boxes(gt, boxes, idx.float(), 7)
    with pytest.raises(ValueError, match="gt_masks must have shape"):
        ops.project_masks_on_boxes(gt[0], boxes, idx, 7)
    with pytest.raises(TypeError, match="gt_masks must be a bool"):
        ops.project_masks_on_boxes(gt.to(torch.int32), boxes, idx, 7)
    with pytest.raises(ValueError, match="matched_idxs must have shape"):
        ops.project_masks_on_boxes(gt, boxes, torch.tensor([0, 1]), 7)
    with pytest.raises(RuntimeError, match="M .* must be in"):
        ops.project_masks_on_boxes(gt, boxes, idx, 0)


@pytest.mark.cuda
def test_project_bad_index_gives_zero_on_cuda():
    gt = torch.ones(2, 10, 10, dtype=torch.bool, device="cuda")
    boxes = torch.tensor([[1.0, 1, 4, 4], [1.0, 1, 4, 4]], device="cuda")
    out = ops.project_masks_on_boxes(gt, boxes, torch.tensor([0, 5], device="cuda"), 7)
    assert out[0].min() > 0 and not out[1].any()


# --------------------------------------------------------------------------------------------------------------------
# operator registration
# --------------------------------------------------------------------------------------------------------------------


def test_opcheck(device):
    gen = torch.Generator().manual_seed(0)
    masks = torch.rand(4, 1, 8, 8, generator=gen).to(device)
    boxes = random_boxes(gen, 4, min_side=1).to(device)
    torch.library.opcheck(torch.ops.fastdet.paste_masks_in_image.default, (masks, boxes, 20, 30, 1))
    gt = random_gt(gen, 3, 20, 30).to(device)
    idx = torch.tensor([0, 2, 1, 1], device=device)
    torch.library.opcheck(torch.ops.fastdet.project_masks_on_boxes.default, (gt, boxes, idx, 7))


def test_compile_dynamic(device, seed):
    gen = torch.Generator().manual_seed(seed)

    def f(masks, boxes, gt, idx):
        return ops.paste_masks_in_image(masks, boxes, (20, 30)), ops.project_masks_on_boxes(gt, boxes, idx, 7)

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    for n in (3, 6):
        masks = torch.rand(n, 1, 8, 8, generator=gen).to(device)
        boxes = random_boxes(gen, n, height=20, width=30, min_side=1).to(device)
        gt = random_gt(gen, 2, 20, 30).to(device)
        idx = torch.randint(2, (n,), generator=gen).to(device)
        for got, want in zip(compiled(masks, boxes, gt, idx), f(masks, boxes, gt, idx)):
            assert torch.equal(got, want), f"seed={seed}"
