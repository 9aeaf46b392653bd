"""The contract around fastdet.ops' values that code written against torchvision.ops relies on: dynamic shapes
(opcheck with its aot_dispatch_dynamic test, torch.compile(dynamic=True, fullgraph=True), torch.export with Dim
dynamic shapes), integer boxes, torch.fx tracing, exception types and autocast.

Compiled and exported results are compared with eager fastdet, which the other test files compare with torchvision and
the reference. Runs on the CPU (the autocast tests also on CUDA where one is present).
"""

from __future__ import annotations

import pytest
import torch

from fastdet import ops

tv_ops = pytest.importorskip("torchvision.ops", reason="torchvision is not installed; contract tests need it")


def _boxes(gen, n, *, scale=50.0, dtype=torch.float32, device="cpu"):
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * scale / 2
    return torch.cat([xy, xy + wh], dim=1).to(dtype=dtype, device=device)


def _rois(gen, k, batch, *, size=32.0):
    boxes = _boxes(gen, k, scale=size)
    index = torch.randint(batch, (k, 1), generator=gen).double()
    return torch.cat([index, boxes], dim=1).float()


def _compiled(fn, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)


def _assert_same(actual, expected):
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            _assert_same(a, e)
        return
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------------------------------
# dynamic shapes: opcheck (incl. aot_dispatch_dynamic), torch.compile(dynamic=True), torch.export
# --------------------------------------------------------------------------------------------------------------------

ALL_OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck_default_utils_include_the_dynamic_aot_test():
    # The other test files call opcheck with its default test_utils; they only cover dynamic shapes if it runs them.
    from torch.testing._internal.optests.generate_tests import DEFAULT_TEST_UTILS

    assert "test_aot_dispatch_dynamic" in DEFAULT_TEST_UTILS


def test_every_traceable_op_has_a_fake_kernel():
    # Public ops and the backward ops that appear in traced graphs; the per-backend ``_x_kernel`` ops only run inside
    # the public composites, which tracing never enters.
    from torch._library.simple_registry import singleton

    names = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastdet::")}
    traceable = sorted(n for n in names if not n.endswith("_kernel"))
    assert "nms" in traceable and "roi_align" in traceable
    missing = [n for n in traceable if singleton.find(f"fastdet::{n}").fake_impl.kernel is None]
    assert not missing


@pytest.mark.parametrize("n", [0, 1, 40])
def test_opcheck_nms_ops_with_data_dependent_output(n):
    gen = torch.Generator().manual_seed(n)
    boxes, scores = _boxes(gen, n), torch.rand(n, generator=gen)
    idxs = torch.randint(3, (n,), generator=gen)
    torch.library.opcheck(torch.ops.fastdet.nms.default, (boxes, scores, 0.5), test_utils=ALL_OPCHECK_UTILS)
    torch.library.opcheck(torch.ops.fastdet.batched_nms.default, (boxes, scores, idxs, 0.5),
                          test_utils=ALL_OPCHECK_UTILS)


def _check_dynamic(fn, *arg_sets, backend="aot_eager"):
    """fn compiled with dynamic=True, fullgraph=True gives eager's results on every argument set (of different
    sizes, so the second and later calls run the same symbolic graph)."""
    compiled = _compiled(fn, backend)
    for args in arg_sets:
        _assert_same(compiled(*args), fn(*args))


def test_compile_dynamic_nms():
    gen = torch.Generator().manual_seed(0)

    def fn(boxes, scores):
        keep = ops.nms(boxes, scores, 0.5)
        return keep, boxes[keep]

    sets = [(_boxes(gen, n), torch.rand(n, generator=gen)) for n in (30, 57, 1)]
    _check_dynamic(fn, *sets, backend="inductor")
    # No boxes at all (a size torch.compile specialises on); inductor cannot lower boxes[keep] for 0 boxes.
    _check_dynamic(fn, *sets[:1], (_boxes(gen, 0), torch.rand(0, generator=gen)))


def test_compile_dynamic_batched_nms():
    gen = torch.Generator().manual_seed(1)

    def fn(boxes, scores, idxs):
        return ops.batched_nms(boxes, scores, idxs, 0.4)

    sets = [(_boxes(gen, n), torch.rand(n, generator=gen), torch.randint(4, (n,), generator=gen)) for n in (25, 61)]
    _check_dynamic(fn, *sets)


def test_compile_dynamic_nms_fixed_and_multiclass_nms():
    gen = torch.Generator().manual_seed(2)

    def fixed(boxes, scores, idxs):
        return ops.nms_fixed(boxes, scores, idxs, 0.5, 10)

    _check_dynamic(fixed, *[(_boxes(gen, 2 * n).reshape(2, n, 4), torch.rand(2, n, generator=gen),
                             torch.randint(3, (2, n), generator=gen)) for n in (12, 33)])

    def multiclass(boxes, scores):
        return ops.multiclass_nms(boxes, scores, 0.2, 0.5, 8, 50)

    _check_dynamic(multiclass, *[(_boxes(gen, b * n).reshape(b, n, 4), torch.rand(b, n, 3, generator=gen))
                                 for b, n in ((2, 20), (3, 41))])


def test_compile_dynamic_box_iou_family():
    gen = torch.Generator().manual_seed(3)

    def fn(boxes1, boxes2):
        return (ops.box_iou(boxes1, boxes2), ops.box_iou(boxes1, boxes2, fmt="cxcywh"),
                ops.generalized_box_iou(boxes1, boxes2), ops.distance_box_iou(boxes1, boxes2),
                ops.complete_box_iou(boxes1, boxes2), ops.box_area(boxes1),
                ops.box_convert(boxes1, "xyxy", "xywh"), ops.clip_boxes_to_image(boxes1, (30, 40)))

    _check_dynamic(fn, *[(_boxes(gen, n), _boxes(gen, m)) for n, m in ((5, 7), (11, 3), (2, 9))])

    def batched(boxes1, boxes2):
        return ops.box_iou(boxes1, boxes2)

    _check_dynamic(batched, *[(_boxes(gen, b * 6).reshape(b, 6, 4), _boxes(gen, b * m).reshape(b, m, 4))
                              for b, m in ((2, 4), (3, 9))])


def test_compile_dynamic_roi_ops():
    gen = torch.Generator().manual_seed(4)

    def fn(x, rois):
        return ops.roi_align(x, rois, (3, 2), 0.5, 2, True), ops.roi_pool(x, rois, 2, 0.5)

    sets = [(torch.randn(n, 3, h, w, generator=gen), _rois(gen, k, n)) for n, h, w, k in ((2, 12, 15, 6),
                                                                                        (3, 9, 20, 11))]
    _check_dynamic(fn, *sets)
    _check_dynamic(lambda x, rois: ops.roi_align(x, rois, 2, 0.5), *sets, backend="inductor")

    def loss(x, rois):
        return ops.roi_align(x, rois, 2, 0.5, -1).square().sum() + ops.roi_pool(x, rois, 2, 0.5).sum()

    compiled = _compiled(loss)
    for x, rois in sets:  # the backward graph is dynamic too
        x = x.requires_grad_(True)
        (expected,) = torch.autograd.grad(loss(x, rois), x)
        (actual,) = torch.autograd.grad(compiled(x, rois), x)
        _assert_same(actual, expected)


def test_compile_dynamic_multi_scale_roi_align():
    gen = torch.Generator().manual_seed(5)
    pooler = ops.MultiScaleRoIAlign(["p2", "p3"], 2, 2)

    def fn(p2, p3, boxes):
        return pooler({"p2": p2, "p3": p3}, [boxes, boxes], [(64, 64), (64, 64)])

    _check_dynamic(fn, *[(torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 3, 8, 8, generator=gen),
                          _boxes(gen, k, scale=40.0)) for k in (5, 13)])


def test_compile_dynamic_box_coder():
    gen = torch.Generator().manual_seed(6)
    coder = ops.BoxCoder((10.0, 10.0, 5.0, 5.0))

    def fn(rel, boxes, gt):
        return coder.decode_single(rel, boxes), coder.encode_single(gt, boxes)

    _check_dynamic(fn, *[(torch.randn(n, 4, generator=gen), _boxes(gen, n), _boxes(gen, n)) for n in (6, 19)])

    def select(rel, anchors, scores):
        return ops.decode_and_select(rel, anchors, scores, 0.3, 5, [(40, 50)] * rel.shape[0])

    _check_dynamic(select, *[(torch.randn(b, n, 4, generator=gen), _boxes(gen, n), torch.rand(b, n, 3, generator=gen))
                             for b, n in ((2, 12), (3, 30))])


def test_compile_dynamic_anchors():
    def fn(f1, f2):
        grids = [(f1.shape[-2], f1.shape[-1]), (f2.shape[-2], f2.shape[-1])]
        anchors = ops.generate_anchors(grids, [8, 16], ((16, 32), (64,)), ((0.5, 1.0), (1.0, 2.0)))
        priors = ops.yolo_grid_priors(grids, [8, 16])
        return anchors, priors

    _check_dynamic(fn, *[(torch.zeros(1, 1, h, w), torch.zeros(1, 1, h // 2, w // 2)) for h, w in ((8, 10), (12, 6))])

    anchor_generator = ops.AnchorGenerator(((16, 32), (64,)), ((0.5, 1.0), (1.0, 2.0)))
    default_boxes = ops.DefaultBoxGenerator([[2], [2, 3]])

    class ImageList:
        def __init__(self, tensors, image_sizes):
            self.tensors, self.image_sizes = tensors, image_sizes

    def modules(images, f1, f2):
        image_list = ImageList(images, [(images.shape[-2], images.shape[-1])] * images.shape[0])
        return anchor_generator(image_list, [f1, f2]), default_boxes(image_list, [f1, f2])

    _check_dynamic(modules, *[(torch.zeros(2, 3, h, w), torch.zeros(2, 1, h // 8, w // 8),
                               torch.zeros(2, 1, h // 16, w // 16)) for h, w in ((64, 80), (96, 48))])


def test_compile_dynamic_losses():
    gen = torch.Generator().manual_seed(7)

    def fn(logits, targets, labels, boxes1, boxes2):
        return (ops.sigmoid_focal_loss(logits, targets, reduction="sum"),
                ops.sigmoid_focal_loss(logits, targets),
                ops.sigmoid_focal_loss_with_labels(logits, labels, reduction="mean"),
                ops.generalized_box_iou_loss(boxes1, boxes2), ops.distance_box_iou_loss(boxes1, boxes2, "mean"),
                ops.complete_box_iou_loss(boxes1, boxes2, "sum"), ops.smooth_l1_loss(boxes1, boxes2, 0.5))

    _check_dynamic(fn, *[(torch.randn(n, 4, generator=gen), torch.rand(n, 4, generator=gen),
                          torch.randint(-1, 4, (n,), generator=gen), _boxes(gen, n), _boxes(gen, n)) for n in (7, 15)])


class _NmsModule(torch.nn.Module):
    def forward(self, boxes, scores, idxs):
        return ops.nms(boxes, scores, 0.5), ops.batched_nms(boxes, scores, idxs, 0.5)


class _RoiModule(torch.nn.Module):
    def forward(self, x, rois):
        return ops.roi_align(x, rois, 2, 0.5, 2, True), ops.roi_pool(x, rois, 2, 0.5)


class _IouModule(torch.nn.Module):
    def forward(self, boxes1, boxes2):
        return ops.box_iou(boxes1, boxes2), ops.generalized_box_iou(boxes1, boxes2)


def _check_export(module, example, dynamic_shapes, *arg_sets):
    exported = torch.export.export(module, example, dynamic_shapes=dynamic_shapes)
    for args in (example, *arg_sets):
        _assert_same(exported.module()(*args), module(*args))


def test_export_nms_with_a_dynamic_number_of_boxes():
    gen = torch.Generator().manual_seed(8)
    n = torch.export.Dim("n")

    def args(k):
        return _boxes(gen, k), torch.rand(k, generator=gen), torch.randint(3, (k,), generator=gen)

    _check_export(_NmsModule(), args(30), ({0: n}, {0: n}, {0: n}), args(7), args(64))


def test_export_roi_ops_with_dynamic_batch_and_boxes():
    gen = torch.Generator().manual_seed(9)
    batch, k, h, w = (torch.export.Dim(name) for name in ("batch", "k", "h", "w"))

    def args(b, kk, hh=10, ww=12):
        return torch.randn(b, 3, hh, ww, generator=gen), _rois(gen, kk, b)

    _check_export(_RoiModule(), args(2, 5), ({0: batch, 2: h, 3: w}, {0: k}), args(3, 9, 7, 15), args(4, 2))


def test_export_box_iou_with_dynamic_box_counts():
    gen = torch.Generator().manual_seed(10)
    n, m = torch.export.Dim("n"), torch.export.Dim("m")
    _check_export(_IouModule(), (_boxes(gen, 5), _boxes(gen, 6)), ({0: n}, {0: m}), (_boxes(gen, 9), _boxes(gen, 3)))


# --------------------------------------------------------------------------------------------------------------------
# integer boxes
# --------------------------------------------------------------------------------------------------------------------

INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]
IOU_FUNCTIONS = ["box_iou", "generalized_box_iou", "distance_box_iou", "complete_box_iou"]


def _int_boxes(gen, n, dtype):
    return _boxes(gen, n, scale=80.0).round().to(dtype)  # coordinates < 127: every integer dtype holds them


@pytest.mark.parametrize("dtype", INT_DTYPES + [torch.bool], ids=str)
@pytest.mark.parametrize("fmt", ["xyxy", "xywh", "cxcywh"])
def test_box_area_of_integer_boxes_matches_torchvision(dtype, fmt):
    gen = torch.Generator().manual_seed(11)
    boxes = _int_boxes(gen, 9, dtype) if dtype != torch.bool else torch.rand(9, 4, generator=gen) > 0.5
    expected = tv_ops.box_area(boxes, fmt=fmt)
    _assert_same(ops.box_area(boxes, fmt=fmt), expected)
    assert not expected.is_floating_point()


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("name", IOU_FUNCTIONS)
def test_iou_family_of_integer_boxes_matches_torchvision(dtype, name):
    gen = torch.Generator().manual_seed(12)
    boxes1, boxes2 = _int_boxes(gen, 7, dtype), _int_boxes(gen, 5, dtype)
    boxes2[0] = boxes1[0]  # an exact match
    actual = getattr(ops, name)(boxes1, boxes2)
    assert actual.dtype == getattr(tv_ops, name)(boxes1, boxes2).dtype == torch.float32
    # torchvision forms corner differences in the boxes' dtype, so uint8 wraps around for disjoint boxes (a negative
    # overlap becomes ~255 pixels); fastdet computes exactly: compare with torchvision where nothing wraps.
    wide = (boxes1.short(), boxes2.short()) if dtype == torch.uint8 else (boxes1, boxes2)
    expected = getattr(tv_ops, name)(*wide)
    if name == "box_iou":  # inter and union are exact integers; one rounding of their quotient either way
        _assert_same(actual, expected)
    else:  # torchvision rounds the extra terms in float32 on the way
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("fmt", ["xywh", "cxcywh"])
def test_box_iou_of_integer_boxes_in_other_formats_and_mixed_dtypes(fmt):
    gen = torch.Generator().manual_seed(13)
    boxes1, boxes2 = _int_boxes(gen, 6, torch.int64), _int_boxes(gen, 4, torch.int32)
    _assert_same(ops.box_iou(boxes1, boxes2, fmt=fmt), tv_ops.box_iou(boxes1, boxes2, fmt=fmt))
    for float_dtype in (torch.float32, torch.float64):
        other = boxes2.to(float_dtype)
        for a, b in ((boxes1, other), (other, boxes1)):
            expected = tv_ops.box_iou(a, b, fmt=fmt)
            actual = ops.box_iou(a, b, fmt=fmt)
            assert actual.dtype == expected.dtype == float_dtype
            torch.testing.assert_close(actual, expected)
            torch.testing.assert_close(ops.generalized_box_iou(a, b), tv_ops.generalized_box_iou(a, b))


def test_integer_boxes_in_batched_iou_and_box_utilities():
    gen = torch.Generator().manual_seed(14)
    boxes1, boxes2 = _int_boxes(gen, 8, torch.int64).reshape(2, 4, 4), _int_boxes(gen, 6, torch.int64).reshape(2, 3, 4)
    _assert_same(ops.box_iou(boxes1, boxes2), tv_ops.box_iou(boxes1, boxes2))
    boxes = boxes1[0]
    for in_fmt, out_fmt in (("xyxy", "xywh"), ("xywh", "xyxy"), ("xyxy", "cxcywh"), ("cxcywh", "xyxy")):
        _assert_same(ops.box_convert(boxes, in_fmt, out_fmt), tv_ops.box_convert(boxes, in_fmt, out_fmt))
    _assert_same(ops.clip_boxes_to_image(boxes, (30, 40)), tv_ops.clip_boxes_to_image(boxes, (30, 40)))
    _assert_same(ops.remove_small_boxes(boxes, 10), tv_ops.remove_small_boxes(boxes, 10))


def test_complex_boxes_are_rejected_with_a_clear_error():
    with pytest.raises(TypeError, match="boxes1 must be a real"):
        ops.box_iou(torch.zeros(2, 4, dtype=torch.complex64), torch.zeros(2, 4))


# --------------------------------------------------------------------------------------------------------------------
# torch.fx: the RoI modules and functions are leaf calls of a traced graph
# --------------------------------------------------------------------------------------------------------------------


class _RoiHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.align = ops.RoIAlign((3, 2), 0.5, 2, aligned=True)
        self.pool = ops.RoIPool(2, 0.5)
        self.pooler = ops.MultiScaleRoIAlign(["p2", "p3"], 2, 2)

    def forward(self, x, rois, boxes: list[torch.Tensor]):
        features = self.conv(x)
        aligned = self.align(features, rois)
        pooled = self.pool(features, rois)
        pyramid = {"p2": features, "p3": features[:, :, ::2, ::2]}
        multi = self.pooler(pyramid, boxes, [(24, 30), (24, 30)])
        direct = ops.roi_align(features, boxes, 2, 0.5) + ops.roi_pool(features, rois, 2, 0.5)
        return aligned.flatten(1).sum(1) + pooled.flatten(1).sum(1) + multi.flatten(1).sum(1) + direct.flatten(1).sum(1)


def _head_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 12, 15, generator=gen)
    boxes = [_boxes(gen, 3, scale=20.0), _boxes(gen, 3, scale=20.0)]
    rois = torch.cat([torch.cat([torch.full((3, 1), float(i)), b], dim=1) for i, b in enumerate(boxes)])
    return x, rois, boxes


def test_fx_symbolic_trace_of_the_roi_modules_matches_eager():
    head = _RoiHead()
    traced = torch.fx.symbolic_trace(head)
    targets = [node.target for node in traced.graph.nodes if node.op == "call_function"]
    names = [getattr(t, "__name__", "") for t in targets]
    assert names.count("roi_align") == 2 and names.count("roi_pool") == 2 and "_multi_scale_pool" in names
    for seed in (0, 1):
        args = _head_inputs(seed)
        _assert_same(traced(*args), head(*args))


def test_fx_traced_multi_scale_roi_align_function_and_torchvision_feature_extraction():
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    head = _RoiHead().eval()
    train_nodes, eval_nodes = get_graph_node_names(head)
    assert train_nodes == eval_nodes
    for name in ("align.roi_align", "pool.roi_pool", "pooler._multi_scale_pool", "roi_align", "roi_pool"):
        assert name in eval_nodes, eval_nodes
    extractor = create_feature_extractor(head, {"align.roi_align": "aligned", "pooler._multi_scale_pool": "multi"})
    x, rois, boxes = _head_inputs(2)
    features = head.conv(x)
    out = extractor(x, rois, boxes)
    _assert_same(out["aligned"], head.align(features, rois))
    pyramid = {"p2": features, "p3": features[:, :, ::2, ::2]}
    _assert_same(out["multi"], head.pooler(pyramid, boxes, [(24, 30), (24, 30)]))

    class Functional(torch.nn.Module):
        def forward(self, p2, p3, boxes: list[torch.Tensor]):
            return ops.multi_scale_roi_align([p2, p3], boxes, 2, spatial_scales=[0.5, 0.25])

    traced = torch.fx.symbolic_trace(Functional())
    p2 = torch.randn(2, 3, 12, 15)
    _assert_same(traced(p2, p2[:, :, ::2, ::2], boxes), Functional()(p2, p2[:, :, ::2, ::2], boxes))


def test_eager_multi_scale_roi_align_module_still_records_its_scales():
    head = _RoiHead()
    head(*_head_inputs(3))
    assert head.pooler.scales == [0.5, 0.25]


# --------------------------------------------------------------------------------------------------------------------
# autocast
# --------------------------------------------------------------------------------------------------------------------

AUTOCAST_OPS = ["nms", "batched_nms", "roi_align", "roi_pool", "roi_spp", "multi_scale_roi_align"]


@pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
@pytest.mark.parametrize("name", AUTOCAST_OPS)
def test_autocast_kernels_are_registered(name, key):
    if not torch._C._is_autocast_available(key.removeprefix("Autocast").lower()):
        pytest.skip(f"this torch build has no {key}")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdet::{name}", key)


def _autocast_dtype(device):
    return torch.bfloat16 if device == "cpu" else torch.float16


def _on(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device available")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_autocast_nms_matches_torchvision(device):
    _on(device)
    low = _autocast_dtype(device)
    gen = torch.Generator().manual_seed(20)
    boxes, scores = _boxes(gen, 200, scale=300.0).to(device), torch.rand(200, generator=gen).to(device)
    idxs = torch.randint(4, (200,), generator=gen).to(device)
    for b, s in ((boxes.to(low), scores), (boxes.to(low), scores.to(low)), (boxes, scores.to(low)), (boxes, scores)):
        with torch.autocast(device, dtype=low):
            expected = tv_ops.nms(b, s, 0.3)
            _assert_same(ops.nms(b, s, 0.3), expected)
            _assert_same(torch.ops.fastdet.nms(b, s, 0.3), expected)
            _assert_same(ops.batched_nms(b, s, idxs, 0.3), tv_ops.batched_nms(b.float(), s.float(), idxs, 0.3))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("feature_dtype", ["low", "float32", "float64"])
def test_autocast_roi_align_matches_torchvision(device, feature_dtype):
    _on(device)
    low = _autocast_dtype(device)
    dtype = {"low": low, "float32": torch.float32, "float64": torch.float64}[feature_dtype]
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(2, 3, 12, 15, generator=gen).to(device=device, dtype=dtype)
    rois = _rois(gen, 7, 2).to(device)
    if dtype == torch.float64:
        rois = rois.double()  # torchvision leaves float64 alone under autocast and wants matching dtypes
    for aligned in (False, True):
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        with torch.autocast(device, dtype=low):
            expected = tv_ops.roi_align(x1, rois, (3, 2), 0.5, -1, aligned)
            actual = ops.roi_align(x2, rois, (3, 2), 0.5, -1, aligned)
        assert actual.dtype == expected.dtype == dtype
        grad = torch.randn(expected.shape, generator=gen).to(device=device, dtype=dtype)
        expected.backward(grad)
        actual.backward(grad)
        if device == "cpu":
            _assert_same(actual, expected)
            _assert_same(x2.grad, x1.grad)
        else:
            torch.testing.assert_close(actual, expected)
            torch.testing.assert_close(x2.grad, x1.grad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_autocast_roi_pool_and_multi_scale_roi_align_match_torchvision(device):
    _on(device)
    low = _autocast_dtype(device)
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(2, 3, 12, 15, generator=gen).to(device=device, dtype=low)
    rois = _rois(gen, 7, 2).to(device)
    with torch.autocast(device, dtype=low):
        actual = ops.roi_pool(x, rois, 2, 0.5)
    # torchvision's autocast roi_pool (CUDA; on the CPU it has none and rejects the mixed dtypes): float32, then back
    _assert_same(actual, tv_ops.roi_pool(x.float(), rois, 2, 0.5).to(low))

    boxes = [_boxes(gen, 4, scale=40.0).to(device), _boxes(gen, 3, scale=40.0).to(device)]
    pyramid = {"p2": x, "p3": x[:, :, ::2, ::2].contiguous()}
    with torch.autocast(device, dtype=low):
        actual = ops.MultiScaleRoIAlign(["p2", "p3"], 2, 2)(pyramid, boxes, [(24, 30), (24, 30)])
        expected = tv_ops.MultiScaleRoIAlign(["p2", "p3"], 2, 2)(pyramid, boxes, [(24, 30), (24, 30)])
    assert actual.dtype == expected.dtype == low
    _assert_same(actual, expected) if device == "cpu" else torch.testing.assert_close(actual, expected)


def test_autocast_roi_align_under_torch_compile():
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(2, 3, 12, 15, generator=gen).bfloat16()
    rois = _rois(gen, 5, 2)

    def fn(x, rois):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.roi_align(x, rois, 2, 0.5), ops.nms(rois[:, 1:].bfloat16(), rois[:, 0], 0.5)

    _assert_same(_compiled(fn)(x, rois), fn(x, rois))


# --------------------------------------------------------------------------------------------------------------------
# exception types: what a caller of torchvision catches
# --------------------------------------------------------------------------------------------------------------------

_X = torch.randn(2, 3, 8, 8)
_R5 = torch.tensor([[0.0, 0.0, 0.0, 5.0, 5.0]])
_B = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 5.0, 5.0]])
_S = torch.tensor([0.9, 0.8])
_LOGITS, _TARGETS = torch.randn(3, 4), torch.rand(3, 4)
_LONG = torch.zeros(2, dtype=torch.long)

# name: (call with the module under test, fastdet's message). torchvision raises for each of these; fastdet must raise
# an instance of the same type (it may be a subclass, e.g. a ValueError that is also an AssertionError).
BAD_INPUTS = {
    "focal-reduction": (lambda m: m.sigmoid_focal_loss(_LOGITS, _TARGETS, reduction="bad"), "reduction must be"),
    "focal-shapes": (lambda m: m.sigmoid_focal_loss(_LOGITS, _TARGETS[:2]), "targets must have the shape"),
    "giou-loss-reduction": (lambda m: m.generalized_box_iou_loss(_B, _B, reduction="bad"), "reduction must be"),
    "diou-loss-reduction": (lambda m: m.distance_box_iou_loss(_B, _B, reduction="bad"), "reduction must be"),
    "ciou-loss-reduction": (lambda m: m.complete_box_iou_loss(_B, _B, reduction="bad"), "reduction must be"),
    "box-loss-3-coords": (lambda m: m.generalized_box_iou_loss(_B[:, :3], _B[:, :3]), "must have shape"),
    "roi_align-boxes-K4": (lambda m: m.roi_align(_X, torch.zeros(1, 4), 2), r"boxes must be a Tensor\[K, 5\]"),
    "roi_align-boxes-list-K5": (lambda m: m.roi_align(_X, [torch.zeros(1, 5)], 2), r"boxes\[0\] must be"),
    "roi_align-boxes-str": (lambda m: m.roi_align(_X, "boxes", 2), r"boxes must be a Tensor\[K, 5\] or a list"),
    "roi_align-boxes-int": (lambda m: m.roi_align(_X, _R5.long(), 2), "boxes must be floating-point"),
    "roi_align-input-3d": (lambda m: m.roi_align(_X[0], _R5, 2), r"input must have shape \[N, C, H, W\]"),
    "roi_align-input-int": (lambda m: m.roi_align(_X.long(), _R5, 2), "input must be a floating-point"),
    "roi_align-output-size-negative": (lambda m: m.roi_align(_X, _R5, -1), "output_size must be a positive int"),
    "roi_align-output-size-float": (lambda m: m.roi_align(_X, _R5, 2.5), "output_size must be a positive int"),
    "roi_pool-boxes-K4": (lambda m: m.roi_pool(_X, torch.zeros(1, 4), 2), r"boxes must be a Tensor\[K, 5\]"),
    "roi_pool-boxes-list-K5": (lambda m: m.roi_pool(_X, [torch.zeros(1, 5)], 2), r"boxes\[0\] must be"),
    "roi_pool-input-3d": (lambda m: m.roi_pool(_X[0], _R5, 2), r"input must have shape \[N, C, H, W\]"),
    "roi_pool-boxes-empty-list": (lambda m: m.roi_pool(_X, [], 2), "got an empty list"),
    "multi-scale-no-image-shapes": (lambda m: m.MultiScaleRoIAlign(["a"], 2, 2)({"a": _X}, [_B, _B], None),
                                    "image_shapes must list"),
    "multi-scale-missing-level": (lambda m: m.MultiScaleRoIAlign(["a"], 2, 2)({"b": _X}, [_B, _B], [(8, 8)] * 2),
                                  "x holds none of the feature maps"),
    "box_iou-3-coords": (lambda m: m.box_iou(_B[:, :3], _B), r"boxes1 must have shape \[\.\.\., 4\]"),
    "generalized_box_iou-3-coords": (lambda m: m.generalized_box_iou(_B, _B[:, :3]), "boxes2 must have shape"),
    "distance_box_iou-3-coords": (lambda m: m.distance_box_iou(_B[:, :3], _B), "boxes1 must have shape"),
    "complete_box_iou-3-coords": (lambda m: m.complete_box_iou(_B[:, :3], _B), "boxes1 must have shape"),
    "box_iou-fmt": (lambda m: m.box_iou(_B, _B, fmt="abc"), "fmt must be one of"),
    "box_area-3-coords": (lambda m: m.box_area(_B[:, :3]), "boxes must have shape"),
    "box_convert-3-coords": (lambda m: m.box_convert(_B[:, :3], "xyxy", "cxcywh"), "boxes must have shape"),
    "box_convert-fmt": (lambda m: m.box_convert(_B, "abc", "xyxy"), "in_fmt must be one of"),
    "clip-3-coords": (lambda m: m.clip_boxes_to_image(_B[:, :3], (4, 4)), "boxes must have shape"),
    "remove_small-3-coords": (lambda m: m.remove_small_boxes(_B[:, :3], 1.0), "boxes must have shape"),
    "nms-3-coords": (lambda m: m.nms(_B[:, :3], _S, 0.5), r"boxes must have shape \[N, 4\]"),
    "nms-scores-2d": (lambda m: m.nms(_B, _S[None], 0.5), "scores must have shape"),
    "nms-lengths": (lambda m: m.nms(_B, _S[:1], 0.5), "scores must have shape"),
    "nms-int-boxes": (lambda m: m.nms(_B.long(), _S, 0.5), "boxes must be a floating-point"),
    "batched_nms-3-coords": (lambda m: m.batched_nms(_B[:, :3], _S, _LONG, 0.5), r"boxes must have shape \[N, 4\]"),
    "batched_nms-idxs-length": (lambda m: m.batched_nms(_B, _S, torch.zeros(3, dtype=torch.long), 0.5),
                                "idxs must have shape"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_raises_what_torchvision_raises(case):
    call, message = case
    with pytest.raises(Exception) as theirs:
        call(tv_ops)
    with pytest.raises(type(theirs.value), match=message) as ours:
        call(ops)
    # and the natural type of the problem, for code written against fastdet
    natural = (ValueError, TypeError, RuntimeError)
    assert isinstance(ours.value, natural), type(ours.value).__mro__


# Where fastdet deliberately differs (README.md, "Exceptions"): torchvision accepts these (or fails by accident, with
# an AttributeError), fastdet raises the given type with a message naming the argument.
DELIBERATE_DIFFERENCES = {
    "roi_align-output-size-0": (lambda m: m.roi_align(_X, _R5, 0), ValueError, "output_size must be a positive"),
    "roi_align-output-size-3": (lambda m: m.roi_align(_X, _R5, (2, 2, 2)), ValueError, "output_size must be"),
    "roi_align-batch-index": (lambda m: m.roi_align(_X, torch.tensor([[5.0, 0, 0, 5, 5]]), 2), RuntimeError,
                              "not a valid batch index"),
    "box_iou-rank-1": (lambda m: m.box_iou(torch.zeros(4), _B), ValueError, "boxes1 must have shape"),
    "batched_nms-float-idxs": (lambda m: m.batched_nms(_B, _S, torch.zeros(2), 0.5), RuntimeError,
                               "idxs must be an integer tensor"),
    "nms-nan-threshold": (lambda m: m.nms(_B, _S, float("nan")), ValueError, "iou_threshold must be"),
    "nms-boxes-list": (lambda m: m.nms([[0.0, 0.0, 1.0, 1.0]], _S[:1], 0.5), TypeError, "boxes must be a torch"),
}


@pytest.mark.parametrize("case", list(DELIBERATE_DIFFERENCES.values()), ids=list(DELIBERATE_DIFFERENCES))
def test_deliberate_differences_from_torchvision(case):
    call, error, message = case
    with pytest.raises(error, match=message):
        call(ops)


# more families under torch.export with dynamic dimensions


class _PostprocessModule(torch.nn.Module):
    def forward(self, boxes, scores, idxs, rel, anchors):
        keep, num = ops.nms_fixed(boxes, scores, idxs, 0.5, 10)
        det = ops.multiclass_nms(boxes, torch.stack([scores, 1 - scores], dim=-1), 0.2, 0.5, 8, 30)
        selected = ops.decode_and_select(rel, anchors, scores, 0.3, 5)
        return keep, num, *det, *selected


class _TrainingTermsModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pooler = ops.MultiScaleRoIAlign(["p2", "p3"], 2, 2)

    def forward(self, p2, p3, feature, boxes, logits, targets, deltas):
        pooled = self.pooler({"p2": p2, "p3": p3}, [boxes, boxes], [(64, 64), (64, 64)])
        grid = [(feature.shape[-2], feature.shape[-1])]
        anchors = ops.generate_anchors(grid, [8], ((16, 32),), ((0.5, 1.0),))
        priors = ops.yolo_grid_priors(grid, [8])
        return (pooled, anchors, priors, ops.sigmoid_focal_loss(logits, targets, reduction="sum"),
                ops.generalized_box_iou_loss(boxes, boxes.flip(0), "mean"), ops.box_decode(deltas, boxes))


def test_export_postprocessing_with_dynamic_batch_and_candidates():
    gen = torch.Generator().manual_seed(24)
    # multiclass_nms / decode_and_select take a different (static) path when the candidates are fewer than the top-k,
    # so N is declared to be at least that large
    b, n = torch.export.Dim("b"), torch.export.Dim("n", min=16)

    def args(bb, nn):
        return (_boxes(gen, bb * nn).reshape(bb, nn, 4), torch.rand(bb, nn, generator=gen),
                torch.randint(3, (bb, nn), generator=gen), torch.randn(bb, nn, 4, generator=gen), _boxes(gen, nn))

    dims = ({0: b, 1: n}, {0: b, 1: n}, {0: b, 1: n}, {0: b, 1: n}, {0: n})
    _check_export(_PostprocessModule(), args(2, 20), dims, args(3, 41), args(1, 16))


def test_export_pooling_anchors_and_losses_with_dynamic_sizes():
    gen = torch.Generator().manual_seed(25)
    k, h, w = torch.export.Dim("k"), torch.export.Dim("h"), torch.export.Dim("w")

    def args(kk, hh, ww):
        boxes = _boxes(gen, kk, scale=40.0)
        return (torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 3, 8, 8, generator=gen),
                torch.zeros(1, 1, hh, ww), boxes, torch.randn(kk, 4, generator=gen), torch.rand(kk, 4, generator=gen),
                torch.randn(kk, 4, generator=gen))

    # MultiScaleRoIAlign's feature maps stay static: its level scales are Python floats inferred from their sizes
    # (as in torchvision), so a dynamic pyramid would be specialised anyway.
    dims = (None, None, {2: h, 3: w}, {0: k}, {0: k}, {0: k}, {0: k})
    _check_export(_TrainingTermsModule(), args(5, 8, 8), dims, args(9, 6, 10))


@pytest.mark.parametrize("key", ["AutocastCPU", "AutocastCUDA"])
@pytest.mark.parametrize("name", ["sigmoid_focal_loss", "sigmoid_focal_loss_with_labels"])
def test_focal_loss_autocast_kernels_are_registered(name, key):
    test_autocast_kernels_are_registered(name, key)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_autocast_focal_loss_matches_torchvision(device, reduction):
    # torchvision's focal loss runs binary_cross_entropy_with_logits, which autocast computes in float32: the loss is
    # float32 under autocast, the gradient in the logits' dtype
    _on(device)
    low = _autocast_dtype(device)
    gen = torch.Generator().manual_seed(26)
    logits = (torch.randn(6, 5, generator=gen) * 3).to(device=device, dtype=low)
    labels = torch.randint(-1, 5, (6,), generator=gen).to(device)
    targets = torch.nn.functional.one_hot(labels.clamp(min=0), 5).to(low) * (labels >= 0)[:, None].to(low)
    ours, theirs, with_labels = (logits.clone().requires_grad_(True) for _ in range(3))
    with torch.autocast(device, dtype=low):
        expected = tv_ops.sigmoid_focal_loss(theirs, targets, reduction=reduction)
        actual = ops.sigmoid_focal_loss(ours, targets, reduction=reduction)
        actual_labels = ops.sigmoid_focal_loss_with_labels(with_labels, labels, reduction=reduction)
    assert actual.dtype == actual_labels.dtype == expected.dtype == torch.float32
    # torchvision forms sigmoid(logits) and (1 - p_t) ** gamma in the low-precision dtype; fastdet all in float32
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(actual_labels, actual, rtol=1e-6, atol=1e-7)
    for loss, x in ((expected, theirs), (actual, ours), (actual_labels, with_labels)):
        loss.sum().backward()
        assert x.grad.dtype == low
    torch.testing.assert_close(ours.grad.float(), theirs.grad.float(), rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(with_labels.grad, ours.grad)


class _DecodeSelectModule(torch.nn.Module):
    def forward(self, deltas, anchors, scores):
        return ops.decode_and_select(deltas, anchors, scores, 0.2, 24)


def test_export_decode_and_select_with_fewer_candidates_than_top_k():
    # No bound relating N and top_k is needed: the selection pads to top_k internally instead of branching on N.
    gen = torch.Generator().manual_seed(26)
    b, n = torch.export.Dim("b"), torch.export.Dim("n")

    def args(bb, nn):
        return (torch.randn(bb, nn, 4, generator=gen), _boxes(gen, nn),
                torch.rand(bb, nn, 3, generator=gen).round(decimals=1))

    _check_export(_DecodeSelectModule(), args(2, 30), ({0: b, 1: n}, {0: n}, {0: b, 1: n}), args(3, 5), args(1, 24),
                  args(2, 90))
