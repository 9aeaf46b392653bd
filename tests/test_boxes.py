"""fastdet.ops box utilities and the pairwise IoU family against the reference (always) and torchvision (when
installed): values, dtypes, shapes, gradients, operator registration, torch.compile and argument errors.

Every test draws fresh inputs from the ``seed`` fixture; failure messages carry the seed, and FASTDET_TEST_SEED=<seed>
replays it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from fastdet import ops
from fastdet.ops import reference as ref

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)

# Random boxes: corners in [0, SCALE), sides in [MIN_SIDE, MIN_SIDE + SCALE / 2). Plenty of pairs overlap, plenty
# do not. The tolerances below are derived from these two numbers.
SCALE = 100.0
MIN_SIDE = 1.0


@dataclass(frozen=True)
class Variant:
    """One pairwise function: its name in fastdet.ops / reference / torchvision.ops and fixed keyword arguments."""

    name: str
    kwargs: dict = field(default_factory=dict)

    @property
    def fmt(self) -> str:
        return self.kwargs.get("fmt", "xyxy")

    def __call__(self, module, boxes1, boxes2):
        return getattr(module, self.name)(boxes1, boxes2, **self.kwargs)


VARIANTS = {
    "iou-xyxy": Variant("box_iou", {"fmt": "xyxy"}),
    "iou-xywh": Variant("box_iou", {"fmt": "xywh"}),
    "iou-cxcywh": Variant("box_iou", {"fmt": "cxcywh"}),
    "giou": Variant("generalized_box_iou"),
    "diou": Variant("distance_box_iou"),
    "ciou": Variant("complete_box_iou"),
}
XYXY_VARIANTS = {k: v for k, v in VARIANTS.items() if v.fmt == "xyxy"}
ALL_VARIANTS = pytest.mark.parametrize("variant", list(VARIANTS.values()), ids=list(VARIANTS))
XYXY_ONLY = pytest.mark.parametrize("variant", list(XYXY_VARIANTS.values()), ids=list(XYXY_VARIANTS))
ALL_DTYPES = pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
ORACLES = pytest.mark.parametrize("oracle", ["reference", "torchvision"])


# --------------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------------


def torchvision_ops():
    pytest.importorskip("torchvision", reason="torchvision is not installed; the torchvision parity case is skipped")
    import torchvision.ops

    return torchvision.ops


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in LOW_PRECISION else t


def random_boxes(gen, *shape, dtype=torch.float32, device="cpu", fmt="xyxy", scale=SCALE, min_side=MIN_SIDE):
    """Well-formed boxes ``[*shape, 4]`` drawn in float64 and rounded once to ``dtype`` (rounding is monotonic, so
    x2 >= x1 survives it)."""
    corner = torch.rand(*shape, 2, generator=gen, dtype=torch.float64) * scale
    size = min_side + torch.rand(*shape, 2, generator=gen, dtype=torch.float64) * (scale / 2)
    boxes = torch.cat([corner, corner + size], dim=-1)
    if fmt != "xyxy":
        boxes = ref.box_convert(boxes, "xyxy", fmt)
    return boxes.to(dtype).to(device)


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view; the gaps hold NaN, so a kernel that ignored strides would show it."""
    buffer = torch.full((*t.shape, 2), float("nan"), dtype=t.dtype, device=t.device)
    buffer[..., 0] = t
    view = buffer[..., 0]
    assert t.numel() <= 1 or not view.is_contiguous()
    return view


def assert_close(actual, expected, *, seed, what="", **tolerance):
    torch.testing.assert_close(
        actual,
        expected,
        equal_nan=True,
        msg=lambda detail: f"{what} [seed={seed}; replay with FASTDET_TEST_SEED={seed}]\n{detail}",
        **tolerance,
    )


def tight_tolerance(dtype: torch.dtype, fmt: str = "xyxy") -> dict:
    """fastdet against an oracle evaluating the same expression in the same accumulation dtype.

    float16/bfloat16 inputs convert exactly to float32, so they get float32's tolerance. The two sides differ only in
    the rounding of a few operations (the atan implementation in CIoU), i.e. a few ulp of values of magnitude <= 2.
    For ``xywh``/``cxcywh`` torchvision (and the reference) take the area as ``w * h`` while fastdet converts to
    corners first and recomputes ``(x2 - x1) * (y2 - y1)``: ``(x + w) - x`` is off from ``w`` by up to half an ulp of
    ``x + w`` (< 1.5 * SCALE), relative to ``w >= MIN_SIDE``, twice (area and union), hence the wider bound there.
    Low-precision size-based boxes are exact in float32 either way (11-bit mantissas fit float32's 24 with room).
    """
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-12}
    if fmt != "xyxy" and dtype == torch.float32:
        ulp = torch.finfo(torch.float32).eps * 2 ** math.floor(math.log2(1.5 * SCALE))  # float32 ulp below 1.5*SCALE
        return {"rtol": 1e-5, "atol": 4 * (ulp / 2) / MIN_SIDE}
    return {"rtol": 1e-5, "atol": 1e-6}


def torchvision_low_precision_bound(boxes1, boxes2, fmt: str) -> float:
    """Absolute error bound for torchvision evaluated natively in float16/bfloat16, against fastdet (float32).

    torchvision's IoU and GIoU round, in the input dtype, the far corner ``x + w`` (size-based formats) and each
    corner difference; each rounding errs by at most ``u * R``, with ``u`` the unit roundoff and ``R`` the largest
    magnitude involved (at most twice the largest coordinate). An intersection or enclosure side is thus off by
    ``e <= 2 u R``. With ``s`` the shortest box side: the intersection ``I = iw * ih`` errs by ``<= e (iw + ih)``,
    and since the union ``U >= w1 h1`` and ``iw <= w1``, ``ih <= h1``, ``|dIoU| <= dI / U <= 2 e / s``. GIoU adds
    ``d(U / C) <= dI / C + dC / C <= 4 e / s``, so ``|dGIoU| <= 6 e / s``. DIoU and CIoU upcast first in torchvision
    and need no bound (the tight comparison covers them); the bound returned is ``8 e / s`` for all.
    """
    dtype = boxes1.dtype
    u = torch.finfo(dtype).eps / 2
    b1, b2 = upcast(boxes1).reshape(-1, 4), upcast(boxes2).reshape(-1, 4)
    coords = torch.cat([b1.reshape(-1), b2.reshape(-1)])
    coords = coords[torch.isfinite(coords)]  # NaN/Inf coordinates give NaN or 0 on both sides, no rounding involved
    if coords.numel() == 0:
        return 0.0
    largest = 2 * coords.abs().max().item()
    boxes = torch.cat([b1, b2])
    if fmt == "xyxy":
        sides = torch.cat([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    else:
        sides = torch.cat([boxes[:, 2], boxes[:, 3]])
    # zero-size sides make intersections exactly 0 on both sides; they need no slack
    sides = sides.abs()[torch.isfinite(sides) & (sides != 0)]
    if sides.numel() == 0:
        return 0.0
    e = 2 * u * largest
    return 8 * e / sides.min().item()


def check_against_oracle(oracle: str, variant: Variant, boxes1, boxes2, actual, *, seed, what=""):
    """Compare ``actual`` (fastdet's result) with the reference, or with torchvision on float32-upcast inputs (tight)
    and, for low-precision inputs, on the raw inputs (bounded by :func:`torchvision_low_precision_bound`)."""
    dtype = boxes1.dtype
    if oracle == "reference":
        expected = variant(ref, boxes1, boxes2)
        assert_close(actual, expected, seed=seed, what=f"{what} vs reference", **tight_tolerance(dtype, variant.fmt))
        return
    tv_ops = torchvision_ops()
    expected = variant(tv_ops, upcast(boxes1), upcast(boxes2))
    assert_close(actual, expected, seed=seed, what=f"{what} vs torchvision(upcast)",
                 **tight_tolerance(dtype, variant.fmt))
    if dtype in LOW_PRECISION:
        native = variant(tv_ops, boxes1, boxes2)
        bound = torchvision_low_precision_bound(boxes1, boxes2, variant.fmt)
        assert_close(actual, native, seed=seed, what=f"{what} vs torchvision(native {dtype})", rtol=0, atol=bound)


# --------------------------------------------------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------------------------------------------------


@ORACLES
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@ALL_DTYPES
@ALL_VARIANTS
def test_pairwise_2d(device, variant, dtype, contiguous, oracle, seed):
    gen = torch.Generator().manual_seed(seed)
    boxes1 = random_boxes(gen, 37, dtype=dtype, device=device, fmt=variant.fmt)
    boxes2 = random_boxes(gen, 23, dtype=dtype, device=device, fmt=variant.fmt)
    if not contiguous:
        boxes1, boxes2 = strided(boxes1), strided(boxes2)
    before1, before2 = boxes1.clone(), boxes2.clone()

    actual = variant(ops, boxes1, boxes2)

    assert actual.shape == (37, 23)
    assert actual.dtype == result_dtype(dtype)
    assert actual.device == boxes1.device
    check_against_oracle(oracle, variant, boxes1, boxes2, actual, seed=seed, what=variant.name)
    assert torch.equal(boxes1, before1) and torch.equal(boxes2, before2), "inputs were modified in place"


# [..., N, 4] x [..., M, 4] with leading dims that broadcast, including mixed ranks.
BATCH_SHAPES = {
    "batched": ((3, 11), (3, 7)),
    "broadcast-1": ((2, 1, 11), (3, 7)),
    "rank2-vs-rank3": ((11,), (2, 7)),
    "rank4-vs-rank2": ((2, 3, 11), (7,)),
    "broadcast-both": ((4, 1, 5), (1, 3, 6)),
}


@ORACLES
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shapes", list(BATCH_SHAPES.values()), ids=list(BATCH_SHAPES))
@ALL_DTYPES
@ALL_VARIANTS
def test_pairwise_batched(device, variant, dtype, shapes, contiguous, oracle, seed):
    gen = torch.Generator().manual_seed(seed)
    shape1, shape2 = shapes
    boxes1 = random_boxes(gen, *shape1, dtype=dtype, device=device, fmt=variant.fmt)
    boxes2 = random_boxes(gen, *shape2, dtype=dtype, device=device, fmt=variant.fmt)
    if not contiguous:
        boxes1, boxes2 = strided(boxes1), strided(boxes2)

    actual = variant(ops, boxes1, boxes2)

    lead = torch.broadcast_shapes(shape1[:-1], shape2[:-1])
    assert actual.shape == (*lead, shape1[-1], shape2[-1])
    assert actual.dtype == result_dtype(dtype)
    check_against_oracle(oracle, variant, boxes1, boxes2, actual, seed=seed, what=f"{variant.name} {shapes}")


def adversarial_boxes() -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-picked boxes for the edges of the formulas (xyxy)."""
    nan, inf = float("nan"), float("inf")
    boxes1 = [
        [0, 0, 10, 10],  # ordinary; identical to boxes2[0]
        [10, 0, 20, 10],  # shares the edge x = 10 with boxes2[0]: IoU exactly 0
        [10, 10, 20, 20],  # shares only the corner (10, 10) with boxes2[0]
        [5, 5, 5, 5],  # a point: zero area; against itself the union is 0 -> NaN
        [8, 8, 2, 2],  # inverted on both axes: positive area from two negative sides
        [8, 0, 2, 10],  # inverted on x only: negative area
        [0, 0, 0, 10],  # zero width, non-zero height
        [nan, 0, 10, 10],
        [0, 0, inf, 10],
        [-inf, 0, 10, 10],
        [0, 0, 10, 10.0001],  # nearly identical
    ]
    boxes2 = [
        [0, 0, 10, 10],
        [5, 5, 5, 5],
        [2, 2, 8, 8],  # strictly inside boxes1[0]
        [0, 10, 10, 20],  # shares the edge y = 10 with boxes1[0]
        [30, 30, 40, 40],  # far away
        [0, 0, 0, 10],
        [0, 0, 10, nan],
    ]
    return torch.tensor(boxes1, dtype=torch.float64), torch.tensor(boxes2, dtype=torch.float64)


@ORACLES
@ALL_DTYPES
@XYXY_ONLY
def test_pairwise_adversarial(device, variant, dtype, oracle, seed):
    boxes1, boxes2 = adversarial_boxes()
    boxes1, boxes2 = boxes1.to(device=device, dtype=dtype), boxes2.to(device=device, dtype=dtype)

    actual = variant(ops, boxes1, boxes2)

    check_against_oracle(oracle, variant, boxes1, boxes2, actual, seed=seed, what=f"{variant.name} adversarial")
    # Values pinned independently of any oracle. Identical boxes: every variant gives exactly 1.
    assert actual[0, 0].item() == 1.0
    # Boxes touching along an edge or a corner share no area: IoU is exactly 0, not a rounding residue.
    if variant.name == "box_iou":
        assert actual[1, 0].item() == 0.0 and actual[2, 0].item() == 0.0 and actual[0, 3].item() == 0.0
        # a zero-area box against itself: 0 / 0
        assert math.isnan(actual[3, 1].item())
    # A NaN coordinate poisons the box's area, and with it the whole row / column.
    assert torch.isnan(actual[7]).all() and torch.isnan(actual[:, 6]).all()


@ORACLES
@XYXY_ONLY
def test_pairwise_float16_in_the_thousands(device, variant, oracle, seed):
    """Areas of float16 boxes a few thousand pixels wide exceed float16's range (65504); fastdet must not overflow."""
    gen = torch.Generator().manual_seed(seed)
    boxes1 = random_boxes(gen, 29, dtype=torch.float16, device=device, scale=3000.0, min_side=50.0)
    boxes2 = random_boxes(gen, 17, dtype=torch.float16, device=device, scale=3000.0, min_side=50.0)

    actual = variant(ops, boxes1, boxes2)

    assert torch.isfinite(actual).all(), f"non-finite values [seed={seed}]"
    check_against_oracle(oracle, variant, boxes1, boxes2, actual, seed=seed, what=f"{variant.name} fp16 thousands")


EMPTY_SHAPES = {
    "N=0": ((0, 4), (5, 4)),
    "M=0": ((5, 4), (0, 4)),
    "N=M=0": ((0, 4), (0, 4)),
    "B=0": ((0, 3, 4), (0, 2, 4)),
    "batched-N=0": ((2, 0, 4), (2, 3, 4)),
    "batched-M=0": ((2, 3, 4), (2, 0, 4)),
    "broadcast-N=0": ((2, 1, 0, 4), (3, 5, 4)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shapes", list(EMPTY_SHAPES.values()), ids=list(EMPTY_SHAPES))
@ALL_VARIANTS
def test_pairwise_empty(device, variant, shapes, dtype):
    boxes1 = torch.rand(shapes[0], dtype=dtype, device=device, requires_grad=True)
    boxes2 = torch.rand(shapes[1], dtype=dtype, device=device, requires_grad=True)

    actual = variant(ops, boxes1, boxes2)
    expected = variant(ref, boxes1, boxes2)

    assert actual.shape == expected.shape
    assert actual.dtype == result_dtype(dtype)
    actual.sum().backward()
    assert boxes1.grad.shape == boxes1.shape and boxes2.grad.shape == boxes2.shape
    assert boxes1.grad.dtype == dtype


# --------------------------------------------------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------------------------------------------------


def gradients(module, variant, boxes1, boxes2, upstream):
    b1 = boxes1.detach().clone().requires_grad_(True)
    b2 = boxes2.detach().clone().requires_grad_(True)
    out = variant(module, b1, b2)
    return torch.autograd.grad(out, (b1, b2), upstream)


def assert_gradients_match(variant, boxes1, boxes2, *, seed, what=""):
    gen = torch.Generator().manual_seed(seed + 1)
    out_shape = variant(ref, boxes1, boxes2).shape
    # A dense random upstream gradient: no zeros, so the kernel's "skip g == 0" shortcut cannot hide a NaN/Inf local
    # derivative that autograd would propagate (0 * inf = NaN).
    upstream = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(boxes1.device)
    got = gradients(ops, variant, boxes1, boxes2, upstream)
    want = gradients(ref, variant, boxes1, boxes2, upstream)
    for name, g, w in zip(("boxes1", "boxes2"), got, want):
        assert_close(g, w, seed=seed, what=f"{what} d/d{name}", rtol=1e-10, atol=1e-10)


GRAD_SHAPES = {"2d": ((9,), (6,)), "batched": ((2, 5), (2, 4)), "broadcast": ((2, 1, 5), (3, 4))}


@pytest.mark.parametrize("shapes", list(GRAD_SHAPES.values()), ids=list(GRAD_SHAPES))
@ALL_VARIANTS
def test_gradients_match_reference(device, variant, shapes, seed):
    # Includes CIoU, whose gradient deliberately treats alpha as a constant: the reference's autograd (alpha under
    # no_grad) is the specification here, since gradcheck cannot be.
    gen = torch.Generator().manual_seed(seed)
    boxes1 = random_boxes(gen, *shapes[0], dtype=torch.float64, device=device, fmt=variant.fmt)
    boxes2 = random_boxes(gen, *shapes[1], dtype=torch.float64, device=device, fmt=variant.fmt)
    assert_gradients_match(variant, boxes1, boxes2, seed=seed, what=variant.name)


def grid_boxes(gen, n, *, device, fmt):
    """Boxes whose corners come from tiny integer sets: x1, y1 in {0, 1, 2} and x2, y2 in {5, 6, 7}. Every pair
    overlaps (intersection sides >= 3), and most pairs share one or more coordinates, so most elementwise min/max in
    the formulas are ties and the gradient split between the two arguments is exercised; identical boxes and equal
    aspect ratios (CIoU's atan difference 0) are common too."""
    low = torch.randint(0, 3, (n, 2), generator=gen)
    high = torch.randint(5, 8, (n, 2), generator=gen)
    boxes = torch.cat([low, high], dim=1).to(torch.float64)
    if fmt != "xyxy":
        boxes = ref.box_convert(boxes, "xyxy", fmt)  # exact for these integers
    return boxes.to(device)


@ALL_VARIANTS
def test_gradients_with_shared_coordinates(device, variant, seed):
    gen = torch.Generator().manual_seed(seed)
    boxes1 = grid_boxes(gen, 12, device=device, fmt=variant.fmt)
    boxes2 = torch.cat([boxes1[:4], grid_boxes(gen, 8, device=device, fmt=variant.fmt)])  # some exact duplicates
    assert_gradients_match(variant, boxes1, boxes2, seed=seed, what=f"{variant.name} ties")


def torch_clamp_gradient_at_bound() -> float:
    x = torch.zeros((), dtype=torch.float64, requires_grad=True)
    x.clamp(min=0).backward()
    return x.grad.item()


@XYXY_ONLY
def test_gradients_of_touching_boxes(device, variant, seed):
    """Touching boxes put an intersection side exactly on clamp(min=0)'s bound. torch 2.14 (the pinned version, hence
    torchvision's gradient there) passes no gradient through a scalar clamp at its bound, and fastdet's backward
    follows it; other torch releases have used the opposite convention, so the test says so instead of failing
    mysteriously."""
    if torch_clamp_gradient_at_bound() != 0.0:
        pytest.skip(
            f"torch {torch.__version__} passes clamp(min=0)'s gradient at the bound; fastdet follows torch 2.14, which "
            "does not, so the touching-box gradients differ by design on this torch"
        )
    boxes1 = torch.tensor(
        [[0, 0, 1, 1], [1, 0, 2, 1], [1, 1, 2, 2], [0, 1, 1, 3], [0.5, -1, 3, 0]], dtype=torch.float64, device=device
    )
    boxes2 = torch.tensor([[1, 0, 3, 2], [0, 0, 1, 1], [-2, 1, 0.5, 2]], dtype=torch.float64, device=device)
    assert_gradients_match(variant, boxes1, boxes2, seed=seed, what=f"{variant.name} touching")


GRADCHECK_VARIANTS = {k: VARIANTS[k] for k in ("iou-xyxy", "iou-xywh", "iou-cxcywh", "giou", "diou")}


@pytest.mark.parametrize("batched", [False, True], ids=["2d", "batched"])
@pytest.mark.parametrize("variant", list(GRADCHECK_VARIANTS.values()), ids=list(GRADCHECK_VARIANTS))
def test_gradcheck(device, variant, batched, seed):
    # CIoU is absent on purpose: its backward holds alpha constant (as torchvision and the CIoU paper do), so it is not
    # the derivative of the forward and gradcheck must fail; test_gradients_match_reference covers it instead.
    lead = (2,) if batched else ()
    for attempt in range(3):
        run_seed = seed + attempt
        gen = torch.Generator().manual_seed(run_seed)
        # Continuous random boxes hit a kink (a tie or a side exactly 0) with probability zero, and one within
        # gradcheck's step of 1e-6 with negligible probability.
        boxes1 = random_boxes(gen, *lead, 4, dtype=torch.float64, device=device, fmt=variant.fmt, scale=10.0)
        boxes2 = random_boxes(gen, *lead, 5, dtype=torch.float64, device=device, fmt=variant.fmt, scale=10.0)
        boxes1.requires_grad_(True)
        boxes2.requires_grad_(True)
        try:
            torch.autograd.gradcheck(lambda a, b: variant(ops, a, b), (boxes1, boxes2))
        except torch.autograd.gradcheck.GradcheckError as exc:
            raise AssertionError(f"gradcheck failed [seed={run_seed}]: {exc}") from None


# --------------------------------------------------------------------------------------------------------------------
# operator registration: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------------------------


def opcheck_samples(device):
    gen = torch.Generator().manual_seed(0)
    yield random_boxes(gen, 5, device=device), random_boxes(gen, 3, device=device)
    yield random_boxes(gen, 2, 4, dtype=torch.float64, device=device), random_boxes(
        gen, 2, 3, dtype=torch.float64, device=device
    )
    yield random_boxes(gen, 4, dtype=torch.float16, device=device), random_boxes(
        gen, 6, dtype=torch.float16, device=device
    )
    yield torch.zeros(0, 4, device=device), random_boxes(gen, 3, device=device)


@pytest.mark.parametrize("variant_id", [0, 1, 2, 3], ids=["iou", "giou", "diou", "ciou"])
def test_opcheck_pairwise_box_iou(device, variant_id):
    for boxes1, boxes2 in opcheck_samples(device):
        grad_ok = boxes1.dtype != torch.float16
        args = (boxes1.requires_grad_(grad_ok), boxes2.requires_grad_(grad_ok), variant_id, 1e-7)
        torch.library.opcheck(torch.ops.fastdet.pairwise_box_iou.default, args)


@pytest.mark.parametrize("variant_id", [0, 1, 2, 3], ids=["iou", "giou", "diou", "ciou"])
def test_opcheck_pairwise_box_iou_backward(device, variant_id):
    for boxes1, boxes2 in opcheck_samples(device):
        out = torch.ops.fastdet.pairwise_box_iou(boxes1, boxes2, variant_id, 1e-7)
        grad = torch.randn_like(out)
        args = (grad, boxes1, boxes2, variant_id, 1e-7)
        # the backward op has no backward of its own, so the autograd-registration check does not apply
        torch.library.opcheck(
            torch.ops.fastdet._pairwise_box_iou_backward.default,
            args,
            test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
        )


@pytest.mark.parametrize(
    "name, backend",
    [("box_iou", "aot_eager"), ("generalized_box_iou", "aot_eager"), ("box_iou", "inductor")],
    ids=["box_iou-aot_eager", "generalized_box_iou-aot_eager", "box_iou-inductor"],
)
def test_compile_fullgraph(device, name, backend, seed):
    # aot_eager traces forward and backward through the fake kernels and the registered backward op; one inductor
    # case checks real code generation around the op without paying inductor's C++ compile time for every op.
    torch._dynamo.reset()
    fn = getattr(ops, name)

    def loss_terms(boxes1, boxes2):
        # a little graph around the op, so the compiled region is more than the op itself
        return fn(boxes1 * 1.0, boxes2).clamp(min=-1.0) * 2.0

    compiled = torch.compile(loss_terms, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    # with aot_eager a second size recompiles with dynamic shapes, exercising the fake kernel on symbolic sizes
    sizes = ((6, 5), (9, 4)) if backend == "aot_eager" else ((6, 5),)
    for n, m in sizes:
        boxes1 = random_boxes(gen, n, device=device).requires_grad_(True)
        boxes2 = random_boxes(gen, m, device=device).requires_grad_(True)
        got = compiled(boxes1, boxes2)
        got_grads = torch.autograd.grad(got.sum(), (boxes1, boxes2))
        want = loss_terms(boxes1, boxes2)
        want_grads = torch.autograd.grad(want.sum(), (boxes1, boxes2))
        assert_close(got, want, seed=seed, what=f"compiled {name} ({backend})", rtol=1e-5, atol=1e-6)
        for g, w in zip(got_grads, want_grads):
            assert_close(g, w, seed=seed, what=f"compiled {name} gradient ({backend})", rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# argument errors
# --------------------------------------------------------------------------------------------------------------------


def _boxes(*shape, **kwargs):
    return torch.rand(*shape, 4, **kwargs)


BAD_PAIRWISE_INPUTS = {
    # integer boxes are accepted, as in torchvision (tests/test_op_contract.py); complex ones are not
    "complex-boxes1": (lambda: (_boxes(3).to(torch.complex64), _boxes(2)), TypeError, r"boxes1 must be a real"),
    "complex-boxes2": (lambda: (_boxes(3), _boxes(2).to(torch.complex64)), TypeError, r"boxes2 must be a real"),
    "not-a-tensor": (lambda: ([[0.0, 0.0, 1.0, 1.0]], _boxes(2)), TypeError, r"boxes1 must be a torch\.Tensor"),
    "last-dim-5": (lambda: (_boxes(3), torch.rand(2, 5)), ValueError, r"boxes2 must have shape \[\.\.\., 4\]"),
    "rank-1": (lambda: (torch.rand(4), _boxes(2)), ValueError, r"boxes1 must have shape"),
    "devices": (lambda: (_boxes(3), _boxes(2, device="meta")), ValueError, r"boxes1 and boxes2 .*same device"),
    "batch-sizes": (lambda: (_boxes(2, 3), _boxes(3, 2)), ValueError, r"boxes1 .*boxes2 .*do not broadcast"),
    "leading-dims": (lambda: (_boxes(2, 3, 5), _boxes(4, 2)), ValueError, r"boxes1 .*boxes2 .*do not broadcast"),
}


@pytest.mark.parametrize("case", list(BAD_PAIRWISE_INPUTS.values()), ids=list(BAD_PAIRWISE_INPUTS))
@ALL_VARIANTS
def test_pairwise_bad_input(variant, case):
    make_args, error, message = case
    with pytest.raises(error, match=message):
        variant(ops, *make_args())


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.box_iou(_boxes(2), _boxes(2), fmt="xyxyr"), r"fmt must be one of"),
        (lambda: ops.box_area(_boxes(2), fmt="XYXY"), r"fmt must be one of"),
        (lambda: ops.box_convert(_boxes(2), "xyxy", "polar"), r"out_fmt must be one of"),
        (lambda: ops.box_convert(_boxes(2), "ltrb", "xyxy"), r"in_fmt must be one of"),
        (lambda: ops.clip_boxes_to_image(_boxes(2), (10,)), r"size must be \(height, width\)"),
        (lambda: ops.clip_boxes_to_image(_boxes(2), (-1, 10)), r"size must be non-negative"),
    ],
    ids=["box_iou-fmt", "box_area-fmt", "out_fmt", "in_fmt", "size-length", "size-negative"],
)
def test_bad_format_or_size(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize(
    "args, message",
    [
        ((_boxes(3), _boxes(2).double(), 0, 0.0), r"boxes1 and boxes2 must have the same dtype"),
        ((_boxes(3), _boxes(2), 7, 0.0), r"variant must be 0 \(IoU\)"),
        ((_boxes(1, 2, 3), _boxes(1, 2, 3), 0, 0.0), r"boxes1 must have shape \[N, 4\] or \[B, N, 4\]"),
        ((_boxes(2, 3), _boxes(3, 3), 0, 0.0), r"boxes1 and boxes2 must have the same batch size B"),
        ((_boxes(3), _boxes(2, 3), 0, 0.0), r"boxes1 and boxes2 must both be"),
        ((_boxes(3).int(), _boxes(2).int(), 0, 0.0), r"boxes1 must be a floating-point tensor"),
    ],
    ids=["dtype", "variant", "rank", "batch", "ranks-differ", "integer"],
)
def test_native_op_argument_checks(args, message):
    """The C++ schema checks, reached when the op is called directly (the Python wrapper normally catches these)."""
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastdet.pairwise_box_iou(*args)


# --------------------------------------------------------------------------------------------------------------------
# single-set utilities
# --------------------------------------------------------------------------------------------------------------------


def utility_boxes(gen, dtype, device):
    """Random boxes, some sticking out of a 60 x 80 image, a NaN and an inverted one, with an extra leading dim."""
    boxes = random_boxes(gen, 2, 9, dtype=torch.float64) - 20
    boxes[0, 0, 0] = float("nan")
    boxes[1, 1] = torch.tensor([40.0, 30.0, 10.0, 5.0])
    return boxes.to(dtype=dtype, device=device)


def check_utility(oracle, fn_name, *args, seed, **kwargs):
    """fastdet vs the reference or torchvision for a single-set utility: bit-exact (same expressions in the same
    dtype), and the input must come back unmodified."""
    before = args[0].clone()
    actual = getattr(ops, fn_name)(*args, **kwargs)
    module = ref if oracle == "reference" else torchvision_ops()
    expected = getattr(module, fn_name)(*args, **kwargs)
    assert_close(actual, expected, seed=seed, what=f"{fn_name} vs {oracle}", rtol=0, atol=0)
    assert_close(args[0], before, seed=seed, what=f"{fn_name} modified its input", rtol=0, atol=0)
    return actual


@ORACLES
@ALL_DTYPES
@pytest.mark.parametrize("fmt", ["xyxy", "xywh", "cxcywh"])
def test_box_area(device, dtype, fmt, oracle, seed):
    boxes = utility_boxes(torch.Generator().manual_seed(seed), dtype, device)
    area = check_utility(oracle, "box_area", boxes, fmt=fmt, seed=seed)
    assert area.dtype == result_dtype(dtype) and area.shape == boxes.shape[:-1]


@ORACLES
@ALL_DTYPES
@pytest.mark.parametrize("in_fmt", ["xyxy", "xywh", "cxcywh"])
@pytest.mark.parametrize("out_fmt", ["xyxy", "xywh", "cxcywh"])
def test_box_convert(device, dtype, in_fmt, out_fmt, oracle, seed):
    boxes = utility_boxes(torch.Generator().manual_seed(seed), dtype, device)
    converted = check_utility(oracle, "box_convert", boxes, in_fmt, out_fmt, seed=seed)
    assert converted.dtype == dtype
    assert converted.data_ptr() != boxes.data_ptr(), "box_convert must return a new tensor, never its input"


@ORACLES
@ALL_DTYPES
def test_clip_boxes_to_image(device, dtype, oracle, seed):
    boxes = utility_boxes(torch.Generator().manual_seed(seed), dtype, device)
    clipped = check_utility(oracle, "clip_boxes_to_image", boxes, (60, 80), seed=seed)
    xs, ys = clipped[..., 0::2], clipped[..., 1::2]
    assert ((xs >= 0) & (xs <= 80) | xs.isnan()).all() and ((ys >= 0) & (ys <= 60) | ys.isnan()).all()
    assert torch.isnan(clipped[0, 0, 0]), "NaN must stay NaN"


def test_clip_boxes_to_image_gradient_on_the_border(device):
    """Coordinates exactly on the image border (typical for boxes that were clipped before) must get the same
    gradient as the reference's scalar clamp, not half of it."""
    boxes = torch.tensor([[0.0, 5.0, 80.0, 60.0], [-3.0, 61.0, 40.0, 30.0]], dtype=torch.float64, device=device)
    upstream = torch.arange(1.0, 9.0, dtype=torch.float64, device=device).reshape(2, 4)
    grads = []
    for module in (ops, ref):
        leaf = boxes.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(module.clip_boxes_to_image(leaf, (60, 80)), leaf, upstream)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@ORACLES
@ALL_DTYPES
@pytest.mark.parametrize("min_size", [0.0, 5.0, 30.0])
def test_remove_small_boxes(device, dtype, min_size, oracle, seed):
    boxes = utility_boxes(torch.Generator().manual_seed(seed), dtype, device)[0]
    keep = check_utility(oracle, "remove_small_boxes", boxes, min_size, seed=seed)
    assert keep.dtype == torch.int64
    assert 0 not in keep.tolist(), "the box with a NaN coordinate must be removed"
