"""Anchors + box decoding (issue 4): RetinaNet's 5 FPN levels (P3-P7, strides 8-128, 3 scales x 3 aspect ratios = 9
anchors per cell) for an 800 x 1333 image padded to 800 x 1344, batch B: generate the anchors of every level for the
batch, then decode one set of deltas per anchor (weights (1, 1, 1, 1)), ~201.6k anchors per image.

What each implementation does per call, as a detector would per forward:

* torchvision: ``AnchorGenerator(image_list, features)`` (recomputed every call, one tensor per image) and
  ``BoxCoder.decode(rel_codes, anchors)``.
* fastdet: the same two calls through ``fastdet.ops.AnchorGenerator`` and ``fastdet.ops.BoxCoder``. The generator
  lives as long as the model, so after the first call its anchors come from the cache; the per-image anchors are one
  shared tensor, which ``BoxCoder.decode`` decodes against without concatenating B copies.
* reference: ``fastdet.ops.reference.generate_anchors`` (level by level) and ``reference.box_decode``.

The decoded boxes (B x N x 16 bytes written, deltas read) dominate the traffic; bytes recorded accordingly.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastdet
from benchmarks.common import IMPLEMENTATIONS, cases, implementation, torchvision_ops

IMAGE_SIZE = (800, 1344)  # 800 x 1333 padded to a multiple of 32, as torchvision's transform does
STRIDES = (8, 16, 32, 64, 128)
SIZES = tuple(tuple(s * 2 ** (k / 3) for k in range(3)) for s in (32, 64, 128, 256, 512))
RATIOS = ((0.5, 1.0, 2.0),) * 5


class ImageList:
    def __init__(self, tensors, image_sizes):
        self.tensors = tensors
        self.image_sizes = image_sizes


def _pipeline(impl: str, case):
    batch = case.params["batch"]
    device = case.device
    grids = [(math.ceil(IMAGE_SIZE[0] / s), math.ceil(IMAGE_SIZE[1] / s)) for s in STRIDES]
    # The generators read only the shapes, so one channel is enough (real FPN features have 256).
    images = ImageList(torch.zeros(batch, 1, *IMAGE_SIZE, device=device), [(800, 1333)] * batch)
    features = [torch.zeros(batch, 1, h, w, device=device) for h, w in grids]
    anchors_per_image = sum(h * w for h, w in grids) * 9
    rel_codes = torch.randn(batch * anchors_per_image, 4, generator=torch.Generator().manual_seed(3)).to(device)

    if impl == "torchvision":
        torchvision_ops()  # skip with the reason when torchvision is missing
        from torchvision.models.detection._utils import BoxCoder
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        generator, coder = AnchorGenerator(SIZES, RATIOS), BoxCoder((1.0, 1.0, 1.0, 1.0))
        return lambda: coder.decode(rel_codes, generator(images, features)), rel_codes
    if impl == "fastdet":
        implementation("box_decode", impl, case)  # skips when the CUDA kernels are missing
        generator, coder = fastdet.ops.AnchorGenerator(SIZES, RATIOS), fastdet.ops.BoxCoder((1.0, 1.0, 1.0, 1.0))
        return lambda: coder.decode(rel_codes, generator(images, features)), rel_codes
    reference = implementation("generate_anchors", "reference", case)
    decode = implementation("box_decode", "reference", case)
    strides = [(IMAGE_SIZE[0] // h, IMAGE_SIZE[1] // w) for h, w in grids]

    def run():
        anchors = reference(grids, strides, SIZES, RATIOS, device=device)
        return decode(rel_codes, anchors).reshape(-1, 1, 4)

    return run, rel_codes


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", cases("anchors_decode"))
def test_anchors_decode(bench, case, impl):
    fn, rel_codes = _pipeline(impl, case)
    bytes_moved = 2 * rel_codes.nbytes  # deltas read, boxes written
    bench(fn, op="anchors_decode", case=case, impl=impl, bytes_moved=bytes_moved)
