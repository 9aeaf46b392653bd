"""The build itself: which kernels the compiled module registered with the dispatcher."""

from __future__ import annotations

import os

import pytest
import torch

from fastdet import _extension

FASTDET_OPS = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastdet::"))


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def test_ops_are_registered():
    assert len(FASTDET_OPS) >= 10, FASTDET_OPS


@pytest.mark.parametrize("op", FASTDET_OPS)
def test_every_op_runs_on_cpu(op):
    # Either a CPU kernel, or a composite of ATen ops and other fastdet ops that works on every backend.
    assert _has_kernel(op, "CPU") or _has_kernel(op, "CompositeExplicitAutograd"), op


@pytest.mark.skipif(os.environ.get("FASTDET_CUDA") != "1", reason="FASTDET_CUDA=1 not requested for this build")
@pytest.mark.parametrize("op", FASTDET_OPS)
def test_forced_cuda_build_has_cuda_kernels(op):
    # CI builds with FASTDET_CUDA=1: every op with a CPU kernel must also have its CUDA kernel compiled *and* linked.
    assert _extension.WITH_CUDA
    if _has_kernel(op, "CPU"):
        assert _has_kernel(op, "CUDA"), op
