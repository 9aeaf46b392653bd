"""The build itself: which kernels the compiled module registered with the dispatcher."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdet import _extension

FASTDET_OPS = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastdet::"))


# Ops that run on the CPU only (their docstrings say why): COCO evaluation works on host-side annotations; the fused
# multiclass_nms kernel is the CPU fast path (CUDA takes the generic batched path); selective search's segmentation and
# greedy grouping are sequential per strategy (CPU only by design).
CPU_ONLY_OPS = {"fastdet::_coco_evaluate_kernel", "fastdet::_coco_accumulate_kernel", "fastdet::_multiclass_nms_kernel",
                "fastdet::_selective_search_kernel", "fastdet::_selective_search_regions_kernel"}


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
    if _has_kernel(op, "CPU") and op not in CPU_ONLY_OPS:
        assert _has_kernel(op, "CUDA"), op


# --- The stable ABI: what the compiled libraries ask of torch -------------------------------------------------------

# Mangled C++ namespaces of libtorch's unstable API. A reference to any of them ties a build to one torch version.
_UNSTABLE_PREFIXES = ("_ZN2at", "_ZNK2at", "_ZN3c10", "_ZNK3c10", "_ZN5torch", "_ZNK5torch", "_ZTIN2at", "_ZTIN3c10",
                      "_ZTVN2at", "_ZTVN3c10", "_ZTIN5torch", "_ZTVN5torch")


def _library_files():
    files = [Path(_extension._C.__file__)]
    if _extension.WITH_CUDA:
        files.append(Path(_extension._C_cuda.__file__))
    return files


def _undefined_symbols(path: Path) -> list[str]:
    nm = shutil.which("nm")
    assert nm is not None, "binutils' nm is needed to inspect the built libraries"
    out = subprocess.run([nm, "-D", "--undefined-only", str(path)], capture_output=True, text=True, check=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


def _needed_libraries(path: Path) -> list[str]:
    readelf = shutil.which("readelf")
    assert readelf is not None, "binutils' readelf is needed to inspect the built libraries"
    out = subprocess.run([readelf, "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF inspection is Linux-only")
@pytest.mark.parametrize("index", [0, 1], ids=["_C", "_C_cuda"])
def test_libraries_use_only_the_stable_abi(index):
    files = _library_files()
    if index >= len(files):
        pytest.skip(f"no CUDA library loaded: {_extension.CUDA_LOAD_ERROR}")
    unstable = [s for s in _undefined_symbols(files[index]) if s.startswith(_UNSTABLE_PREFIXES)]
    assert not unstable, f"{files[index].name} uses libtorch's unstable C++ API: {unstable[:20]}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF inspection is Linux-only")
def test_cpu_library_needs_neither_cuda_nor_torch_python():
    # _C must load under a CPU-only torch and outside torch's Python bindings' ABI: CUDA lives in _C_cuda only.
    needed = _needed_libraries(Path(_extension._C.__file__))
    assert not [lib for lib in needed if "cuda" in lib or "cudart" in lib or "torch_python" in lib], needed


def test_build_records_its_oldest_supported_torch():
    assert tuple(int(v) for v in _extension._C.min_torch_version.split(".")) == _extension.MIN_TORCH
