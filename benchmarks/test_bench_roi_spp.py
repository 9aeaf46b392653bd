"""roi_spp (SPP-Net spatial pyramid pooling over RoIs), forward and forward + backward.

The size of an SPP-Net / Fast R-CNN head: 512 RoIs (256 per image) on a batch of 2 stride-16 maps of 256 channels,
50 x 68 (an 800 x 1088 image), pyramids (1, 2, 4) and SPP-Net's (1, 2, 3, 6). Implementations, timed side by side in
one run:

* ``fastdet``: ``fastdet.ops.roi_spp``, every level in one pass;
* ``torchvision``: the composition it replaces, ``torch.cat([torchvision.ops.roi_pool(x, boxes, (l, l), s).flatten(1)
  for l in levels], 1)`` (one roi_pool call per level);
* ``fastdet-roi_pool``: the same composition over ``fastdet.ops.roi_pool`` (shows what the single pass saves over
  fastdet's own per-level kernel). It is not a column of RESULTS.md (report.py knows fastdet / torchvision /
  reference); its medians are in the pytest-benchmark output and JSON, grouped with the others.

The pure-PyTorch reference masks every bin over the whole map (memory ~ K * C * bins * H * W), so it is not timed.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import cases, clustered_detections, implementation

CHANNELS = 256
IMAGE = (800, 1088)
STRIDE = 16
LEVELS = pytest.mark.parametrize("levels", [(1, 2, 4), (1, 2, 3, 6)], ids=lambda l: "L" + "-".join(map(str, l)))
PASSES = pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
IMPLS = ("fastdet", "torchvision", "fastdet-roi_pool")


def spp_inputs(case, seed=40):
    """Feature maps ``[B, 256, 50, 68]`` (requiring grad) and per-image detector-like boxes inside the image."""
    batch, n = case.params["batch"], case.params["n"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, IMAGE[0] // STRIDE, IMAGE[1] // STRIDE, generator=g).to(case.device)
    boxes = clustered_detections(n, batch=batch, seed=seed + 1).boxes  # in a 1333 x 800 image
    scale = torch.tensor([IMAGE[1] / 1333.0, IMAGE[0] / 800.0] * 2)
    limit = torch.tensor([IMAGE[1], IMAGE[0]] * 2, dtype=boxes.dtype)
    boxes = torch.minimum((boxes * scale).clamp(min=0), limit)
    return x.requires_grad_(True), [b.contiguous().to(case.device) for b in boxes]


def pooled_fn(impl, case, levels):
    if impl == "fastdet":
        spp = implementation("roi_spp", "fastdet", case)
        return lambda x, boxes: spp(x, boxes, levels, 1.0 / STRIDE)
    pool = implementation("roi_pool", "fastdet" if impl == "fastdet-roi_pool" else "torchvision", case)
    return lambda x, boxes: torch.cat([pool(x, boxes, (l, l), 1.0 / STRIDE).flatten(1) for l in levels], dim=1)


@PASSES
@LEVELS
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", cases("roi_spp"))
def test_roi_spp(bench, case, impl, levels, passes):
    fn = pooled_fn(impl, case, levels)
    x, boxes = spp_inputs(case)

    def forward():
        with torch.no_grad():
            return fn(x, boxes)

    def forward_backward():
        out = fn(x, boxes)
        return torch.autograd.grad(out, x, torch.ones_like(out))

    step = forward if passes == "fwd" else forward_backward
    bench(step, op=f"roi_spp {passes} levels={levels}", case=case, impl=impl)
