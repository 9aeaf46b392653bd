"""Anchor generators against torchvision (AnchorGenerator, DefaultBoxGenerator: bit for bit) and the reference (all
generators, offsets and dtypes: bit for bit), plus caching, empty grids, operator registration, torch.compile and
argument errors. Every test draws fresh configurations from the ``seed`` fixture (FASTDET_TEST_SEED=<seed> replays).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from fastdet import ops
from fastdet.ops import reference as ref

ALL_DTYPES = pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch.")
)


class ImageList:
    """The two attributes of torchvision's ImageList that the generators read."""

    def __init__(self, tensors, image_sizes):
        self.tensors = tensors
        self.image_sizes = image_sizes


def torchvision_anchor_utils():
    pytest.importorskip("torchvision", reason="torchvision is not installed; the torchvision parity case is skipped")
    from torchvision.models.detection import anchor_utils

    return anchor_utils


def assert_equal(actual, expected, *, seed, what=""):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype} [seed={seed}]"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape} [seed={seed}]"
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=0, atol=0, equal_nan=True,
                               msg=lambda d: f"{what} [seed={seed}; replay with FASTDET_TEST_SEED={seed}]\n{d}")


def random_pyramid(rng: random.Random, batch=2):
    """A random FPN-like configuration: image size, per-level strides and grids (ceil division, as a conv stack
    produces), sizes and ratios per level (some levels share ratios, sizes are arbitrary positive ints/floats)."""
    levels = rng.randint(1, 5)
    first = rng.choice([4, 8, 16])
    strides = [first * 2**i for i in range(levels)]
    height, width = rng.randint(64, 700), rng.randint(64, 900)
    grids = [(math.ceil(height / s), math.ceil(width / s)) for s in strides]
    sizes = tuple(tuple(rng.choice([16, 23, 32, 45.5, 64, 90, 128, 181, 256, 512]) for _ in range(rng.randint(1, 3)))
                  for _ in range(levels))
    ratios = tuple(tuple(rng.choice([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 0.7]) for _ in range(rng.randint(1, 3)))
                   for _ in range(levels))
    return (height, width), grids, sizes, ratios


def feature_maps(grids, dtype, device, batch=2):
    return [torch.zeros(batch, 1, h, w, dtype=dtype, device=device) for h, w in grids]


# --------------------------------------------------------------------------------------------------------------------
# torchvision AnchorGenerator
# --------------------------------------------------------------------------------------------------------------------


@ALL_DTYPES
def test_anchor_generator_matches_torchvision(device, dtype, seed):
    anchor_utils = torchvision_anchor_utils()
    rng = random.Random(seed)
    for _ in range(3):
        (height, width), grids, sizes, ratios = random_pyramid(rng)
        images = ImageList(torch.zeros(2, 3, height, width, device=device), [(height, width), (height - 5, width)])
        feats = feature_maps(grids, dtype, device)
        got = ops.AnchorGenerator(sizes, ratios)(images, feats)
        want = anchor_utils.AnchorGenerator(sizes, ratios)(images, feats)
        assert len(got) == len(want) == 2
        for g, w in zip(got, want):
            assert g.device == w.device
            assert_equal(g, w, seed=seed, what=f"anchors sizes={sizes} ratios={ratios} grids={grids}")


def test_anchor_generator_torchvision_defaults_and_flat_arguments(device, seed):
    anchor_utils = torchvision_anchor_utils()
    images = ImageList(torch.zeros(1, 3, 800, 1216, device=device), [(800, 1216)])
    feats = feature_maps([(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)], torch.float32, device, batch=1)
    # torchvision's Faster R-CNN FPN configuration, and the flat forms (one size per level, shared ratios).
    for args in [(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5),
                 ((32, 64, 128, 256, 512), (0.5, 1.0, 2.0))]:
        got = ops.AnchorGenerator(*args)
        want = anchor_utils.AnchorGenerator(*args)
        assert got.num_anchors_per_location() == want.num_anchors_per_location()
        for g, w in zip(got.cell_anchors, want.cell_anchors):
            assert_equal(g, w, seed=seed, what="cell anchors")
        assert_equal(got(images, feats)[0], want(images, feats)[0], seed=seed, what=f"anchors {args}")
    single = ImageList(torch.zeros(1, 3, 64, 64, device=device), [(64, 64)])
    feats = feature_maps([(4, 4)], torch.float32, device, batch=1)
    assert_equal(ops.AnchorGenerator()(single, feats)[0], anchor_utils.AnchorGenerator()(single, feats)[0],
                 seed=seed, what="default constructor")


@ALL_DTYPES
@pytest.mark.parametrize("offset", [0.0, 0.5, 0.25])
def test_generate_anchors_matches_reference(device, dtype, offset, seed):
    rng = random.Random(seed)
    for _ in range(3):
        _, grids, sizes, ratios = random_pyramid(rng)
        # non-square strides too: (stride_y, stride_x) pairs
        strides = [(rng.choice([4, 8, 16]), rng.choice([4, 8, 16])) if rng.random() < 0.5 else rng.choice([8, 32])
                   for _ in grids]
        got = ops.generate_anchors(grids, strides, sizes, ratios, offset=offset, dtype=dtype, device=device)
        want = ref.generate_anchors(grids, strides, sizes, ratios, offset=offset, dtype=dtype, device=device)
        assert_equal(got, want, seed=seed, what=f"offset={offset} grids={grids} strides={strides}")


def test_detectron2_offset_is_half_a_stride(device):
    grids, strides = [(5, 7), (3, 4)], [8, 16]
    sizes, ratios = ((32, 64), (128,)), ((0.5, 1.0, 2.0), (1.0,))
    zero = ops.generate_anchors(grids, strides, sizes, ratios, offset=0.0, device=device)
    half = ops.generate_anchors(grids, strides, sizes, ratios, offset=0.5, device=device)
    per_anchor = torch.cat([torch.full((h * w * len(s) * len(r),), st / 2.0)
                            for (h, w), st, s, r in zip(grids, strides, sizes, ratios)]).to(device)
    torch.testing.assert_close(half, zero + per_anchor[:, None], rtol=0, atol=0)


def test_anchor_layout(device):
    """Order: level, then row y, then column x, then the cell anchors (ratios outer, sizes inner)."""
    gen = ops.AnchorGenerator(((10, 20),), ((1.0, 4.0),))
    anchors = gen.anchors([(2, 3)], [(16, 8)], device=device).cpu()
    cells = ref.cell_anchors((10, 20), (1.0, 4.0))
    assert anchors.shape == (2 * 3 * 4, 4)
    for y in range(2):
        for x in range(3):
            for a in range(4):
                shift = torch.tensor([8.0 * x, 16.0 * y, 8.0 * x, 16.0 * y])
                assert torch.equal(anchors[(y * 3 + x) * 4 + a], cells[a] + shift)


def test_anchor_cache(device):
    gen = ops.AnchorGenerator(((32,), (64,)), (0.5, 1.0), cache_size=2)
    images = ImageList(torch.zeros(3, 3, 64, 96, device=device), [(64, 96)] * 3)
    feats = feature_maps([(8, 12), (4, 6)], torch.float32, device)
    first = gen(images, feats)
    again = gen(images, feats)
    # one tensor shared by the images and by repeated calls: no recomputation, no per-image copy
    assert all(a.data_ptr() == first[0].data_ptr() for a in first + again)
    assert len(gen._cache) == 1
    other_dtype = gen(images, [f.double() for f in feats])
    assert other_dtype[0].dtype == torch.float64 and len(gen._cache) == 2
    other_size = gen(ImageList(torch.zeros(1, 3, 32, 48, device=device), [(32, 48)]),
                     feature_maps([(4, 6), (2, 3)], torch.float32, device))
    assert len(gen._cache) == 2  # LRU: the oldest entry went
    assert other_size[0].shape == (4 * 6 * 2 + 2 * 3 * 2, 4)
    assert gen(images, feats)[0].data_ptr() != first[0].data_ptr()
    uncached = ops.AnchorGenerator(((32,), (64,)), (0.5, 1.0), cache_size=0)
    a, b = uncached(images, feats)[0], uncached(images, feats)[0]
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)


@pytest.mark.parametrize("grids", [[(0, 5)], [(3, 0), (2, 2)], [(0, 0), (0, 0)]], ids=["zero-h", "zero-w", "all"])
def test_anchors_empty_grids(device, grids):
    sizes, ratios = tuple((32,) for _ in grids), (1.0, 2.0)
    got = ops.generate_anchors(grids, [8] * len(grids), sizes, ratios, device=device)
    want = ref.generate_anchors(grids, [8] * len(grids), sizes, ratios, device=device)
    assert got.shape == want.shape and torch.equal(got.cpu(), want.cpu())


def test_anchor_generator_no_images(device):
    gen = ops.AnchorGenerator(((32,),), ((1.0,),))
    out = gen(ImageList(torch.zeros(0, 3, 32, 32, device=device), []), feature_maps([(4, 4)], torch.float32, device, 0))
    assert out == []


# --------------------------------------------------------------------------------------------------------------------
# SSD DefaultBoxGenerator
# --------------------------------------------------------------------------------------------------------------------

SSD_CONFIGS = {
    # torchvision ssd300_vgg16
    "ssd300": dict(aspect_ratios=[[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                   scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300]),
    # torchvision ssdlite320_mobilenet_v3_large
    "ssdlite": dict(aspect_ratios=[[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95),
    "no-clip": dict(aspect_ratios=[[2, 3], [0.5]], clip=False, min_ratio=0.3, max_ratio=1.2),
    "one-level": dict(aspect_ratios=[[]]),
}


@ALL_DTYPES
@pytest.mark.parametrize("config", list(SSD_CONFIGS.values()), ids=list(SSD_CONFIGS))
def test_default_boxes_match_torchvision(device, dtype, config, seed):
    anchor_utils = torchvision_anchor_utils()
    rng = random.Random(seed)
    levels = len(config["aspect_ratios"])
    size = rng.choice([300, 320, 512]) if rng.random() < 0.7 else rng.randint(100, 600)
    height, width = size, (size if rng.random() < 0.5 else rng.randint(100, 600))
    grids = [(max(1, math.ceil(height / 2 ** (3 + i))), max(1, math.ceil(width / 2 ** (3 + i)))) for i in range(levels)]
    images = ImageList(torch.zeros(2, 3, height, width, device=device), [(height, width)] * 2)
    feats = feature_maps(grids, dtype, device)
    got = ops.DefaultBoxGenerator(**config)(images, feats)
    want = anchor_utils.DefaultBoxGenerator(**config)(images, feats)
    assert ops.DefaultBoxGenerator(**config).num_anchors_per_location() == \
        anchor_utils.DefaultBoxGenerator(**config).num_anchors_per_location()
    for g, w in zip(got, want):
        assert g.device == w.device
        assert_equal(g, w, seed=seed, what=f"SSD boxes {config} image {(height, width)}")
    reference = ref.ssd_default_boxes(grids, (height, width), dtype=dtype, device=device, **config)
    assert_equal(got[0], reference, seed=seed, what="SSD boxes vs reference")
    functional = ops.ssd_default_boxes(grids, (height, width), dtype=dtype, device=device, **config)
    assert_equal(functional, reference, seed=seed, what="ssd_default_boxes")


# --------------------------------------------------------------------------------------------------------------------
# YOLO grid priors
# --------------------------------------------------------------------------------------------------------------------

YOLOV5_ANCHORS = [[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)], [(116, 90), (156, 198), (373, 326)]]


@ALL_DTYPES
@pytest.mark.parametrize("fmt", ["cxcywh", "xyxy"])
@pytest.mark.parametrize("anchored", [True, False], ids=["anchors", "anchor-free"])
def test_yolo_grid_priors_match_reference(device, dtype, fmt, anchored, seed):
    rng = random.Random(seed)
    size = rng.choice([320, 416, 640]) if rng.random() < 0.5 else 32 * rng.randint(3, 20)
    strides = [8, 16, (32, 24)]
    grids = [(size // 8, size // 8 + 1), (size // 16, size // 16), (size // 32, size // 24)]
    offset = rng.choice([0.5, 0.0, 0.3])
    anchors = YOLOV5_ANCHORS if anchored else None
    got = ops.yolo_grid_priors(grids, strides, anchors, offset=offset, fmt=fmt, dtype=dtype, device=device)
    want = ref.yolo_grid_priors(grids, strides, anchors, offset=offset, fmt=fmt, dtype=dtype, device=device)
    assert_equal(got, want, seed=seed, what=f"yolo priors {fmt} offset={offset}")
    if anchored and fmt == "cxcywh" and offset == 0.5:
        assert got[0].tolist() == [4.0, 4.0, 10.0, 13.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_centres_are_rounded_before_the_corners(device, dtype):
    # The centre (x + offset) * stride is rounded on its own before -/+ w / 2 (or + cell anchor) is added, on every
    # backend: nvcc used to fuse them into one float64 FMA (stride 24, offset 0.3 differed in the last bit on CUDA).
    grids, strides = [(40, 40), (20, 21)], [24, (24, 40)]
    for fmt in ("cxcywh", "xyxy"):
        got = ops.yolo_grid_priors(grids, strides, [[(10.3, 13.1)], [(33.7, 23.9)]], offset=0.3, fmt=fmt, dtype=dtype,
                                   device=device)
        want = ref.yolo_grid_priors(grids, strides, [[(10.3, 13.1)], [(33.7, 23.9)]], offset=0.3, fmt=fmt,
                                    dtype=dtype, device="cpu")
        assert torch.equal(got.cpu(), want), fmt
    got = ops.generate_anchors(grids, strides, [(32.3,), (64.1,)], [(0.5, 1.0, 2.0)] * 2, offset=0.3, dtype=dtype,
                               device=device)
    want = ref.generate_anchors(grids, strides, [(32.3,), (64.1,)], [(0.5, 1.0, 2.0)] * 2, offset=0.3, dtype=dtype,
                                device="cpu")
    assert torch.equal(got.cpu(), want)


# --------------------------------------------------------------------------------------------------------------------
# operator registration and torch.compile
# --------------------------------------------------------------------------------------------------------------------


def test_opcheck_anchor_ops(device):
    cells = ref.cell_anchors((32, 64), (0.5, 1.0)).to(device)
    strided_cells = torch.cat([cells, cells], dim=1)[:, ::2]
    for table in (cells, cells.double(), cells.half(), strided_cells):
        torch.library.opcheck(torch.ops.fastdet.grid_anchors.default,
                              (table, [2, 2], [3, 4, 2, 2], [8.0, 8.0, 16.0, 16.0], 0.5))
    torch.library.opcheck(torch.ops.fastdet.grid_anchors.default, (cells[:0], [0], [3, 4], [8.0, 8.0], 0.0))
    wh = torch.rand(5, 2, device=device)
    torch.library.opcheck(torch.ops.fastdet.ssd_default_boxes.default,
                          (wh, [3, 2], [4, 4, 2, 3], [4.0, 4.0, 2.0, 3.0], [300, 300], torch.float16))
    torch.library.opcheck(torch.ops.fastdet.grid_priors.default,
                          (wh.double(), [2, 3], [4, 5, 2, 2], [8.0, 8.0, 16.0, 16.0], 0.5, True, torch.bfloat16))


def test_compile_fullgraph_anchor_generator(device, seed):
    torch._dynamo.reset()
    gen = ops.AnchorGenerator(((32,), (64,)), (0.5, 1.0, 2.0))
    eager = ops.AnchorGenerator(((32,), (64,)), (0.5, 1.0, 2.0), cache_size=0)

    def anchors_and_priors(images, f1, f2):
        anchors = gen(images, [f1, f2])
        priors = ops.yolo_grid_priors([tuple(f1.shape[-2:])], [8], dtype=f1.dtype, device=f1.device)
        return torch.stack(anchors) * 1.0, priors + 0.0

    compiled = torch.compile(anchors_and_priors, fullgraph=True, backend="aot_eager")
    for h, w in ((64, 96), (96, 128)):
        images = ImageList(torch.zeros(2, 3, h, w, device=device), [(h, w)] * 2)
        f1, f2 = feature_maps([(h // 8, w // 8), (h // 16, w // 16)], torch.float32, device)
        got = compiled(images, f1, f2)
        assert torch.equal(got[0], torch.stack(eager(images, [f1, f2])))
        assert torch.equal(got[1], ops.yolo_grid_priors([(h // 8, w // 8)], [8], device=device))


# --------------------------------------------------------------------------------------------------------------------
# argument errors
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: ops.AnchorGenerator(((32, -1),), ((1.0,),)), ValueError, r"sizes\[0\] must hold finite positive"),
        (lambda: ops.AnchorGenerator(((32,),), ((0.0,),)), ValueError, r"aspect_ratios\[0\] must hold finite positive"),
        (lambda: ops.AnchorGenerator(((32,),), ((float("nan"),),)), ValueError, r"aspect_ratios\[0\]"),
        (lambda: ops.AnchorGenerator(((32,), (64,)), ((1.0,), (1.0,), (2.0,))), ValueError, r"same number of levels"),
        (lambda: ops.AnchorGenerator((), ((1.0,),)), ValueError, r"sizes must not be empty"),
        (lambda: ops.AnchorGenerator(((),), ((1.0,),)), ValueError, r"sizes\[0\] must not be empty"),
        (lambda: ops.AnchorGenerator(((32,),), ((1.0,),), offset=float("inf")), ValueError, r"offset must be finite"),
        (lambda: ops.AnchorGenerator(tuple((32,) for _ in range(17)), (1.0,)), ValueError, r"at most 16 levels"),
        (lambda: ops.DefaultBoxGenerator([[2], [3]], steps=[8]), ValueError, r"same length"),
        (lambda: ops.DefaultBoxGenerator([[-2]]), ValueError, r"aspect_ratios\[0\]"),
        (lambda: ops.DefaultBoxGenerator([[2], [2]], scales=[0.1, 0.2]), ValueError, r"one scale per level plus one"),
        (lambda: ops.DefaultBoxGenerator([]), ValueError, r"between 1 and 16 levels"),
        (lambda: ops.yolo_grid_priors([(2, 2)], [8], fmt="xywh"), ValueError, r"fmt must be"),
        (lambda: ops.yolo_grid_priors([(2, 2)], [8, 16]), ValueError, r"one stride per level"),
        (lambda: ops.yolo_grid_priors([(2, 2)], [-8]), ValueError, r"strides must be finite and non-negative"),
        (lambda: ops.yolo_grid_priors([(2, 2)], [8], [[(10, 0)]]), ValueError, r"anchor_sizes\[0\]"),
        (lambda: ops.yolo_grid_priors([(2, -2)], [8]), ValueError, r"feature_sizes must be non-negative"),
        (lambda: ops.yolo_grid_priors([(2, 2.5)], [8]), TypeError, r"integer \(height, width\)"),
        (lambda: ops.generate_anchors([(2, 2)], [8], ((32,), (64,)), (1.0,)), ValueError, r"describes 1 levels"),
    ],
    ids=["negative-size", "zero-ratio", "nan-ratio", "levels-differ", "no-sizes", "empty-level", "offset-inf",
         "too-many-levels", "ssd-steps", "ssd-ratio", "ssd-scales", "ssd-empty", "yolo-fmt", "yolo-strides",
         "yolo-negative-stride", "yolo-size", "negative-grid", "float-grid", "levels-vs-grids"],
)
def test_anchor_bad_input(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_anchor_generator_feature_map_count_mismatch():
    gen = ops.AnchorGenerator(((32,), (64,)), (1.0,))
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    with pytest.raises(ValueError, match=r"got 1 feature maps but the generator has 2 levels"):
        gen(images, [torch.zeros(1, 1, 8, 8)])
    with pytest.raises(ValueError, match=r"non-empty list"):
        gen(images, [])
    with pytest.raises(TypeError, match=r"ImageList-like"):
        gen(torch.zeros(1, 3, 64, 64), [torch.zeros(1, 1, 8, 8)] * 2)


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.zeros(2, 4), [1], [2, 2], [8.0, 8.0], 0.0), r"cell_anchors has 2 rows but the per-level counts add up"),
        ((torch.zeros(2, 3), [2], [2, 2], [8.0, 8.0], 0.0), r"cell_anchors must have shape \[K, 4\]"),
        ((torch.zeros(2, 4).long(), [2], [2, 2], [8.0, 8.0], 0.0), r"cell_anchors must be a floating-point"),
        ((torch.zeros(2, 4), [2], [2, 2, 3], [8.0, 8.0], 0.0), r"grid_sizes must hold \(height, width\)"),
        ((torch.zeros(2, 4), [2], [2, 2], [8.0], 0.0), r"strides must hold \(y, x\)"),
        ((torch.zeros(2, 4), [2], [-2, 2], [8.0, 8.0], 0.0), r"grid size must be non-negative"),
        ((torch.zeros(2, 4), [2], [2, 2], [8.0, float("nan")], 0.0), r"strides must be finite and non-negative"),
        ((torch.zeros(2, 4), [2], [2, 2], [8.0, 8.0], float("nan")), r"offset must be finite"),
        ((torch.zeros(0, 4), [], [], [], 0.0), r"number of pyramid levels must be between 1 and 16"),
    ],
    ids=["table-rows", "table-cols", "integer-table", "grid-length", "stride-length", "negative-grid", "nan-stride",
         "nan-offset", "no-levels"],
)
def test_native_grid_anchors_checks(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastdet.grid_anchors(*args)


def test_native_ssd_checks():
    with pytest.raises(RuntimeError, match=r"wh_pairs must be a float32 tensor"):
        torch.ops.fastdet.ssd_default_boxes(torch.zeros(2, 2).double(), [2], [2, 2], [2.0, 2.0], [8, 8], torch.float32)
    with pytest.raises(RuntimeError, match=r"divisors must be positive"):
        torch.ops.fastdet.ssd_default_boxes(torch.zeros(2, 2), [2], [2, 2], [0.0, 2.0], [8, 8], torch.float32)
    with pytest.raises(RuntimeError, match=r"image_size must be \(height, width\)"):
        torch.ops.fastdet.ssd_default_boxes(torch.zeros(2, 2), [2], [2, 2], [2.0, 2.0], [8], torch.float32)


def test_drop_in_for_torchvision_retinanet(seed):
    """fastdet's AnchorGenerator and BoxCoder in place of torchvision's inside a real torchvision detector: the same
    anchors, hence (with the same random weights) the same detections. CPU only: it builds a ResNet-50."""
    pytest.importorskip("torchvision", reason="torchvision is not installed")
    from torchvision.models.detection import retinanet_resnet50_fpn

    torch.manual_seed(seed % 1000)
    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5, min_size=160, max_size=224,
                                   score_thresh=0.0).eval()
    images = [torch.rand(3, 150, 200, generator=torch.Generator().manual_seed(seed)), torch.rand(3, 170, 130)]
    with torch.no_grad():
        want = model(images)
        tv = model.anchor_generator
        model.anchor_generator = ops.AnchorGenerator(tv.sizes, tv.aspect_ratios)
        got = model(images)
    for g, w in zip(got, want):
        torch.testing.assert_close(g["boxes"], w["boxes"], rtol=1e-5, atol=1e-3)
        assert torch.equal(g["labels"], w["labels"])
        torch.testing.assert_close(g["scores"], w["scores"], rtol=0, atol=0)
