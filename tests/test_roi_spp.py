"""fastdet.ops.roi_spp (SPP-Net spatial pyramid pooling over RoIs) against the composition it replaces,
``torch.cat([roi_pool(x, boxes, (l, l), s).flatten(1) for l in levels], 1)`` (fastdet's roi_pool always, torchvision's
when installed), and against the independent reference: values, gradients, layouts, dtypes, adversarial boxes,
operator registration, torch.compile / export, determinism and bad input.

The forward is a maximum (exact in every dtype), so it must equal the composition bit for bit on every device and
dtype (16-bit maps: torchvision's float32 result rounded once). Gradients sum the same terms in another order than the
composition's (level after level), so they agree to rounding; with ones as the output gradient they are exact.
"""

from __future__ import annotations

import time

import pytest
import torch

from fastdet import ops
from fastdet.ops import reference as ref
from tests.test_roi import (ALL_DTYPES, BACKWARD_UTILS, C, H, LAYOUTS, LOW_PRECISION, SCALE, N, W, assert_close,
                            random_features, random_rois, torchvision_ops, with_layout)

LEVELS = pytest.mark.parametrize("levels", [(1, 2, 4), (1, 2, 3, 6), (3,), (2, 2)], ids=str)


def composition(pool, x, rois, levels, scale=SCALE):
    """The reference composition: one roi_pool per level, flattened and concatenated."""
    return torch.cat([pool(x, rois, (l, l), scale).flatten(1) for l in levels], dim=1)


def adversarial_rois(gen, k, device="cpu"):
    """Random boxes plus the cases roi_pool's quantisation makes interesting: boxes entirely outside the map (empty
    bins), zero-size and sub-pixel boxes, flipped boxes, half-pixel corners (rounding ties) and boxes larger than
    the map."""
    rois = random_rois(gen, k)
    img_h, img_w = H / SCALE, W / SCALE
    extra = torch.tensor([
        [0, -50, -50, -20, -20],  # left of and above the map
        [1, img_w + 10, 5, img_w + 40, 9],  # right of the map
        [0, 6, 6, 6, 6],  # zero size
        [1, 7.2, 3.1, 7.3, 3.2],  # sub-pixel
        [0, 20, 18, 4, 2],  # flipped in both axes
        [1, 9, 2, 3, 15],  # flipped in x
        [0, 1.0, 3.0, 9.0, 11.0],  # half-pixel corners after scaling by 0.5 (round half away from zero)
        [1, -1.0, -3.0, 5.0, 7.0],  # negative half-pixel corners
        [0, -100, -100, 1000, 1000],  # covers the whole map and more
        [1, 0, 0, img_w, img_h],  # exactly the map
    ], dtype=rois.dtype)
    return torch.cat([rois, extra]).to(device)


def distinct_features(gen, *shape, dtype=torch.float64, device="cpu"):
    """Features without ties inside any plane (a permutation of spaced values), so the argmax is unique and the
    numerical gradient of gradcheck is the analytical one."""
    planes = shape[0] * shape[1]
    values = torch.stack([torch.randperm(shape[2] * shape[3], generator=gen) for _ in range(planes)])
    return (values.to(dtype) * 0.1 - 2.0).reshape(shape).to(device)


# --------------------------------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------------------------------


@LEVELS
@LAYOUTS
@ALL_DTYPES
def test_matches_roi_pool_composition_and_reference(device, dtype, layout, levels, seed):
    gen = torch.Generator().manual_seed(seed)
    x = with_layout(random_features(gen, N, C, H, W, dtype=dtype, device=device), layout)
    rois = adversarial_rois(gen, 40, device=device)
    got = ops.roi_spp(x, rois, levels, SCALE)
    assert got.shape == (rois.shape[0], C * sum(l * l for l in levels)) and got.dtype == dtype
    assert_close(got, composition(ops.roi_pool, x, rois, levels), seed=seed, what="vs fastdet roi_pool", rtol=0,
                 atol=0)
    assert_close(got, ref.roi_spp(x, rois, levels, SCALE), seed=seed, what="vs reference", rtol=0, atol=0)
    if device == "cpu" or dtype not in LOW_PRECISION:
        tv = torchvision_ops()
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        want = composition(tv.roi_pool, x.detach().cpu().to(acc), rois.cpu().to(acc), levels).to(dtype)
        assert_close(got.cpu(), want, seed=seed, what="vs torchvision roi_pool", rtol=0, atol=0)


@LEVELS
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_gradient_matches_composition_and_reference(device, dtype, layout, levels, seed):
    gen = torch.Generator().manual_seed(seed)
    x = with_layout(random_features(gen, N, C, H, W, dtype=dtype, device=device), layout).requires_grad_(True)
    rois = adversarial_rois(gen, 40, device=device)
    out = ops.roi_spp(x, rois, levels, SCALE)
    grad_out = random_features(gen, *out.shape, dtype=dtype, device=device)
    (got,) = torch.autograd.grad(out, x, grad_out)
    assert got.dtype == dtype and got.shape == x.shape
    assert got.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                             torch.contiguous_format)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    (want,) = torch.autograd.grad(composition(ops.roi_pool, x, rois, levels), x, grad_out)
    assert_close(got, want, seed=seed, what="gradient vs fastdet roi_pool", **tol)
    (want_ref,) = torch.autograd.grad(ref.roi_spp(x, rois, levels, SCALE), x, grad_out)
    assert_close(got, want_ref, seed=seed, what="gradient vs reference", **tol)
    tv = torchvision_ops()
    xc = x.detach().cpu().requires_grad_(True)
    (want_tv,) = torch.autograd.grad(composition(tv.roi_pool, xc, rois.cpu().to(dtype), levels), xc,
                                   grad_out.cpu())
    assert_close(got.cpu(), want_tv, seed=seed, what="gradient vs torchvision roi_pool", **tol)


@pytest.mark.parametrize("levels", [(1, 2, 3, 6), (1, 2, 4), (4, 2, 1), (2, 4, 8), (6, 3, 2, 1), (2, 2), (5, 1)],
                         ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_ties_send_the_gradient_to_the_first_maximum(device, levels, layout, seed):
    # Small integer values: many ties inside every bin, plus values that never win (NaN, -inf, -FLT_MAX: a bin of only
    # those pools to -FLT_MAX with no argmax). With ones as the output gradient every sum is exact, so the gradient
    # must equal the composition's bit for bit (first maximum in row-major order, as roi_pool), whatever the levels'
    # order, nesting or repetition. 20 channels: one full block of the CPU kernels' 16 and a partial one.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (N, 20, H, W), generator=gen).float()
    never = torch.tensor([float("nan"), float("-inf"), -torch.finfo(torch.float32).max])
    pick = torch.rand(x.shape, generator=gen)
    x = torch.where(pick < 0.15, never[torch.randint(0, 3, x.shape, generator=gen)], x)
    x[0, 0, : H // 2] = float("-inf")  # whole bins without a winner
    x = with_layout(x.to(device), layout).requires_grad_(True)
    rois = adversarial_rois(gen, 30, device=device)
    out = ops.roi_spp(x, rois, levels, SCALE)
    assert torch.equal(out, composition(ops.roi_pool, x, rois, levels)), f"seed={seed}"
    (got,) = torch.autograd.grad(out.sum(), x)  # grad is an expanded (stride-0) tensor: read through its strides
    (want,) = torch.autograd.grad(composition(ops.roi_pool, x, rois, levels).sum(), x)
    assert torch.equal(got, want), f"seed={seed}"
    (want_ref,) = torch.autograd.grad(ref.roi_spp(x, rois, levels, SCALE).sum(), x)
    assert torch.equal(got, want_ref), f"seed={seed}"


@pytest.mark.parametrize("boxes_as", ["tensor", "list"])
def test_box_formats_and_module_agree(device, boxes_as, seed):
    gen = torch.Generator().manual_seed(seed)
    x = random_features(gen, N, C, H, W, device=device)
    per_image = [random_rois(gen, 5 + i, device=device)[:, 1:] for i in range(N)]
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(per_image)])
    boxes = rois if boxes_as == "tensor" else per_image
    want = composition(ops.roi_pool, x, rois, (1, 2, 4))
    assert torch.equal(ops.roi_spp(x, boxes, (1, 2, 4), SCALE), want)
    module = ops.RoISPP((1, 2, 4), SCALE)
    assert torch.equal(module(x, boxes), want)
    assert module.output_channels(C) == want.shape[1]
    assert repr(module) == f"RoISPP(levels=(1, 2, 4), spatial_scale={SCALE})"
    assert torch.equal(ops.roi_spp(x, boxes, 2, SCALE), composition(ops.roi_pool, x, rois, (2,)))


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "huge"])
def test_non_finite_and_huge_boxes_have_roi_pools_output(device, bad):
    x = torch.randn(N, C, H, W, device=device, requires_grad=True)
    v = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 3e38}[bad]
    rois = torch.tensor([[0.0, 1, 1, 5, 5], [1.0, v, 1, 5, 5], [0.0, 1, 1, 5, v], [1.0, 0, 0, v, v]], device=device)
    started = time.perf_counter()
    out = ops.roi_spp(x, rois, (1, 2, 4))
    assert torch.equal(out, composition(ops.roi_pool, x, rois, (1, 2, 4), 1.0))
    assert torch.equal(out, ref.roi_spp(x, rois, (1, 2, 4)))
    if bad != "huge":
        assert torch.equal(out[1:], torch.zeros_like(out[1:]))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(grad).all()
    assert time.perf_counter() - started < 10.0


def test_nan_features_never_win(device):
    x = torch.randn(1, 2, 6, 6, device=device)
    x[0, 0, :3, :3] = float("nan")
    x[0, 1] = float("nan")
    rois = torch.tensor([[0.0, 0, 0, 5, 5]], device=device)
    out = ops.roi_spp(x, rois, (1, 2))
    assert torch.equal(out, composition(ops.roi_pool, x, rois, (1, 2), 1.0))
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("boxes", ["tensor", "list", "list-of-empty"])
def test_empty_box_sets(device, boxes):
    x = torch.randn(N, C, H, W, device=device, requires_grad=True)
    arg = {"tensor": torch.zeros(0, 5, device=device), "list": [torch.zeros(0, 4, device=device)],
           "list-of-empty": [torch.zeros(0, 4, device=device)] * N}[boxes]
    out = ops.roi_spp(x, arg, (1, 2, 4))
    assert out.shape == (0, C * 21)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_feature_maps(device, shape, layout):
    x = torch.zeros(shape, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    rois = torch.tensor([[0.0, 1, 1, 5, 5], [1.0, 0, 0, 2, 3]], device=device)
    out = ops.roi_spp(x, rois, (1, 2))
    assert torch.equal(out, torch.zeros(2, shape[1] * 5, device=device))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.shape == x.shape


# --------------------------------------------------------------------------------------------------------------------
# gradients, operator registration, torch.compile / export
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck(device, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    x = with_layout(distinct_features(gen, N, 2, 8, 9, device=device), layout).requires_grad_(True)
    rois = random_rois(gen, 7, height=8, width=9, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda t: ops.roi_spp(t, rois, (1, 2, 3), SCALE), (x,), eps=1e-3, atol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(device, layout):
    gen = torch.Generator().manual_seed(0)
    x = with_layout(random_features(gen, N, C, H, W, device=device), layout).requires_grad_(True)
    rois = random_rois(gen, 6, device=device)
    torch.library.opcheck(torch.ops.fastdet.roi_spp.default, (x, rois, [1, 2, 4], SCALE))
    out, argmax = torch.ops.fastdet.roi_spp(x, rois, [1, 2, 4], SCALE)
    assert argmax.shape == (6, C, 21) and argmax.dtype == torch.int32
    args = (torch.randn_like(out), rois, argmax, [1, 2, 4], SCALE, N, C, H, W, layout == "channels_last")
    torch.library.opcheck(torch.ops.fastdet._roi_spp_backward.default, args, test_utils=BACKWARD_UTILS)


def test_compile_dynamic_and_export(device, seed):
    torch._dynamo.reset()

    def head(x, rois):
        return ops.roi_spp(x * 1.0, rois, (1, 2, 4), SCALE).relu() * 2.0

    compiled = torch.compile(head, fullgraph=True, dynamic=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(seed)
    for k in (5, 9):
        x = random_features(gen, N, C, H, W, device=device).requires_grad_(True)
        rois = random_rois(gen, k, device=device)
        got = compiled(x, rois)
        want = head(x, rois)
        assert_close(got, want, seed=seed, what="compiled output", rtol=0, atol=0)
        assert_close(torch.autograd.grad(got.sum(), x)[0], torch.autograd.grad(want.sum(), x)[0], seed=seed,
                     what="compiled gradient", rtol=1e-6, atol=1e-6)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.spp = ops.RoISPP((1, 2, 3, 6), SCALE)

        def forward(self, x, rois):
            return self.spp(x, rois)

    x = random_features(gen, N, C, H, W, device=device)
    rois = random_rois(gen, 6, device=device)
    k = torch.export.Dim("k", min=1, max=1024)
    exported = torch.export.export(Head(), (x, rois), dynamic_shapes={"x": None, "rois": {0: k}})
    more = random_rois(gen, 11, device=device)
    assert torch.equal(exported.module()(x, more), ops.roi_spp(x, more, (1, 2, 3, 6), SCALE))


def test_autocast_matches_float32_boxes(device, seed):
    if not torch.amp.is_autocast_available(device):
        pytest.skip(f"no autocast on {device}")
    gen = torch.Generator().manual_seed(seed)
    x = random_features(gen, N, C, H, W, dtype=torch.bfloat16, device=device)
    rois = random_rois(gen, 12, dtype=torch.bfloat16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = ops.roi_spp(x, rois, (1, 2, 4), SCALE)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ops.roi_spp(x, rois.float(), (1, 2, 4), SCALE))


# --------------------------------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def test_deterministic_backward_is_bitwise_reproducible(device, deterministic, seed):
    gen = torch.Generator().manual_seed(seed)
    x = random_features(gen, N, 16, H, W, device=device).requires_grad_(True)
    rois = random_rois(gen, 300, device=device)
    runs = []
    for _ in range(3):
        out = ops.roi_spp(x, rois, (1, 2, 3, 6), SCALE)
        runs.append(torch.autograd.grad(out, x, torch.ones_like(out) * 0.1)[0])
    assert all(torch.equal(runs[0], r) for r in runs[1:]), f"backward is not reproducible [seed={seed}]"


@pytest.mark.cuda
def test_cuda_matches_cpu_and_both_backward_modes_agree(seed):
    gen = torch.Generator().manual_seed(seed)
    x = random_features(gen, N, 16, H, W)
    rois = adversarial_rois(gen, 200)
    levels = (1, 2, 3, 6)
    xc = x.cuda().requires_grad_(True)
    out = ops.roi_spp(xc, rois.cuda(), levels, SCALE)
    assert torch.equal(out.cpu(), ops.roi_spp(x, rois, levels, SCALE))
    grad_out = random_features(gen, *out.shape).cuda()
    (atomic,) = torch.autograd.grad(out, xc, grad_out, retain_graph=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        (gather,) = torch.autograd.grad(out, xc, grad_out)
    finally:
        torch.use_deterministic_algorithms(previous)
    xcpu = x.clone().requires_grad_(True)
    (cpu,) = torch.autograd.grad(ops.roi_spp(xcpu, rois, levels, SCALE), xcpu, grad_out.cpu())
    assert_close(gather.cpu(), cpu, seed=seed, what="deterministic CUDA vs CPU", rtol=0, atol=0)
    assert_close(atomic.cpu(), cpu, seed=seed, what="atomic CUDA vs CPU", rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_bad_batch_index_pools_zero_on_cuda():
    x = torch.randn(N, C, H, W, device="cuda")
    rois = torch.tensor([[5.0, 1, 1, 5, 5], [0.0, 1, 1, 5, 5]], device="cuda")
    out = ops.roi_spp(x, rois, (1, 2))
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1:], composition(ops.roi_pool, x, rois[1:], (1, 2), 1.0))


# --------------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels, message", [
    ((), "levels must hold 1 to 16"),
    ((1, 0, 2), r"levels\[1\] must be a positive"),
    ((-2,), r"levels\[0\] must be a positive"),
    ((65,), r"levels\[0\] must be a positive number of bins per side \(at most 64\)"),
    ((64, 2), "levels must have at most 4096 bins"),
    (tuple([1] * 17), "levels must hold 1 to 16"),
], ids=["empty", "zero", "negative", "too-fine", "too-many-bins", "too-many-levels"])
def test_bad_levels_are_clear_errors(levels, message):
    x = torch.randn(N, C, H, W)
    rois = torch.tensor([[0.0, 1, 1, 5, 5]])
    with pytest.raises(RuntimeError, match=message):
        ops.roi_spp(x, rois, levels)


@pytest.mark.parametrize("levels", [(1.0, 2), "124", (True, 2), None, [2, None]], ids=str)
def test_non_integer_levels_are_type_errors(levels):
    with pytest.raises(TypeError, match="levels must be an int or a sequence of ints"):
        ops.roi_spp(torch.randn(N, C, H, W), torch.tensor([[0.0, 1, 1, 5, 5]]), levels)


def test_bad_arguments_are_clear_errors():
    x = torch.randn(N, C, H, W)
    rois = torch.tensor([[0.0, 1, 1, 5, 5]])
    with pytest.raises(Exception, match="features must have shape"):
        ops.roi_spp(x[0], rois)
    with pytest.raises(Exception, match="features must be a floating-point"):
        ops.roi_spp(x.long(), rois)
    with pytest.raises(Exception, match="boxes must be a Tensor"):
        ops.roi_spp(x, rois[:, 1:])
    with pytest.raises(RuntimeError, match="spatial_scale must be a positive finite number"):
        ops.roi_spp(x, rois, (1, 2), 0.0)
    with pytest.raises(RuntimeError, match="spatial_scale must be a positive finite number"):
        ops.roi_spp(x, rois, (1, 2), float("nan"))
    for index in (-1.0, 2.0, float("nan")):
        with pytest.raises(RuntimeError, match="is not a valid batch index"):
            ops.roi_spp(x, torch.tensor([[index, 1, 1, 5, 5]]), (1, 2))
    out, argmax = torch.ops.fastdet.roi_spp(x, rois, [1, 2], 1.0)
    with pytest.raises(RuntimeError, match=r"grad must have shape \[K, C \* sum\(l \* l\)\]"):
        torch.ops.fastdet._roi_spp_backward(out[:, :-1], rois, argmax, [1, 2], 1.0, N, C, H, W, False)
    with pytest.raises(RuntimeError, match="argmax must be an int32 tensor"):
        torch.ops.fastdet._roi_spp_backward(out, rois, argmax.long(), [1, 2], 1.0, N, C, H, W, False)
    with pytest.raises(RuntimeError, match="levels must hold"):
        torch.ops.fastdet._roi_spp_backward(out, rois, argmax, [], 1.0, N, C, H, W, False)


def test_inputs_are_not_modified(device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = random_features(gen, N, C, H, W, device=device)
    rois = adversarial_rois(gen, 10, device=device)
    x0, rois0 = x.clone(), rois.clone()
    ops.roi_spp(x, rois, (1, 2, 4), SCALE)
    assert torch.equal(x, x0) and torch.equal(rois, rois0)


def test_fx_symbolic_trace_keeps_roi_spp_a_leaf(seed):
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.spp = ops.RoISPP((1, 2, 4), SCALE)

        def forward(self, x, rois):
            return self.spp(x, rois).relu() + ops.roi_spp(x, rois, (2,), SCALE).sum(dim=1, keepdim=True)

    traced = torch.fx.symbolic_trace(Head())
    names = [getattr(node.target, "__name__", "") for node in traced.graph.nodes if node.op == "call_function"]
    assert names.count("roi_spp") == 2, names
    gen = torch.Generator().manual_seed(seed)
    x = random_features(gen, N, C, H, W)
    rois = random_rois(gen, 7)
    assert torch.equal(traced(x, rois), Head()(x, rois))
