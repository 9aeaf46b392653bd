"""Shared test set-up: device parametrisation, CUDA skipping, fresh random seeds, and a hard stop on a broken build."""

from __future__ import annotations

import os
import random

import pytest
import torch

import fastdet
from fastdet import _extension

NO_CUDA_REASON = "no CUDA device available"
NO_CUDA_KERNELS_REASON = "a CUDA device is present but fastdet's CUDA kernels are not loaded"


def cpu_and_cuda():
    """The device list every device-parametrised test uses. CUDA cases are always collected and then skipped, with a
    reason, by :func:`pytest_collection_modifyitems` where they cannot run; they are never dropped from the list."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=cpu_and_cuda())
def device(request) -> str:
    """Any test that takes ``device`` runs once per entry of :func:`cpu_and_cuda`."""
    return request.param


@pytest.fixture
def torchvision_per_category_nms(monkeypatch):
    """Make torchvision's detection models run their batched NMS category by category (torchvision's own
    ``_batched_nms_vanilla``), the semantics fastdet implements, with exactly tied scores in index order.

    Two departures from torchvision's ``batched_nms``, both about decisions torchvision leaves to chance:

    - On small inputs (at most 1,000 boxes on CPU) ``batched_nms`` shifts each category's boxes by
      ``category * (max coordinate + 1)``; the shift rounds coordinates (by up to about 5e-4 px at 80 categories of
      100 px images), which can flip a decision whose IoU lies within float rounding of the threshold (seen: IoU
      0.500002 at threshold 0.5).
    - The kept indices are ordered by ``scores.sort(descending=True)``, which is not stable on CPU above a few dozen
      elements: exactly tied scores come out in an order set by the sort's internals. An RPN whose objectness
      saturates (probability exactly 1.0 for many proposals) hands its proposals to the box head in that order, and
      when two tied proposals then give the same class score to overlapping boxes, which one NMS keeps depends on it
      (seen: a MobileNet Faster R-CNN whose random seeds failed parity 2 times in 3 CI runs). fastdet ranks ties by
      index, so the reference here does too.

    Detector parity tests compare against these exact per-category decisions; the op tests compare with
    ``torchvision.ops.batched_nms`` itself."""
    boxes_module = pytest.importorskip("torchvision.ops.boxes")
    vanilla = boxes_module._batched_nms_vanilla

    def per_category_in_index_order(boxes, scores, idxs, iou_threshold):
        keep = vanilla(boxes, scores, idxs, iou_threshold).sort().values
        return keep[torch.sort(scores[keep], descending=True, stable=True).indices]

    monkeypatch.setattr(boxes_module, "batched_nms", per_category_in_index_order)


@pytest.fixture
def seed() -> int:
    """A fresh seed for every test, so each run draws new inputs. Put it in assertion messages; set
    FASTDET_TEST_SEED=<seed> to replay a failure."""
    fixed = os.environ.get("FASTDET_TEST_SEED")
    return int(fixed) if fixed else random.SystemRandom().randrange(2**31)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    # Every failure of a seeded test names its seed, whichever assertion tripped.
    report = yield
    if report.failed and "seed" in getattr(item, "funcargs", {}):
        seed = item.funcargs["seed"]
        report.sections.append(("random seed", f"seed={seed}; replay with FASTDET_TEST_SEED={seed}"))
    return report


def pytest_sessionstart(session):
    # The tests compare fastdet's native kernels with the reference. If the extension did not load, every native test
    # would fail one by one (or worse, someone would add a skip); a broken build must instead stop the run loudly.
    if not fastdet.extension_available:
        pytest.exit(
            f"fastdet's native extension is not usable, so the test suite cannot run: {_extension.LOAD_ERROR} "
            f"{_extension.REBUILD_HINT}",
            returncode=pytest.ExitCode.INTERNAL_ERROR,
        )


def pytest_report_header(config):
    return [
        f"fastdet: {os.path.dirname(fastdet.__file__)} (extension loaded: {fastdet.extension_available}, "
        f"CUDA kernels: {_extension.WITH_CUDA}"
        + (f", because {_extension.CUDA_LOAD_ERROR})" if _extension.CUDA_LOAD_ERROR else ")"),
        f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}",
    ]


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        reason = NO_CUDA_REASON
    elif not _extension.WITH_CUDA:
        reason = f"{NO_CUDA_KERNELS_REASON}: {_extension.CUDA_LOAD_ERROR}"
    else:
        reason = None
    if reason is not None:
        skip_cuda = pytest.mark.skip(reason=reason)
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip_cuda)
