"""Model speed: inference throughput and FLOPs per image."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

__all__ = ["count_flops", "measure_fps"]


def _image_size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (not isinstance(image_size, Sequence) or len(image_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward(model, images: torch.Tensor, as_list: bool):
    return model(list(images.unbind(0)) if as_list else images)


def measure_fps(
    model: torch.nn.Module,
    batch_size: int = 1,
    image_size=(640, 640),
    device="cpu",
    warmup: int = 5,
    iters: int = 20,
    amp: bool = False,
    input_as_list: bool = True,
    channels: int = 3,
) -> float:
    """Inference throughput in images per second.

    Runs ``model`` in eval mode under ``torch.inference_mode`` on random images of ``image_size`` (int or
    ``(height, width)``), ``warmup`` untimed iterations then ``iters`` timed ones; CUDA is synchronised before the
    clock starts and before it stops, so queued kernels are counted. ``input_as_list`` passes a list of ``[C, H, W]``
    tensors (fastdet's detector contract); ``False`` passes one ``[B, C, H, W]`` batch (plain backbones). ``amp`` runs
    under bfloat16 autocast. The model's training flag is restored afterwards."""
    batch_size = _positive_int(batch_size, "batch_size")
    warmup = _positive_int(warmup, "warmup", minimum=0)
    iters = _positive_int(iters, "iters")
    height, width = _image_size(image_size)
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, channels, height, width, generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for _ in range(warmup):
                _forward(model, images, input_as_list)
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                _forward(model, images, input_as_list)
            _synchronize(device)
            elapsed = time.perf_counter() - start
    finally:
        model.train(was_training)
    return batch_size * iters / max(elapsed, 1e-12)


def count_flops(model: torch.nn.Module, image_size=(640, 640), device="cpu", input_as_list: bool = True,
                channels: int = 3) -> int:
    """Floating-point operations of one eval-mode forward pass on one image of ``image_size``, counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add counts as 2 FLOPs; only the matrix-multiply and
    convolution family is counted, so element-wise work and custom ops such as NMS add nothing).
    ``input_as_list`` as in :func:`measure_fps`."""
    from torch.utils.flop_counter import FlopCounterMode

    height, width = _image_size(image_size)
    device = torch.device(device)
    image = torch.rand(1, channels, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            _forward(model, image, input_as_list)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
