"""Whole detectors (issue 6): fastdet.models against torchvision's same architecture with the same weights.

Faster R-CNN R50-FPN: inference (eval mode, ``model(images)`` under ``no_grad``) and a training step (losses for the
images and targets, their sum, backward, one SGD step). RetinaNet R50-FPN and SSD300-VGG16: inference. Issue 6's size
is a batch of 8 images of 800 x 1333 (SSD: 32 of 300 x 300) on the GPU; the CPU sizes are scaled down (``SIZES`` in
``benchmarks/common.py``). Images are passed at exactly the size the model's transform asks for (``min_size`` =
height, ``max_size`` = width), so the resize keeps them as they are.

Weights. No pretrained checkpoint can be downloaded here, and a randomly initialised ResNet with frozen batch norm
(identity statistics, as torchvision builds it for fine-tuning) blows its activations up with depth: the classifier
loss starts near 20 and the first SGD step diverges. So the torchvision model's frozen batch-norm statistics are set
from its own activations on the benchmark images (``calibrate_frozen_batch_norm``), which gives the well-scaled
features of a trained backbone, and the resulting state dict is loaded, unchanged, into both implementations before
every benchmark. The classifiers are changed where their initialisation would leave post-processing idle: Faster
R-CNN's box classifier gets wider weights and RetinaNet's classification bias moves off its 0.01 prior, so that, as
with a trained model, many candidates pass the score thresholds and every image gets a full set of detections.

Training. Each implementation starts from those weights with a fresh SGD optimiser (momentum 0.9 and weight decay
1e-4 as in torchvision's recipe, a warm-up learning rate of 1e-4) and repeats the step on the same batch; the global
seed is reset at the start of every step, so the RPN and RoI samplers draw the same random numbers in each call.
(fastdet's samplers draw differently from torchvision's, so the two pick different but equally many RoIs.) The weights
drift by a few steps over a benchmark, the same for both implementations; the final loss is checked to be finite, so a
diverging model cannot be timed unnoticed.

CPU cases run with one intra-op thread (``CPU_THREADS``) and say so in their size label.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os

import pytest
import torch

import fastdet.models
from benchmarks.common import Case, cases
from fastdet import _extension
from fastdet.models.retinanet import retinanet_resnet50_fpn
from fastdet.models.ssd import ssd300_vgg16

MODEL_IMPLEMENTATIONS = ("fastdet", "torchvision")
NUM_CLASSES = 91  # COCO's label space as torchvision's detection models use it (0 = background / unused)
SEED = 0
# Warm-up sized: torchvision's detection recipe starts at 0.02 x 0.001 and ramps up over 1000 iterations. Random weights
# under frozen batch norm have large backbone gradients (the frozen 1/sigma scales amplify them) and diverge within
# two steps at 0.01; at 1e-4 the losses stay finite and fall.
LEARNING_RATE = 1e-4
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
OBJECTS_PER_IMAGE = (2, 12)  # targets per training image, drawn uniformly (COCO averages about 7)


def _cpu_threads() -> int:
    value = os.environ.get("FASTDET_BENCH_MODEL_THREADS", "1").strip()
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"FASTDET_BENCH_MODEL_THREADS must be a positive integer (threads), got {value!r}")
    return int(value)


# Intra-op threads for the CPU cases. On a machine whose cores other processes share, every convolution's OpenMP
# barrier waits for its slowest, descheduled thread: measured here, a ResNet-50 FPN forward on two 96 x 160 images
# took 0.25 s with one thread and 4.6 s with two. One thread measures the implementations, not the scheduler.
# FASTDET_BENCH_MODEL_THREADS sets another count (e.g. the core count on a dedicated machine).
CPU_THREADS = _cpu_threads()


@dataclasses.dataclass(frozen=True)
class ModelCase(Case):
    """A detector size: ``B=8 800x1333`` (batch, image height x width) in ids, groups and RESULTS.md; CPU sizes add
    the thread count (``B=1 320x512 1-thread``)."""

    @staticmethod
    def _describe(params: dict) -> str:
        return f"B={params['batch']} {params['height']}x{params['width']}"

    @property
    def label(self) -> str:
        threads = f" {CPU_THREADS}-thread" if self.device == "cpu" else ""
        return self._describe(self.params) + threads

    @property
    def full_label(self) -> str:
        return self._describe(self.full)


def model_cases(table_key: str) -> list:
    """``cases(table_key)`` with detector labels (the common labels know no image sizes)."""
    params = []
    for param in cases(table_key):
        case = ModelCase(**dataclasses.asdict(param.values[0]))
        params.append(pytest.param(case, id=case.id, marks=param.marks))
    return params


@pytest.fixture(autouse=True)
def cpu_threads(request):
    """``CPU_THREADS`` intra-op threads while a CPU case runs (set-up included); torch's own count is restored after."""
    case = request.node.callspec.params.get("case") if hasattr(request.node, "callspec") else None
    if case is None or case.device != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def torchvision_detection():
    """``torchvision.models.detection``, or a skip with the reason when torchvision cannot be imported."""
    try:
        return importlib.import_module("torchvision.models.detection")
    except Exception as exc:  # ImportError, or a RuntimeError/OSError from a torchvision built for another torch
        pytest.skip(f"torchvision not importable ({type(exc).__name__}: {exc})")


def skip_without_kernels(case: Case, impl: str) -> None:
    if impl == "fastdet" and case.device == "cuda" and not _extension.WITH_CUDA:
        pytest.skip("fastdet._C was built without CUDA kernels (FASTDET_CUDA=0 or no nvcc at build time)")


# --- inputs --------------------------------------------------------------------------------------------------------


def benchmark_images(batch: int, height: int, width: int, device: str, seed: int = SEED) -> list:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, height, width, generator=g).to(device) for _ in range(batch)]


def benchmark_targets(batch: int, height: int, width: int, device: str, seed: int = SEED + 1) -> list:
    """Per image a few boxes inside the image, sides 4%-60% of its shorter side (log-uniform), random classes."""
    g = torch.Generator().manual_seed(seed)
    targets = []
    shorter = min(height, width)
    for _ in range(batch):  # set-up only, never timed
        count = int(torch.randint(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1, (), generator=g))
        sides = torch.empty(count, 2).uniform_(math.log(0.04 * shorter), math.log(0.6 * shorter), generator=g).exp()
        corner = torch.rand(count, 2, generator=g) * (torch.tensor([width, height]) - sides)
        boxes = torch.cat([corner, corner + sides], dim=1)
        labels = torch.randint(1, NUM_CLASSES, (count,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return targets


# --- models --------------------------------------------------------------------------------------------------------


def calibrate_frozen_batch_norm(model: torch.nn.Module, images: list) -> None:
    """Give every frozen batch norm of ``model`` the per-channel mean and variance of its own input on ``images``.

    Pre-hooks run in forward order, so each layer is calibrated on the output of already calibrated layers: one eval
    forward normalises the whole backbone, as training would have (the affine weight and bias stay 1 and 0)."""
    frozen = importlib.import_module("torchvision.ops.misc").FrozenBatchNorm2d

    def use_input_statistics(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    hooks = [m.register_forward_pre_hook(use_input_statistics) for m in model.modules() if isinstance(m, frozen)]
    if not hooks:
        raise ValueError("model has no torchvision FrozenBatchNorm2d layers to calibrate")
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()


def _faster_rcnn_kwargs(params: dict) -> dict:
    kwargs = {"min_size": params["height"], "max_size": params["width"]}
    if "proposals" in params:  # smoke runs only: fewer proposals and sampled RoIs (the box head's cost is per RoI)
        n = params["proposals"]
        kwargs.update(rpn_pre_nms_top_n_train=4 * n, rpn_pre_nms_top_n_test=4 * n, rpn_post_nms_top_n_train=n,
                      rpn_post_nms_top_n_test=n, box_batch_size_per_image=n)
    return kwargs


def _torchvision_faster_rcnn(params: dict):
    detection = torchvision_detection()
    backbone = detection.backbone_utils.resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    return detection.FasterRCNN(backbone, num_classes=NUM_CLASSES, **_faster_rcnn_kwargs(params))


def _fastdet_faster_rcnn(params: dict):
    # torchvision's pretrained layout (frozen batch norm, 3 trainable stages), as the torchvision side above.
    return fastdet.models.fasterrcnn_resnet50_fpn(num_classes=NUM_CLASSES, norm_layer="FrozenBatchNorm2d",
                                                  trainable_backbone_layers=3, **_faster_rcnn_kwargs(params))


def _confident_faster_rcnn_classifier(model) -> None:
    # At its default initialisation (std ~0.018) the box classifier scores every class near 1/91, below the 0.05
    # threshold: no detections and no post-processing work. Wider weights give peaked softmaxes, and each image the
    # full 100 detections of a trained model.
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED + 2)
        weight = model.roi_heads.box_predictor.cls_score.weight
        weight.copy_(torch.randn(weight.shape, generator=g) * 0.1)


def _torchvision_retinanet(params: dict):
    detection = torchvision_detection()
    p6p7 = importlib.import_module("torchvision.ops.feature_pyramid_network").LastLevelP6P7(256, 256)
    backbone = detection.backbone_utils.resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3,
                                                            returned_layers=[2, 3, 4], extra_blocks=p6p7)
    return detection.RetinaNet(backbone, num_classes=NUM_CLASSES, min_size=params["height"], max_size=params["width"])


def _fastdet_retinanet(params: dict):
    return retinanet_resnet50_fpn(num_classes=NUM_CLASSES, norm_layer="FrozenBatchNorm2d", trainable_backbone_layers=3,
                                  min_size=params["height"], max_size=params["width"])


def _spread_retinanet_scores(model) -> None:
    # The 0.01 prior puts every sigmoid score below the 0.05 threshold, leaving post-processing nothing to do; a
    # bias around sigmoid^-1(0.03) with some spread lets a few percent of the pairs through, as a trained model does.
    with torch.no_grad():
        g = torch.Generator().manual_seed(SEED + 3)
        bias = model.head.classification_head.cls_logits.bias
        bias.copy_(torch.empty(bias.shape).normal_(-3.5, 0.5, generator=g))


def _torchvision_ssd(params: dict):
    return torchvision_detection().ssd300_vgg16(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)


def _fastdet_ssd(params: dict):
    return ssd300_vgg16(num_classes=NUM_CLASSES, weights_backbone=None)


@dataclasses.dataclass(frozen=True)
class Family:
    build: dict  # impl -> params -> model
    frozen_batch_norm: bool  # calibrate the torchvision model's frozen batch norm (ResNet backbones)
    adjust: object = None  # weights change applied to the torchvision model before its state dict is shared


FAMILIES = {
    "faster_rcnn": Family({"fastdet": _fastdet_faster_rcnn, "torchvision": _torchvision_faster_rcnn}, True,
                          _confident_faster_rcnn_classifier),
    "retinanet": Family({"fastdet": _fastdet_retinanet, "torchvision": _torchvision_retinanet}, True,
                        _spread_retinanet_scores),
    "ssd": Family({"fastdet": _fastdet_ssd, "torchvision": _torchvision_ssd}, False),
}


@dataclasses.dataclass
class Setup:
    images: list
    targets: list
    weights: dict  # the shared state dict (torchvision's keys), loaded into a model before each benchmark
    models: dict  # impl -> model on the case's device


@functools.lru_cache(maxsize=None)
def _setup(family_key: str, device: str, params_items: tuple) -> Setup:
    params = dict(params_items)
    family = FAMILIES[family_key]
    shape = (params["batch"], params["height"], params["width"], device)
    images, targets = benchmark_images(*shape), benchmark_targets(*shape)
    torch.manual_seed(SEED)
    reference = family.build["torchvision"](params).to(device)
    if family.frozen_batch_norm:
        calibrate_frozen_batch_norm(reference, images[:2])
    if family.adjust is not None:
        family.adjust(reference)
    weights = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    ours = family.build["fastdet"](params).to(device)
    ours.load_state_dict(weights)  # strict: the same architecture, key for key
    return Setup(images, targets, weights, {"torchvision": reference, "fastdet": ours})


# Smoke runs (--benchmark-disable, as CI runs the benchmarks) call each body once to show that it works; a ResNet-50
# detector at even the CPU sizes takes several seconds a call on a busy 2-core machine, so they use these small inputs
# instead, and Faster R-CNN keeps 64 proposals per image (its box head costs the same per RoI at any image size).
# SSD resizes every image to 300 x 300 whatever its size.
SMOKE_PARAMS = {
    "faster_rcnn": {"batch": 2, "height": 96, "width": 160, "proposals": 64},
    "retinanet": {"batch": 2, "height": 96, "width": 160},
    "ssd": {"batch": 1, "height": 96, "width": 96},
}


def prepared_model(bench, family_key: str, case: Case, impl: str):
    """``(model, setup, case)``: ``impl``'s model with the shared weights loaded afresh (a previous training benchmark
    may have moved them), and the case to time (the smoke size under ``--benchmark-disable``)."""
    skip_without_kernels(case, impl)
    if bench.benchmark.disabled and case.device == "cpu":
        case = dataclasses.replace(case, params=dict(SMOKE_PARAMS[family_key]))
    setup = _setup(family_key, case.device, tuple(sorted(case.params.items())))
    model = setup.models[impl]
    model.load_state_dict(setup.weights)
    return model, setup, case


# --- benchmarks ----------------------------------------------------------------------------------------------------


def inference(model, images):
    model.eval()

    def detect():
        with torch.no_grad():
            return model(images)

    return detect


def training_step(model, images, targets):
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)

    def step():
        # The same random draws for the RPN and RoI samplers in every call (torch.manual_seed reseeds CUDA as well,
        # without synchronising).
        torch.manual_seed(SEED)
        losses = model(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        return total.detach()

    return step


def check_detections(detections, case: Case) -> None:
    assert len(detections) == case.params["batch"]
    assert all(set(d) == {"boxes", "labels", "scores"} for d in detections)
    assert sum(len(d["scores"]) for d in detections) > 0, "no detections: post-processing was not exercised"


INFERENCE = {
    "faster_rcnn": "faster_rcnn_r50_fpn inference",
    "retinanet": "retinanet_r50_fpn inference",
    "ssd": "ssd300_vgg16 inference",
}


@pytest.mark.parametrize("impl", MODEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", model_cases("faster_rcnn"))
def test_faster_rcnn_inference(bench, case, impl):
    model, setup, case = prepared_model(bench, "faster_rcnn", case, impl)
    detections = bench(inference(model, setup.images), op=INFERENCE["faster_rcnn"], case=case, impl=impl)
    check_detections(detections, case)


@pytest.mark.parametrize("impl", MODEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", model_cases("faster_rcnn"))
def test_faster_rcnn_train_step(bench, case, impl):
    model, setup, case = prepared_model(bench, "faster_rcnn", case, impl)
    try:
        last_loss = bench(training_step(model, setup.images, setup.targets), op="faster_rcnn_r50_fpn train step",
                          case=case, impl=impl, optimizer=f"SGD lr={LEARNING_RATE} momentum={MOMENTUM}")
    finally:
        model.load_state_dict(setup.weights)
        model.zero_grad(set_to_none=True)
    assert torch.isfinite(last_loss), f"the training loss diverged ({last_loss.item()})"


@pytest.mark.parametrize("impl", MODEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", model_cases("retinanet"))
def test_retinanet_inference(bench, case, impl):
    model, setup, case = prepared_model(bench, "retinanet", case, impl)
    detections = bench(inference(model, setup.images), op=INFERENCE["retinanet"], case=case, impl=impl)
    check_detections(detections, case)


@pytest.mark.parametrize("impl", MODEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("case", model_cases("ssd"))
def test_ssd_inference(bench, case, impl):
    model, setup, case = prepared_model(bench, "ssd", case, impl)
    detections = bench(inference(model, setup.images), op=INFERENCE["ssd"], case=case, impl=impl)
    check_detections(detections, case)
