"""fastdet.ops RoI ops (roi_align, roi_pool, multi_scale_roi_align and their modules) against the reference (always)
and torchvision (when installed): values, gradients, layouts, dtypes, operator registration, torch.compile,
determinism and bad input.

On the CPU, float32/float64 results and gradients must be *bitwise* torchvision's; float16/bfloat16 results must be
torchvision's float32 result rounded once (fastdet accumulates in float32). On CUDA (FMA contraction, atomics) they
agree to rounding. Every test draws fresh inputs from the ``seed`` fixture; FASTDET_TEST_SEED=<seed> replays one.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from fastdet import ops
from fastdet.ops import reference as ref
from fastdet.ops.roi import check_rois, fpn_levels

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
ORACLES = pytest.mark.parametrize("oracle", ["reference", "torchvision"])
LAYOUTS = pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])

N, C, H, W = 2, 3, 12, 15
SCALE = 0.5  # boxes live in a 2x larger "image"


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def torchvision_ops():
    pytest.importorskip("torchvision", reason="torchvision is not installed; the torchvision parity case is skipped")
    import torchvision.ops

    return torchvision.ops


def random_rois(gen, k, *, n=N, height=H, width=W, scale=SCALE, dtype=torch.float32, device="cpu"):
    """``[k, 5]`` rois in image coordinates: corners spread a little beyond the map (so samples fall outside it), sides
    from sub-pixel to the whole map. Well-formed (x2 >= x1), since torchvision crashes on inverted boxes with
    aligned=True."""
    img_h, img_w = height / scale, width / scale
    x1 = torch.rand(k, generator=gen, dtype=torch.float64) * img_w * 1.2 - 0.1 * img_w
    y1 = torch.rand(k, generator=gen, dtype=torch.float64) * img_h * 1.2 - 0.1 * img_h
    side = torch.rand(k, 2, generator=gen, dtype=torch.float64) ** 2 * torch.tensor([img_w, img_h])
    batch = torch.randint(n, (k,), generator=gen).double()
    rois = torch.stack([batch, x1, y1, x1 + side[:, 0], y1 + side[:, 1]], dim=1)
    return rois.to(dtype).to(device)


def random_features(gen, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def strided(t):
    """The same values in a non-contiguous view whose gaps hold NaN, so a kernel ignoring strides would show it."""
    buffer = torch.full((*t.shape, 2), float("nan"), dtype=t.dtype, device=t.device)
    buffer[..., 0] = t
    return buffer[..., 0]


def with_layout(t, layout):
    if layout == "channels_last":
        out = t.contiguous(memory_format=torch.channels_last)
        assert not out.is_contiguous()
        return out
    if layout == "strided":
        return strided(t)
    return t.contiguous()


def assert_close(actual, expected, *, seed, what="", **tolerance):
    torch.testing.assert_close(actual, expected, equal_nan=True,
                               msg=lambda d: f"{what} [seed={seed}; replay with FASTDET_TEST_SEED={seed}]\n{d}",
                               **tolerance)


def tolerance(dtype, device, oracle):
    """Bitwise for the CPU against torchvision (same operations in the same order; low precision: the same float32
    value rounded once). Otherwise the sums are ordered differently (reference) or fused (CUDA): a few float32/float64
    ulps of values of magnitude ~4, or one ulp of the low-precision result."""
    if device == "cpu" and oracle == "torchvision":
        return {"rtol": 0.0, "atol": 0.0}
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-12}
    if dtype == torch.float16:
        return {"rtol": 2e-3, "atol": 2e-3}
    if dtype == torch.bfloat16:
        return {"rtol": 1.6e-2, "atol": 1.6e-2}
    return {"rtol": 1e-5, "atol": 2e-6}


def oracle_call(oracle, name, x, rois, *args, **kwargs):
    """The oracle's output and input gradient for grad_out, computed in float32 for low-precision inputs (what fastdet
    accumulates in) on the CPU, then rounded to x's dtype."""
    fn = getattr(torchvision_ops() if oracle == "torchvision" else ref, name)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xo = x.detach().cpu().to(acc).requires_grad_(True)
    out = fn(xo, rois.cpu().to(acc), *args, **kwargs)
    return xo, out


# --------------------------------------------------------------------------------------------------------------------
# roi_align / roi_pool parity
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling_ratio", [-1, 0, 2])
@pytest.mark.parametrize("aligned", [False, True], ids=["legacy", "aligned"])
@LAYOUTS
@ALL_DTYPES
@ORACLES
def test_roi_align(device, dtype, layout, aligned, sampling_ratio, oracle, seed):
    gen = torch.Generator().manual_seed(seed)
    x = with_layout(random_features(gen, N, C, H, W, dtype=dtype, device=device), layout).requires_grad_(True)
    rois = random_rois(gen, 12, dtype=dtype, device=device)
    out = ops.roi_align(x, rois, (3, 4), SCALE, sampling_ratio, aligned)
    assert out.dtype == dtype and out.shape == (12, C, 3, 4)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    grad_out = random_features(gen, *out.shape, dtype=dtype, device=device)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    assert grad.dtype == dtype and grad.shape == x.shape
    if layout == "channels_last":
        assert grad.is_contiguous(memory_format=torch.channels_last)

    xo, want = oracle_call(oracle, "roi_align", x, rois, (3, 4), SCALE, sampling_ratio, aligned)
    (want_grad,) = torch.autograd.grad(want, xo, grad_out.cpu().to(want.dtype))
    tol = tolerance(dtype, device, oracle)
    assert_close(out.cpu(), want.to(dtype), seed=seed, what="roi_align output", **tol)
    assert_close(grad.cpu(), want_grad.to(dtype), seed=seed, what="roi_align input gradient", **tol)


@LAYOUTS
@ALL_DTYPES
@ORACLES
def test_roi_pool(device, dtype, layout, oracle, seed):
    gen = torch.Generator().manual_seed(seed)
    x = with_layout(random_features(gen, N, C, H, W, dtype=dtype, device=device), layout).requires_grad_(True)
    rois = random_rois(gen, 12, dtype=dtype, device=device)
    out = ops.roi_pool(x, rois, (3, 4), SCALE)
    assert out.dtype == dtype and out.shape == (12, C, 3, 4)
    grad_out = random_features(gen, *out.shape, dtype=dtype, device=device)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    xo, want = oracle_call(oracle, "roi_pool", x, rois, (3, 4), SCALE)
    (want_grad,) = torch.autograd.grad(want, xo, grad_out.cpu().to(want.dtype))
    # max pooling is exact in any order; only the gradient sums may round differently (CUDA atomics)
    assert_close(out.cpu(), want.to(dtype), seed=seed, what="roi_pool output", rtol=0, atol=0)
    assert_close(grad.cpu(), want_grad.to(dtype), seed=seed, what="roi_pool input gradient",
                 **tolerance(dtype, device, oracle))


@ORACLES
def test_roi_pool_ties_go_to_the_first_maximum(device, oracle, seed):
    gen = torch.Generator().manual_seed(seed)
    # few distinct values: most bins hold their maximum several times
    x = torch.randint(0, 3, (N, C, H, W), generator=gen).float().to(device).requires_grad_(True)
    rois = random_rois(gen, 10, device=device)
    out = ops.roi_pool(x, rois, 2, SCALE)
    (grad,) = torch.autograd.grad(out.sum(), x)
    xo, want = oracle_call(oracle, "roi_pool", x, rois, 2, SCALE)
    (want_grad,) = torch.autograd.grad(want.sum(), xo)
    assert_close(out.cpu(), want, seed=seed, rtol=0, atol=0)
    assert_close(grad.cpu(), want_grad, seed=seed, rtol=0, atol=0)


@LAYOUTS
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_many_channels_match_torchvision(device, dtype, layout, seed):
    """40 channels: the CPU kernels work in blocks of 16 channels (two full blocks and a partial one here; the other
    tests have 3 channels), planar maps block by block and channels-last maps through a vectorised per-pixel update.
    Ties, NaN, -inf and -FLT_MAX in the features (values that never win a maximum) and 60 boxes."""
    gen = torch.Generator().manual_seed(seed)
    channels = 40
    x = torch.randint(0, 4, (N, channels, H, W), generator=gen).float()
    never = torch.tensor([float("nan"), float("-inf"), -torch.finfo(torch.float32).max])
    x = torch.where(torch.rand(x.shape, generator=gen) < 0.1, never[torch.randint(0, 3, x.shape, generator=gen)], x)
    x = with_layout(x.to(dtype).to(device), layout).requires_grad_(True)
    rois = random_rois(gen, 60, device=device)
    tv = torchvision_ops()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    xo = x.detach().cpu().to(acc).requires_grad_(True)
    out = ops.roi_pool(x, rois, (3, 4), SCALE)
    want = tv.roi_pool(xo, rois.cpu().to(acc), (3, 4), SCALE)
    assert_close(out.cpu(), want.to(dtype), seed=seed, what="roi_pool", rtol=0, atol=0)
    assert not torch.isnan(out).any()
    (grad,) = torch.autograd.grad(out.sum(), x)
    (want_grad,) = torch.autograd.grad(want.sum(), xo)
    assert torch.equal(grad.cpu().to(acc), want_grad), f"seed={seed}: roi_pool gradient"
    finite = torch.nan_to_num(x.detach(), nan=0.0, neginf=-1.0, posinf=1.0)
    xo = finite.cpu().to(acc)
    out = ops.roi_align(finite, rois, (3, 4), SCALE, 2)
    want = tv.roi_align(xo, rois.cpu().to(acc), (3, 4), SCALE, 2)
    assert_close(out.cpu(), want.to(dtype), seed=seed, what="roi_align", **tolerance(dtype, device, "torchvision"))


@pytest.mark.parametrize("boxes_as", ["tensor", "list"])
def test_box_formats_agree(device, boxes_as, seed):
    gen = torch.Generator().manual_seed(seed)
    x = random_features(gen, N, C, H, W, device=device)
    per_image = [random_rois(gen, k, device=device)[:, 1:] for k in (3, 0 if boxes_as == "list" else 2)]
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(per_image)])
    for fn, args in ((ops.roi_align, (2, SCALE, 2)), (ops.roi_pool, (2, SCALE))):
        a = fn(x, per_image if boxes_as == "list" else rois, *args)
        b = fn(x, rois, *args)
        assert torch.equal(a, b)


def test_large_boxes_visit_only_reachable_samples(device, seed):
    # Boxes 10-40x the map: the adaptive grid is 20-100 samples per bin and axis, so the kernels clip the sample range
    # to the map (roi_align_math.h, sample_range). The clipped sum must still be torchvision's, bit for bit on the CPU.
    gen = torch.Generator().manual_seed(seed)
    x = random_features(gen, N, C, H, W, device=device)
    k = 6
    centre = torch.rand(k, 2, generator=gen, dtype=torch.float64) * torch.tensor([W / SCALE, H / SCALE])
    half = (0.5 + torch.rand(k, 2, generator=gen, dtype=torch.float64)) * 300
    rois = torch.cat([torch.randint(N, (k, 1), generator=gen).double(), centre - half, centre + half], 1).float()
    for aligned in (False, True):
        out = ops.roi_align(x, rois.to(device), (3, 4), SCALE, -1, aligned)
        want = torchvision_ops().roi_align(x.cpu(), rois, (3, 4), SCALE, -1, aligned)
        assert_close(out.cpu(), want, seed=seed, **tolerance(torch.float32, device, "torchvision"))


# --------------------------------------------------------------------------------------------------------------------
# multi-scale
# --------------------------------------------------------------------------------------------------------------------

PYRAMID = [(32, 40), (16, 20), (8, 10), (4, 5)]  # strides 4..32 of a 128 x 160 image


def pyramid(gen, dtype=torch.float32, device="cpu", layout="contiguous"):
    return {str(i): with_layout(random_features(gen, N, C, h, w, dtype=dtype, device=device), layout)
            for i, (h, w) in enumerate(PYRAMID)}


def image_boxes(gen, counts, dtype=torch.float32, device="cpu"):
    out = []
    for k in counts:
        corner = torch.rand(k, 2, generator=gen, dtype=torch.float64) * torch.tensor([150.0, 120.0])
        side = torch.exp(torch.empty(k, 2, dtype=torch.float64).uniform_(math.log(2), math.log(200), generator=gen))
        out.append(torch.cat([corner, corner + side], 1).to(dtype).to(device))
    return out


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@ALL_DTYPES
def test_multi_scale_roi_align_matches_torchvision(device, dtype, layout, seed):
    tv = torchvision_ops()
    gen = torch.Generator().manual_seed(seed)
    feats = pyramid(gen, dtype, device, layout)
    for f in feats.values():
        f.requires_grad_(True)
    boxes = image_boxes(gen, (9, 0) if seed % 2 else (7, 5), dtype, device)
    shapes = [(128, 160), (120, 150)]
    names = ["0", "1", "2", "3"]
    mine = ops.MultiScaleRoIAlign(names, 3, 2, canonical_scale=56, canonical_level=4)
    theirs = tv.MultiScaleRoIAlign(names, 3, 2, canonical_scale=56, canonical_level=4)
    out = mine(feats, boxes, shapes)
    assert out.dtype == dtype
    # torchvision in the accumulation dtype (float32 for float16/bfloat16), rounded once: what fastdet computes
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cpu_feats = {k: v.detach().cpu().to(acc).requires_grad_(True) for k, v in feats.items()}
    want = theirs(cpu_feats, [b.cpu().to(acc) for b in boxes], shapes)
    assert mine.scales == theirs.scales
    grad_out = random_features(gen, *out.shape, dtype=dtype, device=device)
    grads = torch.autograd.grad(out, list(feats.values()), grad_out)
    want_grads = torch.autograd.grad(want, list(cpu_feats.values()), grad_out.cpu().to(acc))
    tol = tolerance(dtype, device, "torchvision")
    assert_close(out.cpu(), want.to(dtype), seed=seed, what="multi-scale output", **tol)
    for g, w in zip(grads, want_grads):
        assert_close(g.cpu(), w.to(dtype), seed=seed, what="multi-scale gradient", **tol)
    # and the reference (a loop over levels around the reference roi_align)
    want_ref = ref.multi_scale_roi_align([f.detach().cpu().to(acc) for f in feats.values()],
                                         [b.cpu().to(acc) for b in boxes], 3, 2, 56, 4, spatial_scales=mine.scales)
    assert_close(out.detach().cpu(), want_ref.to(dtype), seed=seed, **tolerance(dtype, device, "reference"))


def test_fpn_levels_match_torchvision_level_mapper(seed):
    tv = pytest.importorskip("torchvision.ops.poolers")
    gen = torch.Generator().manual_seed(seed)
    boxes = image_boxes(gen, (200,))[0]
    # sizes exactly on the level boundaries, where eps decides
    edge = torch.tensor([[0.0, 0.0, 224.0, 224.0], [0.0, 0.0, 112.0, 112.0], [10.0, 10.0, 458.0, 458.0]])
    boxes = torch.cat([boxes, edge])
    mapper = tv.LevelMapper(2, 5, canonical_scale=224, canonical_level=4)
    assert torch.equal(fpn_levels(boxes, 2, 5), mapper([boxes]))


# --------------------------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["align-legacy-adaptive", "align-aligned-2", "pool", "multi-scale"])
def test_gradcheck(device, case, seed):
    for run in range(3):
        run_seed = seed + run
        gen = torch.Generator().manual_seed(run_seed)
        rois = random_rois(gen, 5, n=2, height=6, width=7, dtype=torch.float64, device=device)
        if case == "multi-scale":
            feats = [random_features(gen, 2, 2, 8 // 2**i, 10 // 2**i, dtype=torch.float64, device=device)
                     .requires_grad_(True) for i in range(3)]

            def fn(*f):
                return ops.multi_scale_roi_align(list(f), rois, 2, 2, 4.0, 2, spatial_scales=[1.0, 0.5, 0.25])

            inputs = tuple(feats)
        else:
            x = random_features(gen, 2, 2, 6, 7, dtype=torch.float64, device=device).requires_grad_(True)
            inputs = (x,)
            if case == "pool":
                def fn(x):
                    return ops.roi_pool(x, rois, (2, 3), SCALE)
            else:
                aligned = case == "align-aligned-2"
                sr = 2 if aligned else -1

                def fn(x):
                    return ops.roi_align(x, rois, (2, 3), SCALE, sr, aligned)
        try:
            torch.autograd.gradcheck(fn, inputs)
        except torch.autograd.gradcheck.GradcheckError as exc:
            raise AssertionError(f"gradcheck failed [seed={run_seed}]: {exc}") from None


# --------------------------------------------------------------------------------------------------------------------
# operator registration: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------------------------

BACKWARD_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck_inputs(device, layout="contiguous"):
    gen = torch.Generator().manual_seed(0)
    x = with_layout(random_features(gen, N, C, H, W, device=device), layout).requires_grad_(True)
    return x, random_rois(gen, 6, device=device)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_roi_align(device, layout):
    x, rois = opcheck_inputs(device, layout)
    torch.library.opcheck(torch.ops.fastdet.roi_align.default, (x, rois, SCALE, 3, 2, 2, True))
    out = torch.ops.fastdet.roi_align(x, rois, SCALE, 3, 2, -1, False)
    args = (torch.randn_like(out), rois, SCALE, 3, 2, N, C, H, W, -1, False, layout == "channels_last")
    torch.library.opcheck(torch.ops.fastdet._roi_align_backward.default, args, test_utils=BACKWARD_UTILS)


def test_opcheck_roi_pool(device):
    x, rois = opcheck_inputs(device)
    torch.library.opcheck(torch.ops.fastdet.roi_pool.default, (x, rois, SCALE, 3, 2))
    out, argmax = torch.ops.fastdet.roi_pool(x, rois, SCALE, 3, 2)
    args = (torch.randn_like(out), rois, argmax, SCALE, N, C, H, W, False)
    torch.library.opcheck(torch.ops.fastdet._roi_pool_backward.default, args, test_utils=BACKWARD_UTILS)


def test_opcheck_multi_scale_roi_align(device):
    gen = torch.Generator().manual_seed(0)
    feats = [f.requires_grad_(True) for f in pyramid(gen, device=device).values()]
    rois = random_rois(gen, 6, height=128, width=160, scale=1.0, device=device)
    levels = torch.tensor([0, 1, 2, 3, 0, 2], device=device)
    scales = [0.25, 0.125, 0.0625, 0.03125]
    torch.library.opcheck(torch.ops.fastdet.multi_scale_roi_align.default, (feats, rois, levels, scales, 2, 2, 2, False))
    out = torch.ops.fastdet.multi_scale_roi_align(feats, rois, levels, scales, 2, 2, 2, False)
    args = (torch.randn_like(out), rois, levels, scales, 2, 2, N, C, [h for h, _ in PYRAMID], [w for _, w in PYRAMID],
            2, False, False)
    torch.library.opcheck(torch.ops.fastdet._multi_scale_roi_align_backward.default, args, test_utils=BACKWARD_UTILS)


def test_compile_fullgraph(device, seed):
    torch._dynamo.reset()

    def heads(x, rois, feats):
        a = ops.roi_align(x * 1.0, rois, (3, 4), SCALE, 2, True)
        p = ops.roi_pool(x, rois, 2, SCALE)
        m = ops.multi_scale_roi_align(feats, rois, 2, 2, 56, 4, spatial_scales=[0.25, 0.125, 0.0625, 0.03125])
        return a.sum(dim=(2, 3)) * 2.0 + p.amax(dim=(2, 3)) + m.mean(dim=(2, 3))

    compiled = torch.compile(heads, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(seed)
    for k in (5, 8):  # the second K recompiles with a dynamic K, exercising the fake kernels on symbolic sizes
        x = random_features(gen, N, C, H, W, device=device).requires_grad_(True)
        feats = [f.requires_grad_(True) for f in pyramid(gen, device=device).values()]
        rois = random_rois(gen, k, device=device)
        got = compiled(x, rois, feats)
        want = heads(x, rois, feats)
        got_grads = torch.autograd.grad(got.sum(), [x, *feats])
        want_grads = torch.autograd.grad(want.sum(), [x, *feats])
        assert_close(got, want, seed=seed, what="compiled output", rtol=1e-6, atol=1e-6)
        for g, w in zip(got_grads, want_grads):
            assert_close(g, w, seed=seed, what="compiled gradient", rtol=1e-6, atol=1e-6)


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


@pytest.mark.parametrize("op", ["roi_align", "roi_pool", "multi_scale"])
def test_deterministic_backward_is_bitwise_reproducible(device, op, deterministic, seed):
    # Many RoIs on few pixels, so gradient elements collect many contributions: with atomics their order (and the
    # rounding) would vary. The deterministic CUDA gather sums in the CPU kernel's order, so CUDA must also match the
    # CPU (to FMA rounding) -- and reproduce itself bit for bit.
    gen = torch.Generator().manual_seed(seed)
    rois = random_rois(gen, 300, device=device)
    if op == "multi_scale":
        feats = [f.requires_grad_(True) for f in pyramid(gen, device=device).values()]
        rois = random_rois(gen, 300, height=128, width=160, scale=1.0, device=device)

        def run():
            out = ops.multi_scale_roi_align(feats, rois, 7, 2, 56, 4, spatial_scales=[0.25, 0.125, 0.0625, 0.03125])
            return torch.autograd.grad(out, feats, torch.ones_like(out))
    else:
        x = random_features(gen, N, 16, H, W, device=device).requires_grad_(True)
        fn = ops.roi_align if op == "roi_align" else ops.roi_pool

        def run():
            out = fn(x, rois, 7, SCALE)
            return torch.autograd.grad(out, x, torch.ones_like(out))

    first = run()
    for _ in range(3):
        again = run()
        for a, b in zip(first, again):
            assert torch.equal(a, b), f"backward is not reproducible [seed={seed}]"


@pytest.mark.cuda
def test_cuda_deterministic_and_atomic_backward_agree(seed):
    gen = torch.Generator().manual_seed(seed)
    x = random_features(gen, N, 16, H, W, device="cuda").requires_grad_(True)
    rois = random_rois(gen, 200, device="cuda")
    out = ops.roi_align(x, rois, 7, SCALE, 2, True)
    (fast,) = torch.autograd.grad(out, x, torch.ones_like(out), retain_graph=True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        (det,) = torch.autograd.grad(out, x, torch.ones_like(out))
    finally:
        torch.use_deterministic_algorithms(previous)
    assert_close(det, fast, seed=seed, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# bad and edge-case input
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1.0, 2.0, 7.0, float("nan"), float("inf")])
def test_bad_batch_index_is_a_clear_error_on_cpu(value):
    x = torch.randn(N, C, H, W)
    rois = torch.tensor([[0.0, 1, 1, 5, 5], [value, 1, 1, 5, 5]])
    for call in (lambda: ops.roi_align(x, rois, 2), lambda: ops.roi_pool(x, rois, 2),
                 lambda: ops.multi_scale_roi_align([x], rois, 2, spatial_scales=[1.0])):
        with pytest.raises(RuntimeError, match=r"rois\[1, 0\] = .* is not a valid batch index"):
            call()
    with pytest.raises(ValueError, match="not a valid batch index"):
        check_rois(rois, N)


@pytest.mark.cuda
def test_bad_batch_index_pools_zero_on_cuda():
    x = torch.randn(N, C, H, W, device="cuda", requires_grad=True)
    rois = torch.tensor([[0.0, 1, 1, 5, 5], [5.0, 1, 1, 5, 5], [-3.0, 1, 1, 5, 5]], device="cuda")
    for fn in (ops.roi_align, ops.roi_pool):
        out = fn(x, rois, 2)
        assert torch.equal(out[1:], torch.zeros_like(out[1:]))
        (grad,) = torch.autograd.grad(out[1:].sum(), x)
        assert torch.equal(grad, torch.zeros_like(grad))


def test_truncated_batch_index_matches_torchvision():
    x = torch.randn(N, C, H, W)
    rois = torch.tensor([[0.9, 1, 1, 5, 5], [1.5, 1, 1, 5, 5], [-0.5, 2, 2, 9, 9]])
    assert torch.equal(ops.roi_align(x, rois, 2), torchvision_ops().roi_align(x, rois, 2))


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "huge"])
def test_non_finite_and_huge_boxes_have_defined_output(device, bad):
    x = torch.randn(N, C, H, W, device=device, requires_grad=True)
    v = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 3e38}[bad]
    rois = torch.tensor([[0.0, 1, 1, 5, 5], [1.0, v, 1, 5, 5], [0.0, 1, 1, 5, v], [1.0, 0, 0, v, v]], device=device)
    started = time.perf_counter()
    outs = [ops.roi_align(x, rois, 3, 1.0, -1, aligned) for aligned in (False, True)]
    outs.append(ops.roi_pool(x, rois, 3))
    outs.append(ops.multi_scale_roi_align([x, x[:, :, ::2, ::2]], rois, 3, spatial_scales=[1.0, 0.5]))
    for out in outs:
        assert out.shape == (4, C, 3, 3)
        assert torch.isfinite(out).all()
        if bad != "huge":
            assert torch.equal(out[1:], torch.zeros_like(out[1:]))
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(grad).all()
    # a box of 3e38 pixels must not iterate over its adaptive grid: only samples that can land on the map are visited
    assert time.perf_counter() - started < 10.0


def test_inverted_boxes_follow_torchvision(device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = random_features(gen, N, C, H, W, device=device)
    rois = random_rois(gen, 8, device=device)
    rois[:, [1, 2, 3, 4]] = rois[:, [3, 4, 1, 2]]  # x2 < x1, y2 < y1
    # legacy mode makes them 1 x 1 (torchvision agrees); aligned mode pools 0 (torchvision crashes there)
    legacy = ops.roi_align(x, rois, 2, SCALE, -1, False)
    assert torch.equal(legacy.cpu(), torchvision_ops().roi_align(x.cpu(), rois.cpu(), 2, SCALE, -1, False))
    assert torch.equal(ops.roi_align(x, rois, 2, SCALE, -1, True), torch.zeros(8, C, 2, 2, device=device))
    assert torch.equal(ops.roi_pool(x, rois, 2, SCALE).cpu(), torchvision_ops().roi_pool(x.cpu(), rois.cpu(), 2, SCALE))


@pytest.mark.parametrize("boxes", ["tensor", "list", "list-of-empty"])
def test_empty_box_sets(device, boxes):
    x = torch.randn(N, C, H, W, device=device, requires_grad=True)
    arg = {"tensor": torch.zeros(0, 5, device=device), "list": [torch.zeros(0, 4, device=device)],
           "list-of-empty": [torch.zeros(0, 4, device=device)] * N}[boxes]
    for out in (ops.roi_align(x, arg, (3, 2)), ops.roi_pool(x, arg, (3, 2)),
                ops.multi_scale_roi_align([x, x[:, :, ::2, ::2]], arg, (3, 2), spatial_scales=[1.0, 0.5])):
        assert out.shape == (0, C, 3, 2)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(grad, torch.zeros_like(x))


def test_empty_feature_maps(device):
    rois = torch.tensor([[0.0, 1, 1, 5, 5]], device=device)
    assert ops.roi_align(torch.zeros(1, 0, 4, 4, device=device), rois, 2).shape == (1, 0, 2, 2)
    out = ops.roi_align(torch.zeros(1, 2, 0, 4, device=device), rois, 2)
    assert torch.equal(out, torch.zeros(1, 2, 2, 2, device=device))


@pytest.mark.parametrize("hw", [(0, 4), (4, 0), (0, 0), (3, 0), (0, 1)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_empty_feature_maps_backward(device, hw, layout):
    # Regression (fuzzing): roi_pool's backward on a map of width 0 and height > 1 failed an internal stride check.
    x = torch.zeros(2, 3, *hw, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    rois = torch.tensor([[0.0, 1, 1, 5, 5], [1.0, 0, 0, 2, 3]], device=device)
    for out in (ops.roi_pool(x, rois, (2, 3)), ops.roi_align(x, rois, (2, 3)),
                ops.roi_align(x, rois, (2, 3), 1.0, 2, True)):
        assert torch.equal(out, torch.zeros(2, 3, 2, 3, device=device))
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.shape == x.shape and grad.dtype == x.dtype


def test_sampling_ratio_is_bounded(device):
    # Regression (fuzzing): sampling_ratio=100000 ran for minutes (s^2 samples per bin). The bound is 64 per axis.
    x = torch.randn(1, 1, 8, 8, device=device)
    rois = torch.tensor([[0.0, 1, 1, 5, 5]], device=device)
    started = time.perf_counter()
    for ratio in (65, 100000, 2**40):
        with pytest.raises(RuntimeError, match="sampling_ratio must be at most 64"):
            ops.roi_align(x, rois, 1, 1.0, ratio)
        with pytest.raises(RuntimeError, match="sampling_ratio must be at most 64"):
            ops.multi_scale_roi_align([x], rois, 1, ratio, spatial_scales=[1.0])
    assert time.perf_counter() - started < 5.0
    # The limit itself works and agrees with torchvision.
    out = ops.roi_align(x, rois, 2, 1.0, 64)
    assert torch.allclose(out.cpu(), torchvision_ops().roi_align(x.cpu(), rois.cpu(), 2, 1.0, 64), atol=1e-5)


def test_boxes_in_another_floating_dtype_are_accepted(device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = random_features(gen, N, C, H, W, dtype=torch.float16, device=device)
    rois = random_rois(gen, 5, device=device)  # float32 boxes with float16 features, as under autocast
    out = ops.roi_align(x, rois, 2, SCALE)
    want = ops.roi_align(x.float(), rois, 2, SCALE).half()
    assert out.dtype == torch.float16
    assert_close(out, want, seed=seed, rtol=0, atol=0)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x, r: ops.roi_align(x[0], r, 2), ValueError, r"input must have shape \[N, C, H, W\]"),
        (lambda x, r: ops.roi_align(x, r[:, 1:], 2), ValueError, r"Tensor\[K, 5\]"),
        (lambda x, r: ops.roi_align(x, [r], 2), ValueError, r"boxes\[0\] must be a Tensor\[L, 4\]"),
        (lambda x, r: ops.roi_align(x.long(), r, 2), TypeError, "floating-point"),
        (lambda x, r: ops.roi_align(x, r.long(), 2), TypeError, "floating-point"),
        (lambda x, r: ops.roi_align(x, r, 0), ValueError, "output_size"),
        (lambda x, r: ops.roi_align(x, r, (2, 2, 2)), ValueError, "output_size"),
        (lambda x, r: ops.roi_align(x, "boxes", 2), TypeError, "boxes must be"),
        (lambda x, r: ops.roi_align(x, r, 2, spatial_scale=float("nan")), RuntimeError, "spatial_scale"),
        (lambda x, r: ops.roi_pool(x, r, 2, spatial_scale=-1.0), RuntimeError, "spatial_scale"),
        (lambda x, r: ops.roi_pool(x[0], r, 2), ValueError, r"\[N, C, H, W\]"),
        (lambda x, r: ops.multi_scale_roi_align(x, r, 2, spatial_scales=[1.0]), TypeError, "list"),
        (lambda x, r: ops.multi_scale_roi_align([x], r, 2), ValueError, "spatial_scales or image_shapes"),
        (lambda x, r: ops.multi_scale_roi_align([x, x[:, :1]], r, 2, spatial_scales=[1, 0.5]), RuntimeError,
         "same batch size and channels"),
        (lambda x, r: ops.multi_scale_roi_align([x, x.double()], r, 2, spatial_scales=[1, 0.5]), RuntimeError,
         "same dtype"),
        (lambda x, r: torch.ops.fastdet.roi_align(x, r.t(), 1.0, 2, 2, -1, False), RuntimeError, r"\[K, 5\]"),
        (lambda x, r: torch.ops.fastdet.roi_align(x[0], r, 1.0, 2, 2, -1, False), RuntimeError, r"\[N, C, H, W\]"),
        (lambda x, r: torch.ops.fastdet.roi_pool(x, r, 1.0, 0, 2), RuntimeError, "output_size must be positive"),
    ],
    ids=lambda v: None,
)
def test_bad_arguments(call, error, message):
    x = torch.randn(N, C, H, W)
    r = torch.tensor([[0.0, 1, 1, 5, 5]])
    with pytest.raises(error, match=message):
        call(x, r)


@pytest.mark.cuda
def test_mismatched_devices_are_a_clear_error():
    x = torch.randn(N, C, H, W, device="cuda")
    r = torch.tensor([[0.0, 1, 1, 5, 5]])
    with pytest.raises(ValueError, match="same device"):
        ops.roi_align(x, r, 2)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.fastdet.roi_pool(x, r, 1.0, 2, 2)


# --------------------------------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------------------------------


def test_modules_repr_and_forward_match_torchvision(seed):
    tv = torchvision_ops()
    assert repr(ops.RoIAlign((7, 7), 0.25, 2, True)) == repr(tv.RoIAlign((7, 7), 0.25, 2, True))
    assert repr(ops.RoIPool(7, 0.5)) == repr(tv.RoIPool(7, 0.5))
    assert "featmap_names=['p2', 'p3']" in repr(ops.MultiScaleRoIAlign(["p2", "p3"], 7, 2))
    gen = torch.Generator().manual_seed(seed)
    x = random_features(gen, N, C, H, W)
    rois = random_rois(gen, 7)
    assert torch.equal(ops.RoIAlign(3, SCALE, 2, True)(x, rois), tv.RoIAlign(3, SCALE, 2, True)(x, rois))
    assert torch.equal(ops.RoIPool(3, SCALE)(x, rois), tv.RoIPool(3, SCALE)(x, rois))
