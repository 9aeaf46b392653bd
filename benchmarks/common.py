"""Shared machinery of the benchmarks: the size table, realistic inputs, implementation lookup and the timing loop.

Every benchmark times one (op, size, device, implementation) and leaves in ``benchmark.extra_info`` what
``benchmarks/report.py`` needs: ``op``, ``impl`` (fastdet / torchvision / reference), ``device`` (cpu / cuda),
``device_name``, ``size`` / ``params`` (what was measured), ``full_size`` / ``full_params`` (issue 5's size) and, for
bandwidth-bound ops, ``bytes`` (the minimum memory traffic of one call, inputs read plus output written).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import platform
import time

import pytest
import torch

import fastdet
from fastdet import _extension

IMPLEMENTATIONS = ("fastdet", "torchvision", "reference")


@dataclasses.dataclass(frozen=True)
class Size:
    full: dict  # issue 5's size; measured as is on CUDA
    cpu: dict | None = None  # what CPU measures instead; None = the full size


# The one place where sizes are chosen. CUDA always runs issue 5's full sizes. A `cpu` entry scales a size down where
# the full one would keep this 2-core machine busy for long (measured here: torchvision's batched_nms at 200k boxes
# takes ~4 s a call, torchvision's generalized_box_iou at 4096 x 4096 ~3 s); sizes that are cheap on CPU stay full.
# Each list starts with its smallest size, the only one at which the Python-loop reference NMS is timed.
SIZES = {
    "nms": [
        Size({"n": 1_000}),
        Size({"n": 10_000}),
        Size({"n": 100_000}, cpu={"n": 30_000}),
    ],
    "batched_nms": [
        Size({"n": 20_000, "classes": 80}),
        Size({"n": 200_000, "classes": 80}, cpu={"n": 50_000, "classes": 80}),
    ],
    "multiclass_nms": [
        Size({"batch": 16, "n": 20_000, "classes": 80}, cpu={"batch": 4, "n": 20_000, "classes": 80}),
        # detector-typical sizes: SSD300's 8732 priors x 91 COCO classes, and a RetinaNet-style 1000 candidates
        Size({"batch": 32, "n": 8_732, "classes": 91}, cpu={"batch": 2, "n": 8_732, "classes": 91}),
        Size({"batch": 16, "n": 1_000, "classes": 80}, cpu={"batch": 1, "n": 1_000, "classes": 80}),
    ],
    # issue 16: soft-NMS of one image's 3,000 normalised boxes; weighted boxes fusion (and non-maximum weighted) of
    # 3 models x 200 images
    "soft_nms": [
        Size({"n": 3_000}),
    ],
    "weighted_boxes_fusion": [
        Size({"batch": 200, "models": 3}),
    ],
    # non-maximum weighted on the same inputs as weighted boxes fusion
    "non_maximum_weighted": [
        Size({"batch": 200, "models": 3}),
    ],
    # issue 15: selective search (fast mode) of one 500 x 500 photograph, against OpenCV contrib's
    "selective_search": [
        Size({"height": 500, "width": 500}),
    ],
    # issue 4: anchors + decode of RetinaNet's 5 FPN levels (P3-P7, 9 anchors per cell) at 800 x 1333 (padded to 1344)
    "anchors_decode": [
        Size({"batch": 16}, cpu={"batch": 4}),
    ],
    "pairwise_iou": [
        Size({"batch": 16, "n": 1_000, "m": 100}),
        Size({"n": 4096, "m": 4096}, cpu={"n": 2048, "m": 2048}),
    ],
    # Rotated boxes (cxcywhr): pairwise IoU and rotated NMS of clustered oriented detections.
    "rotated_iou": [
        Size({"batch": 8, "n": 100, "m": 100}),
        Size({"n": 4096, "m": 4096}, cpu={"n": 1024, "m": 1024}),
    ],
    "nms_rotated": [
        Size({"n": 1_000}),
        Size({"n": 10_000}, cpu={"n": 4_000}),
    ],
    "batched_nms_rotated": [
        Size({"n": 2_000, "classes": 80}),
        Size({"n": 20_000, "classes": 80}, cpu={"n": 5_000, "classes": 80}),
    ],
    # RetinaNet's classification loss: 16 images x 120k anchors x 80 classes (153.6M logits); CPU: 2 x 30k x 80.
    "focal_loss": [
        Size({"batch": 16, "n": 120_000, "classes": 80}, cpu={"batch": 2, "n": 30_000, "classes": 80}),
    ],
    # RoI ops: batch B images, N RoIs per image (channels, map and bin sizes in benchmarks/test_bench_roi.py).
    "roi_align": [
        Size({"batch": 2, "n": 16}),
        Size({"batch": 8, "n": 512}, cpu={"batch": 2, "n": 256}),
    ],
    # SPP-Net's RoI pyramid pooling (benchmarks/test_bench_roi_spp.py): B images, N RoIs per image.
    "roi_spp": [
        Size({"batch": 2, "n": 256}),
    ],
    "multi_scale_roi_align": [
        Size({"batch": 1, "n": 16}),
        Size({"batch": 8, "n": 512}, cpu={"batch": 1, "n": 256}),
    ],
    # Mask R-CNN's mask ops (benchmarks/test_bench_masks.py): N detections pasted into a height x width image; P
    # proposals' 28 x 28 targets from G ground-truth masks of that image.
    "paste_masks": [
        Size({"n": 100, "height": 480, "width": 640}),
        Size({"n": 300, "height": 800, "width": 1333}, cpu={"n": 100, "height": 800, "width": 1333}),
    ],
    "project_masks": [
        Size({"n": 128, "m": 20, "height": 800, "width": 1333}),
        Size({"n": 512, "m": 50, "height": 800, "width": 1333}, cpu={"n": 256, "m": 50, "height": 800, "width": 1333}),
    ],
    # Detectors (issue 6; benchmarks/test_bench_models.py): B images of height x width, the size each model's transform
    # is set to. The CPU sizes keep one call of ResNet-50 Faster R-CNN to a few seconds on this 2-core machine (with one
    # thread: see CPU_THREADS there).
    "faster_rcnn": [
        Size({"batch": 8, "height": 800, "width": 1333}, cpu={"batch": 1, "height": 320, "width": 512}),
    ],
    "retinanet": [
        Size({"batch": 8, "height": 800, "width": 1333}, cpu={"batch": 1, "height": 320, "width": 512}),
    ],
    "ssd": [
        Size({"batch": 32, "height": 300, "width": 300}, cpu={"batch": 1, "height": 300, "width": 300}),
    ],
}

_LABEL_KEYS = (("batch", "B"), ("n", "N"), ("m", "M"), ("classes", "C"), ("models", "models"))


def size_label(params: dict) -> str:
    """``{"n": 20000, "classes": 80}`` -> ``"N=20k C=80"``; the same label in test ids, groups and RESULTS.md."""
    parts = []
    for key, letter in _LABEL_KEYS:
        if key in params:
            value = params[key]
            parts.append(f"{letter}={value // 1000}k" if value >= 1000 and value % 1000 == 0 else f"{letter}={value}")
    return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Case:
    """One size of one op on one device."""

    device: str
    params: dict
    full: dict
    smallest: bool

    @property
    def label(self) -> str:
        return size_label(self.params)

    @property
    def full_label(self) -> str:
        return size_label(self.full)

    @property
    def id(self) -> str:
        return f"{self.device}-{self.label.replace(' ', '-')}"


def cases(table_key: str) -> list:
    """Every (device, size) of ``SIZES[table_key]`` as pytest params. CUDA cases carry the ``cuda`` mark and are skipped
    with a reason by ``conftest.py`` when no GPU is present, never dropped."""
    params = []
    for index, size in enumerate(SIZES[table_key]):
        for device in ("cpu", "cuda"):
            chosen = size.cpu if device == "cpu" and size.cpu is not None else size.full
            case = Case(device=device, params=chosen, full=size.full, smallest=index == 0)
            marks = [pytest.mark.cuda] if device == "cuda" else []
            params.append(pytest.param(case, id=case.id, marks=marks))
    return params


# --- inputs --------------------------------------------------------------------------------------------------------

IMAGE_WIDTH, IMAGE_HEIGHT = 1333.0, 800.0


@dataclasses.dataclass
class Detections:
    boxes: torch.Tensor  # [..., N, 4] float32 xyxy
    labels: torch.Tensor  # [..., N] int64, the class each box is predicted as


def clustered_detections(num: int, *, batch: int | None = None, classes: int = 80, centres: int = 300,
                         seed: int = 0) -> Detections:
    """Boxes shaped like a detector's raw output before NMS: each is a jittered copy of one of ``centres`` objects.

    Objects are 16-400 px on a side (log-uniform) in a 1333 x 800 image; a box moves its object's centre by ~10% of the
    object's size and scales its sides by ~10%, so boxes of one object overlap heavily (what NMS exists for) while
    different objects mostly do not. 80% of boxes carry their object's class, the rest a random one, as a classifier's
    confusions would. Uniformly random boxes would instead barely overlap, and NMS would keep almost everything.
    The generator is seeded: every run, and every implementation within a run, sees the same inputs.
    """
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    image = torch.tensor([IMAGE_WIDTH, IMAGE_HEIGHT])
    obj_centre = torch.rand(*lead, centres, 2, generator=g) * image
    obj_size = torch.empty(*lead, centres, 2).uniform_(math.log(16.0), math.log(400.0), generator=g).exp()
    obj_class = torch.randint(classes, (*lead, centres), generator=g)

    owner = torch.randint(centres, (*lead, num), generator=g)
    size = obj_size.gather(-2, owner.unsqueeze(-1).expand(*owner.shape, 2))
    centre = obj_centre.gather(-2, owner.unsqueeze(-1).expand(*owner.shape, 2))
    centre = centre + 0.1 * size * torch.randn(*lead, num, 2, generator=g)
    size = size * torch.exp(0.1 * torch.randn(*lead, num, 2, generator=g))
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)

    confused = torch.rand(*lead, num, generator=g) < 0.2
    labels = torch.where(confused, torch.randint(classes, (*lead, num), generator=g), obj_class.gather(-1, owner))
    return Detections(boxes=boxes, labels=labels)


def normalised_detections(num: int, *, seed: int = 0, classes: int = 80) -> tuple:
    """``clustered_detections`` scaled to [0, 1] (ensemble-boxes' coordinates) as float64 numpy-friendly tensors:
    (boxes [num, 4], scores [num], labels [num]). Boxes are clipped inside the image and keep a positive area, so
    ensemble-boxes' input preparation changes nothing."""
    det = clustered_detections(num, classes=classes, seed=seed)
    scale = torch.tensor([IMAGE_WIDTH, IMAGE_HEIGHT, IMAGE_WIDTH, IMAGE_HEIGHT])
    boxes = (det.boxes / scale).double().clamp(0.0, 1.0)
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1e-3).clamp(max=1.0)
    boxes[:, :2] = torch.minimum(boxes[:, :2], boxes[:, 2:] - 1e-3)
    return boxes, uniform_scores(num, seed=seed + 1).double(), det.labels


def ensemble_boxes():
    """The ``ensemble_boxes`` package, or a skip with the reason when it is missing."""
    try:
        return importlib.import_module("ensemble_boxes")
    except Exception as exc:
        pytest.skip(f"ensemble-boxes not importable ({type(exc).__name__}: {exc})")


def opencv():
    """OpenCV (``cv2``) with the contrib modules (``opencv-contrib-python-headless``), or a skip with the reason."""
    try:
        cv2 = importlib.import_module("cv2")
    except Exception as exc:
        pytest.skip(f"opencv-contrib-python-headless not importable ({type(exc).__name__}: {exc})")
    if not hasattr(cv2, "ximgproc"):
        pytest.skip("cv2 lacks the contrib module ximgproc: install opencv-contrib-python-headless")
    return cv2


def uniform_scores(shape, seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def class_scores(labels: torch.Tensor, classes: int, seed: int = 2) -> torch.Tensor:
    """Per-class scores ``[..., N, classes]`` as a sigmoid head produces them: the predicted class scores 0.02-0.95,
    every other class stays below 0.05 (so a 0.05 score threshold keeps about one candidate per box)."""
    g = torch.Generator().manual_seed(seed)
    scores = 0.05 * torch.rand(*labels.shape, classes, generator=g) ** 2
    top = torch.empty(*labels.shape, 1).uniform_(0.02, 0.95, generator=g)
    return scores.scatter_(-1, labels.unsqueeze(-1), top)


# --- implementations -----------------------------------------------------------------------------------------------


def torchvision_ops():
    """``torchvision.ops``, or a skip with the reason when torchvision cannot be imported."""
    try:
        return importlib.import_module("torchvision.ops")
    except Exception as exc:  # ImportError, or a RuntimeError/OSError from a torchvision built for another torch
        pytest.skip(f"torchvision not importable ({type(exc).__name__}: {exc})")


def implementation(op: str, impl: str, case: Case, *, python_loop_reference: bool = False):
    """The callable of ``impl`` for ``op``, or a skip that says why it cannot be timed.

    ``python_loop_reference``: the reference is a Python loop (the NMS family), so it is timed only at the op's
    smallest size; larger sizes would make it dominate the run.
    """
    if impl == "fastdet":
        if case.device == "cuda" and not _extension.WITH_CUDA:
            pytest.skip("fastdet._C was built without CUDA kernels (FASTDET_CUDA=0 or no nvcc at build time)")
        return getattr(fastdet.ops, op)
    if impl == "torchvision":
        return getattr(torchvision_ops(), op)
    if impl == "reference":
        try:
            reference = importlib.import_module("fastdet.ops.reference")
        except Exception as exc:
            pytest.skip(f"fastdet.ops.reference not importable ({type(exc).__name__}: {exc})")
        fn = getattr(reference, op, None)
        if fn is None:
            pytest.skip(f"fastdet.ops.reference.{op} not available")
        if python_loop_reference and not case.smallest:
            pytest.skip(f"fastdet.ops.reference.{op} is a slow Python loop: timed only at the smallest size")
        return fn
    raise ValueError(f"unknown implementation {impl!r}")


# --- machine description -------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    # The cores this process may use, which on a shared machine can be fewer than the host has.
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_name(device: str) -> str:
    """What RESULTS.md titles a device's section with; one section per distinct name."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {cpu_cores()} cores"


# Other processes competing for the cores slow multi-threaded kernels most, so record how busy the machine was when
# the run began (this module is imported while pytest starts; machine_info is only written at the end).
LOAD_AVERAGE_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment() -> dict:
    """Versions and hardware, stored in the JSON's machine_info so a results table can say what it measured."""
    try:
        import torchvision

        torchvision_version = torchvision.__version__
    except Exception:
        torchvision_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "torch": torch.__version__,
        "torchvision": torchvision_version,
        "cuda": torch.version.cuda,
        "gpu": gpu,
        "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability())) if gpu else None,
        "cpu": device_name("cpu"),
        "torch_threads": torch.get_num_threads(),
        "load_average": LOAD_AVERAGE_AT_START,
        "fastdet_cuda_kernels": _extension.WITH_CUDA,
    }


# --- timing --------------------------------------------------------------------------------------------------------

WARMUP_CALLS = 3  # untimed calls before timing; fewer when one call is slow (WARMUP_SECONDS)
WARMUP_SECONDS = 1.0
MAX_ROUNDS = 1000  # enough for a stable median of a microsecond-scale op
SLOW_BUDGET_SECONDS = 5.0  # timed seconds beyond which a slow call gets fewer rounds (at least 3; 1 for the reference)


def _synchronised(fn):
    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


class Runner:
    """Times a zero-argument callable for one benchmark, the same way for every op and implementation.

    Inputs are created by the caller before this runs, so they are never timed. On CUDA the timed callable ends with
    ``torch.cuda.synchronize()``, so a round covers the kernels it launched and not just their launch. Warm-up calls
    precede timing. The number of rounds follows pytest-benchmark's ``--benchmark-max-time`` and
    ``--benchmark-min-rounds`` from the warm-up's duration, within the limits above, so that slow baselines cannot
    stretch a CPU run to hours; pytest-benchmark's own calibration is not used because it would repeat them.
    """

    def __init__(self, benchmark, config):
        self.benchmark = benchmark
        self.max_time = float(config.getoption("benchmark_max_time", 1.0))
        self.min_rounds = int(config.getoption("benchmark_min_rounds", 5))

    def __call__(self, fn, *, op: str, case: Case, impl: str, bytes_moved: int | None = None, **info):
        benchmark = self.benchmark
        benchmark.group = f"{op} {case.label} {case.device}"
        benchmark.extra_info.update(
            op=op,
            impl=impl,
            device=case.device,
            device_name=device_name(case.device),
            size=case.label,
            full_size=case.full_label,
            params=dict(case.params),
            full_params=dict(case.full),
            **info,
        )
        if bytes_moved is not None:
            benchmark.extra_info["bytes"] = int(bytes_moved)

        target = _synchronised(fn) if case.device == "cuda" else fn
        if benchmark.disabled:
            # Smoke mode (--benchmark-disable): pytest-benchmark runs the body once, untimed.
            return self._first_call(lambda: benchmark.pedantic(target), op, case, impl)
        seconds = self._first_call(lambda: self._warm_up(target), op, case, impl)
        if case.device == "cuda":
            torch.cuda.synchronize()
        return benchmark.pedantic(target, rounds=self._rounds(seconds, impl), iterations=1)

    @staticmethod
    def _first_call(call, op, case, impl):
        try:
            return call()
        except NotImplementedError as exc:
            # The dispatcher's answer when an op has no kernel for this device: a skip that names it, not a failure
            # (fastdet's NMS family has CPU kernels only so far). A missing CPU kernel is a real error.
            if impl == "fastdet" and case.device != "cpu":
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                pytest.skip(f"fastdet.ops.{op} has no {case.device} kernel yet ({first_line[:200]})")
            raise

    @staticmethod
    def _warm_up(target) -> float:
        """Untimed calls: the first pays for lazy initialisation (CUDA context, kernel loading, allocator growth,
        thread pools), so it is at most one of several. Returns the fastest call, which sets the number of rounds."""
        start = time.perf_counter()
        fastest = math.inf
        for calls in range(1, WARMUP_CALLS + 1):
            began = time.perf_counter()
            target()
            fastest = min(fastest, time.perf_counter() - began)
            # Stop early only once the time is spent and a second call had the chance to show the steady state; a
            # call slower than the whole warm-up budget (the reference NMS) is not repeated.
            elapsed = time.perf_counter() - start
            if elapsed > WARMUP_SECONDS and (calls >= 2 or fastest > WARMUP_SECONDS):
                break
        return fastest

    def _rounds(self, seconds: float, impl: str) -> int:
        seconds = max(seconds, 1e-7)
        rounds = max(self.min_rounds, math.ceil(self.max_time / seconds))
        floor = 1 if impl == "reference" else 3
        return int(min(rounds, max(floor, int(SLOW_BUDGET_SECONDS / seconds)), MAX_ROUNDS))
