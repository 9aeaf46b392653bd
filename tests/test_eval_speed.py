"""fastdet.eval speed: FLOPs of known layers equal the formula; FPS is measured and the model state restored."""

from __future__ import annotations

import math

import pytest
import torch

from fastdet.eval import count_flops, measure_fps


def test_conv_flops_equal_the_formula():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=True)
    # one multiply-add (2 FLOPs) per output element per input channel per kernel tap; the bias is not counted
    expected = 2 * (8 * 16 * 20) * 3 * 3 * 3
    assert count_flops(conv, image_size=(16, 20), input_as_list=False) == expected


def test_flops_of_a_small_network():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10),
    )
    expected = 2 * (4 * 8 * 8) * 3 * 9 + 2 * (4 * 8 * 8) * 10
    assert count_flops(model, image_size=16, input_as_list=False) == expected


class _ListModel(torch.nn.Module):
    """Detector-style input: a list of [C, H, W] images."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)
        self.seen_training = None

    def forward(self, images):
        self.seen_training = self.training
        return [self.conv(image[None]) for image in images]


def test_measure_fps_list_input_restores_mode():
    model = _ListModel().train()
    fps = measure_fps(model, batch_size=2, image_size=(8, 8), device="cpu", warmup=1, iters=3)
    assert math.isfinite(fps) and fps > 0
    assert model.seen_training is False and model.training
    assert count_flops(model, image_size=(8, 8)) == 2 * 2 * 8 * 8 * 3


def test_bad_arguments():
    model = _ListModel()
    with pytest.raises(ValueError, match="image_size"):
        measure_fps(model, image_size=(8,))
    with pytest.raises(ValueError, match="batch_size"):
        measure_fps(model, batch_size=0, image_size=8)
    with pytest.raises(ValueError, match="iters"):
        measure_fps(model, image_size=8, iters=0)
    with pytest.raises(ValueError, match="image_size"):
        count_flops(model, image_size=-3)
