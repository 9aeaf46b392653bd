"""Benchmark set-up: the ``bench`` fixture, CUDA skipping with a reason, and versions recorded in the JSON.

Run ``python -m pytest benchmarks --benchmark-only --benchmark-json=bench.json`` from the repository root, then
``python benchmarks/report.py bench.json`` to update RESULTS.md. ``--benchmark-disable`` runs each body once (CI smoke).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fastdet
from fastdet import _extension

from benchmarks.common import Runner, environment

HERE = Path(__file__).resolve().parent


def pytest_sessionstart(session):
    # Without the native extension every fastdet column would be empty; stop instead of producing a table without it.
    if not fastdet.extension_available:
        pytest.exit(
            f"fastdet's native extension is not usable, so the benchmarks cannot run: {_extension.LOAD_ERROR} "
            f"{_extension.REBUILD_HINT}",
            returncode=pytest.ExitCode.INTERNAL_ERROR,
        )


def pytest_report_header(config):
    return [
        f"fastdet: {Path(fastdet.__file__).parent} (CUDA kernels: {_extension.WITH_CUDA}); "
        f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
    ]


def pytest_collection_modifyitems(config, items):
    # CUDA cases stay in the parameter lists and are skipped here with the reason, so a CPU-only run shows them as
    # skipped instead of silently measuring less. This hook sees every collected item, so touch only ours.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device available")
    for item in items:
        if item.get_closest_marker("cuda") is not None and HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastdet"] = environment()


@pytest.fixture
def bench(benchmark, request) -> Runner:
    """``bench(fn, op=..., case=..., impl=..., bytes_moved=...)`` times ``fn`` and labels the result for report.py."""
    return Runner(benchmark, request.config)
