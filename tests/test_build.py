"""The build itself: which kernels the compiled module registered with the dispatcher."""

from __future__ import annotations

import os

import pytest
import torch

from fastdet import _extension

# Every native op and the backends that must implement it. Composite ops (built from ATen plus a per-backend private
# op) are registered once for all backends.
BACKEND_OPS = ["pairwise_box_iou", "_pairwise_box_iou_backward", "_nms_keep_flags"]
COMPOSITE_OPS = ["nms", "batched_nms", "nms_fixed"]


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdet::{op}", key)


@pytest.mark.parametrize("op", BACKEND_OPS)
def test_cpu_kernels_registered(op):
    assert _has_kernel(op, "CPU")


@pytest.mark.parametrize("op", COMPOSITE_OPS)
def test_composite_ops_registered(op):
    assert _has_kernel(op, "CompositeExplicitAutograd")


@pytest.mark.skipif(os.environ.get("FASTDET_CUDA") != "1", reason="FASTDET_CUDA=1 not requested for this build")
def test_forced_cuda_build_has_cuda_kernels():
    # CI builds with FASTDET_CUDA=1: the CUDA kernels must have been compiled *and* linked into fastdet._C.
    assert _extension.WITH_CUDA
    for op in BACKEND_OPS:
        assert _has_kernel(op, "CUDA"), op
