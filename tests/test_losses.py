"""fastdet.ops losses against the reference (always) and torchvision (when installed): values, dtypes, gradients,
documented edge cases, operator registration (opcheck), torch.compile, determinism and argument errors.

Every test draws fresh inputs from the ``seed`` fixture; failures carry the seed, FASTDET_TEST_SEED=<seed> replays.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastdet import ops
from fastdet.ops import reference as ref

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)
ALL_DTYPES = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
REDUCTIONS = pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
BOX_LOSSES = ["generalized_box_iou_loss", "distance_box_iou_loss", "complete_box_iou_loss"]
INF, NAN = float("inf"), float("nan")


def torchvision_ops():
    pytest.importorskip("torchvision", reason="torchvision is not installed; the torchvision parity case is skipped")
    import torchvision.ops

    return torchvision.ops


def assert_close(actual, expected, *, seed, what="", **tolerance):
    torch.testing.assert_close(
        actual, expected, equal_nan=True,
        msg=lambda detail: f"{what} [seed={seed}; replay with FASTDET_TEST_SEED={seed}]\n{detail}", **tolerance,
    )


def value_tolerance(dtype):
    """fastdet and the reference both compute in float32 (float64) and round once to ``dtype``: they can differ by the
    float32 rounding of a few operations, which after the final rounding is at most one ulp of ``dtype``."""
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-12}
    if dtype == torch.float32:
        return {"rtol": 2e-5, "atol": 1e-6}
    return {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-5}


def grad_tolerance(dtype, scale=1.0):
    """Gradients: as values, with the absolute part relative to the gradient's scale (1/numel for 'mean')."""
    tol = value_tolerance(dtype)
    return {"rtol": max(tol["rtol"], 1e-4 if dtype == torch.float32 else 0), "atol": tol["atol"] * scale}


def focal_inputs(gen, shape, dtype, device, soft=False):
    """Logits ~ N(0, 3^2) with a sprinkle of large magnitudes; one-hot targets (or soft targets in [0, 1])."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3
    big = torch.rand(*shape, generator=gen, dtype=torch.float64) < 0.05
    x = torch.where(big, x * 10, x)
    if soft:
        t = torch.rand(*shape, generator=gen, dtype=torch.float64)
    else:
        t = (torch.rand(*shape, generator=gen, dtype=torch.float64) < 0.1).to(torch.float64)
    return x.to(dtype).to(device), t.to(dtype).to(device)


def random_labels(gen, shape, classes, device, ignore_index=-100, with_ignore=True):
    """Labels mixing positives, both background spellings (-1 and C) and, optionally, ignored rows."""
    labels = torch.randint(0, classes, shape, generator=gen)
    u = torch.rand(shape, generator=gen)
    labels = torch.where(u < 0.4, torch.full_like(labels, -1), labels)
    labels = torch.where((u >= 0.4) & (u < 0.7), torch.full_like(labels, classes), labels)
    if with_ignore:
        labels = torch.where(u >= 0.9, torch.full_like(labels, ignore_index), labels)
    return labels.to(device)


def run_with_grad(fn, *tensors, grad_out=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.ones_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out.detach(), grads


def random_boxes(gen, n, dtype=torch.float32, device="cpu", scale=100.0, min_side=1.0):
    corner = torch.rand(n, 2, generator=gen, dtype=torch.float64) * scale
    size = min_side + torch.rand(n, 2, generator=gen, dtype=torch.float64) * (scale / 2)
    return torch.cat([corner, corner + size], dim=-1).to(dtype).to(device)


def box_pairs(gen, n, dtype=torch.float32, device="cpu"):
    """Aligned pairs: half are jittered copies (overlapping), half independent (often disjoint)."""
    b1 = random_boxes(gen, n, torch.float64)
    b2 = random_boxes(gen, n, torch.float64)
    jitter = b1 + torch.randn(n, 4, generator=gen, dtype=torch.float64) * 3
    jitter = torch.cat([torch.minimum(jitter[:, :2], jitter[:, 2:] - 0.5), jitter[:, 2:]], dim=-1)
    b2 = torch.where((torch.arange(n) % 2 == 0).unsqueeze(-1), jitter, b2)
    return b1.to(dtype).to(device), b2.to(dtype).to(device)


# --------------------------------------------------------------------------------------------------------------------
# focal loss, float targets
# --------------------------------------------------------------------------------------------------------------------


@ALL_DTYPES
@REDUCTIONS
@pytest.mark.parametrize("soft", [False, True], ids=["onehot", "soft"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.25, 1.0), (0.75, 1.5)])
def test_focal_matches_reference(device, dtype, reduction, soft, alpha, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    x, t = focal_inputs(gen, (37, 13), dtype, device, soft=soft)
    kw = dict(alpha=alpha, gamma=gamma, reduction=reduction)
    out, (gx,) = run_with_grad(lambda a: ops.sigmoid_focal_loss(a, t, **kw), x)
    exp, (ex,) = run_with_grad(lambda a: ref.sigmoid_focal_loss(a, t, **kw), x)
    assert out.dtype == dtype and out.shape == exp.shape
    assert_close(out, exp, seed=seed, what="loss", **value_tolerance(dtype))
    scale = 1 / x.numel() if reduction == "mean" else 1.0
    assert_close(gx, ex, seed=seed, what="grad", **grad_tolerance(dtype, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@REDUCTIONS
def test_focal_matches_torchvision(device, dtype, reduction, seed):
    tv = torchvision_ops()
    gen = torch.Generator().manual_seed(seed)
    x, t = focal_inputs(gen, (64, 20), dtype, device)
    x = x.clamp(-15, 15)  # torchvision's 1 - p cancels to 0 beyond ~|17| in float32 (fastdet keeps the tiny loss)
    out, (gx,) = run_with_grad(lambda a: ops.sigmoid_focal_loss(a, t, reduction=reduction), x)
    # torchvision rounds every intermediate to bfloat16; its float32 evaluation rounded once is the fair oracle.
    xf, tf = (x.float(), t.float()) if dtype in LOW_PRECISION else (x, t)
    exp, (ex,) = run_with_grad(lambda a: tv.sigmoid_focal_loss(a, tf, reduction=reduction), xf)
    assert_close(out, exp.to(dtype), seed=seed, what="loss vs torchvision", **value_tolerance(dtype))
    scale = 1 / x.numel() if reduction == "mean" else 1.0
    assert_close(gx, ex.to(dtype), seed=seed, what="grad vs torchvision", **grad_tolerance(dtype, scale))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["tensor", "number"])
def test_focal_normalizer(device, reduction, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    x, t = focal_inputs(gen, (50, 7), torch.float64, device)
    num_fg = t.sum()
    norm = num_fg.clamp(min=1) if kind == "tensor" else 7.5
    out, (gx,) = run_with_grad(lambda a: ops.sigmoid_focal_loss(a, t, reduction=reduction, normalizer=norm), x)
    exp, (ex,) = run_with_grad(lambda a: ref.sigmoid_focal_loss(a, t, reduction=reduction) / norm, x)
    assert_close(out, exp, seed=seed, what="normalised loss", **value_tolerance(torch.float64))
    assert_close(gx, ex, seed=seed, what="normalised grad", **value_tolerance(torch.float64))


def test_focal_mmcv_mean_is_sum_over_rows(device, seed):
    # mmcv's reduction='mean' divides by N (rows), torchvision's (and fastdet's) by N * C.
    gen = torch.Generator().manual_seed(seed)
    x, t = focal_inputs(gen, (40, 9), torch.float64, device)
    total = ops.sigmoid_focal_loss(x, t, reduction="sum")
    assert_close(ops.sigmoid_focal_loss(x, t, reduction="mean"), total / x.numel(), seed=seed)
    assert_close(ops.sigmoid_focal_loss(x, t, reduction="sum", normalizer=x.shape[0]), total / x.shape[0], seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_focal_non_finite_logits(device, dtype):
    x = torch.tensor([INF, INF, -INF, -INF, NAN, NAN, 200.0, -200.0, 200.0, -200.0], dtype=dtype, device=device)
    t = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=dtype, device=device)
    alpha = 0.25
    out, (g,) = run_with_grad(lambda a: ops.sigmoid_focal_loss(a, t, alpha=alpha), x)
    exp_loss = [0.0, INF, INF, 0.0, NAN, NAN, 0.0, 0.0, 0.75 * 200, 0.25 * 200]
    exp_grad = [0.0, 1 - alpha, -alpha, 0.0, NAN, NAN, 0.0, 0.0, 1 - alpha, -alpha]
    torch.testing.assert_close(out.double().cpu(), torch.tensor(exp_loss, dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(g.double().cpu(), torch.tensor(exp_grad, dtype=torch.float64), equal_nan=True)
    # The reference documents the same limits.
    torch.testing.assert_close(ref.sigmoid_focal_loss(x, t, alpha=alpha), out, equal_nan=True)
    # Reduced: a NaN anywhere makes the reduced loss NaN; finite-but-infinite limits make it inf.
    assert math.isnan(ops.sigmoid_focal_loss(x, t, reduction="sum").item())
    assert ops.sigmoid_focal_loss(x[:4], t[:4], reduction="mean").item() == INF


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_focal_zero_weight_side_with_infinite_logits(device, dtype, alpha):
    # alpha 1 weighs targets 0 by 0 (alpha 0: targets 1): their loss is 0 at every finite logit, so the limit at an
    # infinite one is 0 too (it used to be 0 * inf = NaN). 17 elements: the vectorised CPU path and its scalar tail.
    x = torch.tensor([INF, -INF, INF, -INF, 3.0, -3.0, NAN, 200.0, -200.0] * 2, dtype=dtype, device=device)[:17]
    zero_side = 0.0 if alpha == 1.0 else 1.0
    t = torch.full_like(x, zero_side)
    t[2::4] = 1 - zero_side  # some elements on the weighted side
    out, (g,) = run_with_grad(lambda a: ops.sigmoid_focal_loss(a, t, alpha=alpha, gamma=2.0), x)
    weighted = t != zero_side
    assert (out[~weighted & ~x.isnan()] == 0).all() and (g[~weighted & ~x.isnan()] == 0).all()
    assert out[x.isnan()].isnan().all()
    assert not out[~x.isnan()].isnan().any() and not g[~x.isnan()].isnan().any()
    torch.testing.assert_close(ref.sigmoid_focal_loss(x, t, alpha=alpha, gamma=2.0), out, equal_nan=True)
    finite = ~x.isnan()
    assert torch.isinf(ops.sigmoid_focal_loss(x[finite], t[finite], alpha=alpha, reduction="sum")).item()
    # The label form: alpha 1 makes every background logit weightless, alpha 0 every positive one.
    logits = torch.tensor([[INF, -INF, 1.0], [-INF, INF, INF]], dtype=dtype, device=device)
    labels = torch.tensor([2, -1], device=device)
    loss = ops.sigmoid_focal_loss_with_labels(logits, labels, alpha=alpha)
    onehot = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=dtype, device=device)
    torch.testing.assert_close(loss, ops.sigmoid_focal_loss(logits, onehot, alpha=alpha))
    assert not loss.isnan().any()


def test_focal_empty(device):
    x = torch.empty(0, 80, device=device, requires_grad=True)
    t = torch.empty(0, 80, device=device)
    assert ops.sigmoid_focal_loss(x, t).shape == (0, 80)
    assert ops.sigmoid_focal_loss(x, t, reduction="sum").item() == 0.0
    mean = ops.sigmoid_focal_loss(x, t, reduction="mean")
    assert math.isnan(mean.item())  # torch's (and torchvision's) mean of nothing
    ops.sigmoid_focal_loss(x, t, reduction="sum").backward()
    assert x.grad.shape == (0, 80)


def _focal_textbook(x, t, alpha, gamma):
    """The focal loss as the plain differentiable formula (float64, finite logits), independent of fastdet's kernels
    and reference: autograd of it is the oracle for gradients with respect to the targets."""
    p = torch.sigmoid(x)
    ce = -(t * torch.log(p) + (1 - t) * torch.log1p(-p))
    loss = ce * (p * (1 - t) + (1 - p) * t) ** gamma
    return (alpha * t + (1 - alpha) * (1 - t)) * loss if alpha >= 0 else loss


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 1.5])
@pytest.mark.parametrize("alpha", [0.25, -1.0, 1.0])
@REDUCTIONS
def test_focal_targets_requiring_grad(device, seed, gamma, alpha, reduction):
    # Targets that require grad are differentiated too, as in torchvision; targets of exactly 0 and 1 included (the
    # gradient there used to be ~0: the term of a zero coefficient was dropped with its derivative).
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(10, 4, generator=gen, dtype=torch.float64) * 16 - 8).to(device)
    t = torch.rand(10, 4, generator=gen, dtype=torch.float64)
    t = torch.where(torch.rand(10, 4, generator=gen) < 0.5, (t < 0.3).double(), t).to(device)  # half exactly 0 or 1
    kw = dict(alpha=alpha, gamma=gamma)
    out, (gx, gt) = run_with_grad(lambda a, b: ops.sigmoid_focal_loss(a, b, reduction=reduction, **kw), x, t)
    exp, (ex, et) = run_with_grad(lambda a, b: _reduce_textbook(_focal_textbook(a, b, **kw), reduction), x, t)
    assert_close(out, exp, seed=seed)
    assert_close(gx, ex, seed=seed)
    assert_close(gt, et, seed=seed)


def _reduce_textbook(loss, reduction):
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def test_focal_targets_gradient_regression(device):
    # The fuzzing case: fastdet gave [-2.6e-09, -0.0121]; torchvision's autograd gives the values below.
    x = torch.tensor([-20.0, 3.0], dtype=torch.float64, device=device)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64, device=device, requires_grad=True)
    ops.sigmoid_focal_loss(x, t, gamma=0.0, reduction="sum").backward()
    want = [0.75 * 20 - 0.5 * math.log1p(math.exp(-20)), -0.25 * 3 - 0.5 * math.log1p(math.exp(-3))]
    torch.testing.assert_close(t.grad.cpu(), torch.tensor(want, dtype=torch.float64))
    tv = torchvision_ops()
    t2 = t.detach().clone().requires_grad_(True)
    tv.sigmoid_focal_loss(x, t2, gamma=0.0, reduction="sum").backward()
    torch.testing.assert_close(t.grad, t2.grad)


def test_focal_targets_may_change_after_forward(device, seed):
    # Only the gradient written by the forward is saved, so reusing the targets buffer before backward is fine.
    gen = torch.Generator().manual_seed(seed)
    x, t = focal_inputs(gen, (10, 4), torch.float32, device)
    xr = x.clone().requires_grad_(True)
    loss = ops.sigmoid_focal_loss(xr, t, reduction="sum")
    _, (e,) = run_with_grad(lambda a: ref.sigmoid_focal_loss(a, t, reduction="sum"), x)
    t.zero_()
    (g,) = torch.autograd.grad(loss, xr)
    assert_close(g, e, seed=seed, **grad_tolerance(torch.float32))


def test_focal_no_grad_writes_no_gradient(device, seed):
    gen = torch.Generator().manual_seed(seed)
    x, t = focal_inputs(gen, (10, 4), torch.float32, device)
    loss, grad = torch.ops.fastdet.sigmoid_focal_loss(x, t, 0.25, 2.0, 2, None, False)
    assert grad.shape == (0,)
    # Called directly with need_grad=False on inputs that require grad, the backward recomputes the gradient.
    xr = x.clone().requires_grad_(True)
    loss, _ = torch.ops.fastdet.sigmoid_focal_loss(xr, t, 0.25, 2.0, 2, None, False)
    (g,) = torch.autograd.grad(loss, xr)
    _, (e,) = run_with_grad(lambda a: ref.sigmoid_focal_loss(a, t, reduction="sum"), x)
    assert_close(g, e, seed=seed, **grad_tolerance(torch.float32))


# --------------------------------------------------------------------------------------------------------------------
# focal loss, integer labels
# --------------------------------------------------------------------------------------------------------------------


@ALL_DTYPES
@REDUCTIONS
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_focal_labels_matches_reference(device, dtype, reduction, ignore_index, seed):
    gen = torch.Generator().manual_seed(seed)
    classes = 11
    x, _ = focal_inputs(gen, (5, 23, classes), dtype, device)
    labels = random_labels(gen, (5, 23), classes, device, ignore_index=ignore_index)
    kw = dict(reduction=reduction, ignore_index=ignore_index)
    out, (gx,) = run_with_grad(lambda a: ops.sigmoid_focal_loss_with_labels(a, labels, **kw), x)
    exp, (ex,) = run_with_grad(lambda a: ref.sigmoid_focal_loss_with_labels(a, labels, **kw), x)
    assert out.dtype == dtype and out.shape == exp.shape
    assert_close(out, exp, seed=seed, what="loss", **value_tolerance(dtype))
    scale = 1 / x.numel() if reduction == "mean" else 1.0
    assert_close(gx, ex, seed=seed, what="grad", **grad_tolerance(dtype, scale))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_labels_matches_torchvision_one_hot(device, reduction, seed):
    tv = torchvision_ops()
    gen = torch.Generator().manual_seed(seed)
    classes = 9
    x, _ = focal_inputs(gen, (300, classes), torch.float32, device)
    x = x.clamp(-15, 15)
    labels = random_labels(gen, (300,), classes, device)
    keep = labels != -100
    onehot = torch.zeros_like(x)
    pos = keep & (labels >= 0) & (labels < classes)
    onehot[pos] = torch.nn.functional.one_hot(labels[pos], classes).float()
    out = ops.sigmoid_focal_loss_with_labels(x, labels, reduction=reduction)
    exp = tv.sigmoid_focal_loss(x[keep], onehot[keep], reduction=reduction)
    if reduction == "none":
        assert torch.all(out[~keep] == 0)
        out = out[keep]
    assert_close(out, exp, seed=seed, **value_tolerance(torch.float32))


def test_focal_labels_retinanet_normalizer(device, seed):
    # RetinaNet: sum over valid anchors / max(1, number of foreground anchors), computed without a host sync.
    gen = torch.Generator().manual_seed(seed)
    x, _ = focal_inputs(gen, (2, 100, 5), torch.float64, device)
    labels = random_labels(gen, (2, 100), 5, device)
    num_fg = ((labels >= 0) & (labels < 5)).sum().clamp(min=1)
    out = ops.sigmoid_focal_loss_with_labels(x, labels, reduction="sum", normalizer=num_fg)
    exp = ref.sigmoid_focal_loss_with_labels(x, labels, reduction="sum") / num_fg
    assert_close(out, exp, seed=seed, **value_tolerance(torch.float64))


def test_focal_labels_all_ignored_mean_is_zero(device):
    x = torch.randn(4, 6, device=device, requires_grad=True)
    labels = torch.full((4,), -100, device=device)
    loss = ops.sigmoid_focal_loss_with_labels(x, labels, reduction="mean")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(x.grad == 0)
    empty = torch.empty(0, 6, device=device)
    assert ops.sigmoid_focal_loss_with_labels(empty, labels[:0], reduction="mean").item() == 0.0
    assert ops.sigmoid_focal_loss_with_labels(empty, labels[:0]).shape == (0, 6)


def test_focal_labels_ignored_rows_are_zero_with_non_finite_scale(device):
    # A zero normaliser makes the scale infinite: ignored rows still get loss and gradient exactly 0 (CUDA wrote
    # 0 * inf = NaN there).
    x = torch.randn(4, 3, device=device, requires_grad=True)
    labels = torch.tensor([0, -100, 3, -100], device=device)
    for normalizer in (0.0, torch.tensor(0.0), torch.tensor(0.0, device=device)):
        loss = ops.sigmoid_focal_loss_with_labels(x, labels, normalizer=normalizer)
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert torch.equal(loss[1::2].detach(), torch.zeros(2, 3, device=device))
        assert torch.equal(g[1::2], torch.zeros(2, 3, device=device))
        assert not torch.isfinite(loss[0::2]).any()


def test_focal_labels_out_of_range_cpu():
    x = torch.randn(4, 6)
    for bad in (6 + 1, -2, 100):
        labels = torch.tensor([0, 1, bad, -1])
        with pytest.raises(RuntimeError, match="labels must be in"):
            ops.sigmoid_focal_loss_with_labels(x, labels)
    # the ignore label is allowed whatever its value
    ops.sigmoid_focal_loss_with_labels(x, torch.tensor([0, 1, 255, -1]), ignore_index=255)


@pytest.mark.cuda
def test_focal_labels_out_of_range_cuda_gives_nan_row():
    x = torch.randn(4, 6, device="cuda")
    labels = torch.tensor([0, 1, 9, -1], device="cuda")
    out = ops.sigmoid_focal_loss_with_labels(x, labels)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3]]).all()
    assert torch.isnan(ops.sigmoid_focal_loss_with_labels(x, labels, reduction="sum"))


# --------------------------------------------------------------------------------------------------------------------
# box losses and smooth L1
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BOX_LOSSES)
@ALL_DTYPES
@REDUCTIONS
def test_box_loss_matches_reference(device, name, dtype, reduction, seed):
    gen = torch.Generator().manual_seed(seed)
    b1, b2 = box_pairs(gen, 301, dtype, device)
    fn, rfn = getattr(ops, name), getattr(ref, name)
    out, (g1, g2) = run_with_grad(lambda a, b: fn(a, b, reduction=reduction), b1, b2)
    exp, (e1, e2) = run_with_grad(lambda a, b: rfn(a, b, reduction=reduction), b1, b2)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    assert_close(out, exp, seed=seed, what="loss", **tol)
    gtol = tol if dtype != torch.float16 and dtype != torch.bfloat16 else value_tolerance(dtype)
    assert_close(g1, e1, seed=seed, what="grad boxes1", **gtol)
    assert_close(g2, e2, seed=seed, what="grad boxes2", **gtol)


@pytest.mark.parametrize("name", BOX_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@REDUCTIONS
@pytest.mark.parametrize("eps", [1e-7, 0.5])
def test_box_loss_matches_torchvision(device, name, dtype, reduction, eps, seed):
    tv = torchvision_ops()
    gen = torch.Generator().manual_seed(seed)
    b1, b2 = box_pairs(gen, 200, dtype, device)
    out, (g1, g2) = run_with_grad(lambda a, b: getattr(ops, name)(a, b, reduction=reduction, eps=eps), b1, b2)
    exp, (e1, e2) = run_with_grad(lambda a, b: getattr(tv, name)(a, b, reduction=reduction, eps=eps), b1, b2)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    assert_close(out, exp, seed=seed, what="loss vs torchvision", **tol)
    gtol = value_tolerance(dtype) if dtype in LOW_PRECISION else tol
    assert_close(g1, e1, seed=seed, what="grad boxes1 vs torchvision", **gtol)
    assert_close(g2, e2, seed=seed, what="grad boxes2 vs torchvision", **gtol)


@pytest.mark.parametrize("name", BOX_LOSSES)
def test_box_loss_edge_cases(device, name):
    tv = torchvision_ops()
    # identical, touching, nested, disjoint, a zero-area pair and shared edges (ties in min/max split the gradient)
    b1 = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 1, 1], [5, 5, 5, 5], [0, 0, 10, 4]],
                      dtype=torch.float64, device=device)
    b2 = torch.tensor([[0, 0, 10, 10], [10, 0, 20, 10], [2, 2, 8, 8], [5, 5, 6, 7], [5, 5, 5, 5], [0, 1, 10, 8]],
                      dtype=torch.float64, device=device)
    out, (g1, g2) = run_with_grad(lambda a, b: getattr(ops, name)(a, b), b1, b2)
    exp, (e1, e2) = run_with_grad(lambda a, b: getattr(tv, name)(a, b), b1, b2)
    torch.testing.assert_close(out, exp, equal_nan=True)
    torch.testing.assert_close(g1, e1, equal_nan=True)
    torch.testing.assert_close(g2, e2, equal_nan=True)


@pytest.mark.parametrize("name", BOX_LOSSES)
def test_box_loss_broadcast_and_empty(device, name, seed):
    gen = torch.Generator().manual_seed(seed)
    b1, b2 = box_pairs(gen, 6, torch.float64, device)
    fn, rfn = getattr(ops, name), getattr(ref, name)
    out, (g1, g2) = run_with_grad(lambda a, b: fn(a.view(2, 3, 4), b[:3]), b1, b2[:3])
    exp, (e1, e2) = run_with_grad(lambda a, b: rfn(a.view(2, 3, 4), b[:3]), b1, b2[:3])
    assert out.shape == (2, 3)
    assert_close(out, exp, seed=seed)
    assert_close(g2, e2, seed=seed)
    empty = torch.empty(0, 4, device=device, requires_grad=True)
    assert fn(empty, empty).shape == (0,)
    assert fn(empty, empty, reduction="mean").item() == 0.0  # torchvision: 0 for no pairs
    assert fn(empty, empty, reduction="sum").item() == 0.0
    fn(empty, empty, reduction="mean").backward()
    assert empty.grad.shape == (0, 4)


@ALL_DTYPES
@REDUCTIONS
@pytest.mark.parametrize("beta", [0.0, 1.0 / 9, 1.0])
def test_smooth_l1(device, dtype, reduction, beta, seed):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(64, 4, generator=gen, dtype=torch.float64) * 0.5).to(dtype).to(device)
    b = (torch.randn(64, 4, generator=gen, dtype=torch.float64) * 0.5).to(dtype).to(device)
    out, (ga, gb) = run_with_grad(lambda x, y: ops.smooth_l1_loss(x, y, beta=beta, reduction=reduction), a, b)
    exp, (ea, eb) = run_with_grad(
        lambda x, y: torch.nn.functional.smooth_l1_loss(x, y, beta=beta, reduction=reduction), a, b)
    assert_close(out, exp, seed=seed)
    assert_close(ga, ea, seed=seed)
    if dtype in (torch.float32, torch.float64):
        r = ref.smooth_l1_loss(a, b, beta=beta, reduction=reduction)
        assert_close(out, r, seed=seed, what="vs reference", **value_tolerance(dtype))


# --------------------------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile, determinism
# --------------------------------------------------------------------------------------------------------------------


@REDUCTIONS
@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_focal_gradcheck(device, reduction, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    x, t = focal_inputs(gen, (6, 5), torch.float64, device, soft=True)
    x = x.clamp(-8, 8).requires_grad_(True)
    labels = random_labels(gen, (6,), 5, device)
    norm = torch.tensor(3.0, dtype=torch.float64, device=device)
    torch.autograd.gradcheck(lambda a: ops.sigmoid_focal_loss(a, t, gamma=gamma, reduction=reduction), (x,))
    torch.autograd.gradcheck(
        lambda a: ops.sigmoid_focal_loss_with_labels(a, labels, gamma=gamma, reduction=reduction, normalizer=norm),
        (x,))


# CIoU is left out on purpose: its alpha is held constant in the backward (torchvision, the paper), so its gradient is
# not the derivative of its forward and gradcheck must fail; the reference/torchvision gradient tests cover it.
@pytest.mark.parametrize("name", BOX_LOSSES[:2])
@REDUCTIONS
def test_box_loss_gradcheck(device, name, reduction, seed):
    gen = torch.Generator().manual_seed(seed)
    b1, b2 = box_pairs(gen, 8, torch.float64, device)
    b1.requires_grad_(True)
    b2.requires_grad_(True)
    # Continuous inputs almost surely avoid the kinks (min/max ties, the overlap mask boundary).
    torch.autograd.gradcheck(lambda a, b: getattr(ops, name)(a, b, reduction=reduction), (b1, b2))


def _opcheck_focal_samples(device):
    gen = torch.Generator().manual_seed(0)
    x, t = focal_inputs(gen, (7, 3), torch.float32, device)
    norm = torch.tensor(2.0, device=device)
    for red in (0, 1, 2):
        for need_grad in (True, False):
            yield (x.clone().requires_grad_(need_grad), t, 0.25, 2.0, red, norm if red == 2 else None, need_grad)


def test_opcheck_focal(device):
    for args in _opcheck_focal_samples(device):
        torch.library.opcheck(torch.ops.fastdet.sigmoid_focal_loss.default, args)


def test_opcheck_focal_labels(device):
    gen = torch.Generator().manual_seed(1)
    x, _ = focal_inputs(gen, (2, 7, 3), torch.float32, device)
    labels = random_labels(gen, (2, 7), 3, device)
    for red in (0, 1, 2):
        args = (x.clone().requires_grad_(True), labels, -100, 0.25, 2.0, red, None, True)
        torch.library.opcheck(torch.ops.fastdet.sigmoid_focal_loss_with_labels.default, args)


def test_opcheck_box_pair_loss(device):
    gen = torch.Generator().manual_seed(2)
    b1, b2 = box_pairs(gen, 9, torch.float32, device)
    for variant in (1, 2, 3):
        for red in (0, 1, 2):
            args = (b1.clone().requires_grad_(True), b2.clone().requires_grad_(True), variant, red, 1e-7)
            torch.library.opcheck(torch.ops.fastdet.box_pair_loss.default, args)
            grad = torch.ones(9, device=device) if red == 0 else torch.tensor(1.0, device=device)
            torch.library.opcheck(torch.ops.fastdet._box_pair_loss_backward.default, (grad, b1, b2, variant, red, 1e-7))


def test_compile_fullgraph(device, seed):
    gen = torch.Generator().manual_seed(seed)
    x, t = focal_inputs(gen, (20, 6), torch.float32, device)
    labels = random_labels(gen, (20,), 6, device)
    b1, b2 = box_pairs(gen, 20, torch.float32, device)

    def total(logits, boxes):
        num_fg = ((labels >= 0) & (labels < 6)).sum().clamp(min=1)
        return (ops.sigmoid_focal_loss_with_labels(logits, labels, reduction="sum", normalizer=num_fg)
                + ops.sigmoid_focal_loss(logits, t, reduction="mean")
                + ops.generalized_box_iou_loss(boxes, b2, reduction="mean")
                + ops.complete_box_iou_loss(boxes, b2, reduction="sum")
                + ops.smooth_l1_loss(boxes, b2, beta=1 / 9, reduction="mean"))

    compiled = torch.compile(total, fullgraph=True, backend="aot_eager")
    out, (gx, gb) = run_with_grad(compiled, x, b1)
    exp, (ex, eb) = run_with_grad(total, x, b1)
    assert_close(out, exp, seed=seed)
    assert_close(gx, ex, seed=seed)
    assert_close(gb, eb, seed=seed)


def test_reduction_is_deterministic_and_thread_independent(seed):
    gen = torch.Generator().manual_seed(seed)
    x, t = focal_inputs(gen, (3000, 80), torch.float32, "cpu")
    b1, b2 = box_pairs(gen, 30000, torch.float32, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append((ops.sigmoid_focal_loss(x, t, reduction="sum"), ops.diou_loss(b1, b2, reduction="sum")))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_cpu_scalar_path_matches_vectorised_path(tmp_path):
    # The CPU kernel evaluates float32/float16/bfloat16 8 at a time with AVX2 where it can; FASTDET_FOCAL_SCALAR=1
    # forces the scalar code (the per-element function the CUDA kernel compiles). Both must agree to rounding.
    import subprocess
    import sys

    script = (
        "import torch, fastdet.ops as ops\n"
        "g = torch.Generator().manual_seed(5)\n"
        "x = torch.randn(300, 17, generator=g) * 6\n"
        "x[0, :4] = torch.tensor([float('inf'), -float('inf'), float('nan'), 0.0])\n"
        "t = (torch.rand(300, 17, generator=g) < 0.2).float()\n"
        "labels = torch.randint(-1, 18, (300,), generator=g)\n"
        "out = {}\n"
        "for dtype in (torch.float32, torch.bfloat16):\n"
        "    for gamma in (2.0, 1.5, 0.0):\n"
        "        xr = x.to(dtype).requires_grad_(True)\n"
        "        loss = ops.sigmoid_focal_loss(xr, t.to(dtype), gamma=gamma)\n"
        "        (gx,) = torch.autograd.grad(loss.sum(), xr)\n"
        "        lab = ops.sigmoid_focal_loss_with_labels(x[1:].to(dtype), labels[1:], gamma=gamma, reduction='sum')\n"
        "        out[f'{dtype}-{gamma}'] = (loss.detach(), gx, lab)\n"
        "torch.save(out, __import__('sys').argv[1])\n"
    )
    results = []
    for scalar in ("1", "0"):
        path = tmp_path / f"scalar{scalar}.pt"
        env = dict(__import__("os").environ, FASTDET_FOCAL_SCALAR=scalar)
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env)
        results.append(torch.load(path))
    for key, (loss_s, grad_s, lab_s) in results[0].items():
        loss_v, grad_v, lab_v = results[1][key]
        tol = value_tolerance(loss_s.dtype)
        torch.testing.assert_close(loss_v, loss_s, equal_nan=True, **tol, msg=lambda m: f"{key} loss: {m}")
        torch.testing.assert_close(grad_v, grad_s, equal_nan=True, **tol, msg=lambda m: f"{key} grad: {m}")
        torch.testing.assert_close(lab_v, lab_s, **tol, msg=lambda m: f"{key} labels: {m}")


@pytest.mark.cuda
def test_cuda_losses_do_not_synchronise(seed):
    # "error" makes any synchronising CUDA call (item(), nonzero(), a blocking copy) raise inside the block.
    gen = torch.Generator().manual_seed(seed)
    x, t = focal_inputs(gen, (4, 1000, 8), torch.float32, "cuda")
    labels = random_labels(gen, (4, 1000), 8, "cuda")
    b1, b2 = box_pairs(gen, 500, torch.float32, "cuda")
    x.requires_grad_(True)
    b1.requires_grad_(True)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        num_fg = ((labels >= 0) & (labels < 8)).sum().clamp(min=1)
        total = (ops.sigmoid_focal_loss_with_labels(x, labels, reduction="sum", normalizer=num_fg)
                 + ops.sigmoid_focal_loss_with_labels(x, labels, reduction="mean")
                 + ops.sigmoid_focal_loss(x, t, reduction="mean", normalizer=num_fg)
                 + ops.sigmoid_focal_loss(x, t).sum()
                 # a CPU normaliser is copied to the device without a blocking copy
                 + ops.sigmoid_focal_loss(x, t, reduction="sum", normalizer=torch.tensor(7.0))
                 + ops.sigmoid_focal_loss_with_labels(x, labels, reduction="mean", normalizer=torch.tensor(3))
                 + ops.generalized_box_iou_loss(b1, b2, reduction="mean")
                 + ops.complete_box_iou_loss(b1, b2).sum())
        total.backward()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert torch.isfinite(total).item()


@pytest.mark.cuda
def test_cuda_reduction_is_bitwise_reproducible(seed):
    gen = torch.Generator().manual_seed(seed)
    x, t = focal_inputs(gen, (16, 12000, 80), torch.float32, "cuda")
    first = ops.sigmoid_focal_loss(x, t, reduction="sum")
    for _ in range(3):
        assert torch.equal(ops.sigmoid_focal_loss(x, t, reduction="sum"), first)


# --------------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------------


def test_bad_input(device):
    x = torch.randn(4, 3, device=device)
    t = torch.zeros(4, 3, device=device)
    with pytest.raises(ValueError, match="shape"):
        ops.sigmoid_focal_loss(x, t[:2])
    with pytest.raises(TypeError, match="floating"):
        ops.sigmoid_focal_loss(x, t.long())
    with pytest.raises(ValueError, match="reduction"):
        ops.sigmoid_focal_loss(x, t, reduction="avg")
    with pytest.raises(ValueError, match="alpha"):
        ops.sigmoid_focal_loss(x, t, alpha=1.5)
    with pytest.raises(ValueError, match="gamma"):
        ops.sigmoid_focal_loss(x, t, gamma=-1.0)
    with pytest.raises(ValueError, match="normalizer"):
        ops.sigmoid_focal_loss(x, t, normalizer=torch.ones(2, device=device))
    if device == "cuda":
        with pytest.raises(ValueError, match="normalizer must be on the device"):
            ops.sigmoid_focal_loss(x.cpu(), t.cpu(), normalizer=torch.tensor(2.0, device=device))
        ops.sigmoid_focal_loss(x, t, normalizer=torch.tensor(2.0))  # a CPU normaliser is copied, no sync
    with pytest.raises(ValueError, match="labels must have shape"):
        ops.sigmoid_focal_loss_with_labels(x, torch.zeros(3, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="integer"):
        ops.sigmoid_focal_loss_with_labels(x, torch.zeros(4, device=device))
    with pytest.raises(ValueError, match="shape"):
        ops.generalized_box_iou_loss(torch.zeros(3, 4, device=device), torch.zeros(3, 5, device=device))
    with pytest.raises(ValueError, match="broadcast"):
        ops.distance_box_iou_loss(torch.zeros(3, 4, device=device), torch.zeros(2, 4, device=device))
    with pytest.raises(ValueError, match="same shape"):
        ops.smooth_l1_loss(torch.zeros(3, device=device), torch.zeros(2, device=device))
    with pytest.raises(ValueError, match="beta"):
        ops.smooth_l1_loss(torch.zeros(3, device=device), torch.zeros(3, device=device), beta=-1)
    # The native ops check their arguments too (for direct torch.ops calls).
    with pytest.raises(RuntimeError, match="reduction"):
        torch.ops.fastdet.sigmoid_focal_loss(x, t, 0.25, 2.0, 5, None, False)
    with pytest.raises(RuntimeError, match="variant"):
        torch.ops.fastdet.box_pair_loss(torch.zeros(2, 4, device=device), torch.zeros(2, 4, device=device), 7, 0, 0.0)
