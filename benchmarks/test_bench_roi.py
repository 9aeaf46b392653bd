"""RoI ops: roi_align, roi_pool and multi-scale (FPN) RoIAlign, forward + backward (what training pays per step).

Issue 3's size: batch 8, 256 channels, 512 RoIs per image, 7 x 7 bins, sampling ratio 2. roi_align/roi_pool pool a
stride-16 map of an 800 x 1216 image (50 x 76); the multi-scale case pools FPN levels P2-P5 of that image (strides
4-32). RoIs are detector-like boxes (``clustered_detections``) clipped to the image. The reference is a Python loop
over RoIs, so it is timed only at each op's smallest size.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import IMAGE_HEIGHT, IMAGE_WIDTH, IMPLEMENTATIONS, cases, clustered_detections, implementation

CHANNELS = 256
OUTPUT_SIZE = (7, 7)
SAMPLING_RATIO = 2
IMAGE = (800, 1216)
STRIDE = 16
PYRAMID_STRIDES = (4, 8, 16, 32)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])


def rois_for(case, seed=20):
    """``list`` of per-image boxes ``[n, 4]`` inside the image, float32 on the case's device."""
    batch, n = case.params["batch"], case.params["n"]
    boxes = clustered_detections(n, batch=batch, seed=seed).boxes
    scale = torch.tensor([IMAGE[1] / IMAGE_WIDTH, IMAGE[0] / IMAGE_HEIGHT] * 2)
    boxes = (boxes * scale).clamp(min=0)
    boxes = torch.minimum(boxes, torch.tensor([IMAGE[1], IMAGE[0]] * 2, dtype=boxes.dtype))
    return [b.contiguous().to(case.device) for b in boxes]


def features(case, stride, dtype, seed=21):
    g = torch.Generator().manual_seed(seed)
    shape = (case.params["batch"], CHANNELS, IMAGE[0] // stride, IMAGE[1] // stride)
    return torch.randn(shape, generator=g).to(dtype).to(case.device).requires_grad_(True)


def fwd_bwd(fn, inputs):
    def step():
        out = fn()
        # allow_unused: the reference skips levels no RoI maps to
        return torch.autograd.grad(out, inputs, torch.ones_like(out), allow_unused=True)

    return step


def fwd_only(fn):
    def step():
        with torch.no_grad():  # inference: no autograd bookkeeping, as a detector's eval forward
            return fn()

    return step


PASSES = pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])


def timed_step(passes, fn, inputs):
    return fwd_only(fn) if passes == "fwd" else fwd_bwd(fn, inputs)


def skip_unsupported(impl, step):
    # torchvision has no kernel for some dtype/device pairs (e.g. bfloat16 on older builds): a skip, not a failure.
    if impl != "torchvision":
        return
    try:
        step()
    except (RuntimeError, NotImplementedError) as exc:
        pytest.skip(f"torchvision cannot run this case: {str(exc).splitlines()[0][:160]}")


@PASSES
@DTYPES
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases("roi_align"))
def test_roi_align(bench, case, impl, dtype, passes):
    fn = implementation("roi_align", impl, case, python_loop_reference=True)
    x = features(case, STRIDE, dtype)
    boxes = [b.to(dtype) for b in rois_for(case)]
    step = timed_step(passes, lambda: fn(x, boxes, OUTPUT_SIZE, 1.0 / STRIDE, SAMPLING_RATIO, False), [x])
    skip_unsupported(impl, step)
    bench(step, op=f"roi_align {passes} {str(dtype).removeprefix('torch.')}", case=case, impl=impl)


@PASSES
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases("roi_align"))
def test_roi_pool(bench, case, impl, passes):
    fn = implementation("roi_pool", impl, case, python_loop_reference=True)
    x = features(case, STRIDE, torch.float32)
    boxes = rois_for(case)
    step = timed_step(passes, lambda: fn(x, boxes, OUTPUT_SIZE, 1.0 / STRIDE), [x])
    bench(step, op=f"roi_pool {passes}", case=case, impl=impl)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases("multi_scale_roi_align"))
def test_multi_scale_roi_align(bench, case, impl):
    feats = {f"p{i + 2}": features(case, s, torch.float32, seed=30 + i) for i, s in enumerate(PYRAMID_STRIDES)}
    boxes = rois_for(case)
    shapes = [IMAGE] * case.params["batch"]
    if impl == "reference":
        fn = implementation("multi_scale_roi_align", impl, case, python_loop_reference=True)
        scales = [1.0 / s for s in PYRAMID_STRIDES]

        def pooled():
            return fn(list(feats.values()), boxes, OUTPUT_SIZE, SAMPLING_RATIO, spatial_scales=scales)
    else:
        module_cls = implementation("MultiScaleRoIAlign", impl, case)
        module = module_cls(list(feats), OUTPUT_SIZE, SAMPLING_RATIO)

        def pooled():
            return module(feats, boxes, shapes)

    bench(fwd_bwd(pooled, list(feats.values())), op="multi_scale_roi_align fwd+bwd", case=case, impl=impl)
