"""SSD's VGG-16 feature extractor (torchvision's module and state-dict names), optionally narrowed by a width
factor, with the ImageNet-checkpoint loader and stage freezing its builders use."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet.models.layers import xavier_init

__all__ = ["VGG16SSDFeatures", "freeze_vgg_stages", "load_vgg16_features"]


def _vgg16_layers(width: float) -> list[nn.Module]:
    """VGG-16's convolutional part (13 3x3 convs + ReLU, 5 max pools), channels scaled by ``width``. Indices match
    torchvision's ``vgg16().features`` (conv1_1 is 0, the pools are 4, 9, 16, 23, 30)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for stage, (channels, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        out_channels = _scaled(channels, width)
        for _ in range(convs):
            conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(conv.bias, 0)
            layers += [conv, nn.ReLU(inplace=True)]
            in_channels = out_channels
        # SSD rounds the third pool up (75 -> 38 at 300 px) to get the paper's 38x38 conv4_3 map.
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=stage == 2))
    return layers


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class VGG16SSDFeatures(nn.Module):
    """SSD300's VGG-16 feature extractor with torchvision's module names (``features``, ``scale_weight``,
    ``extra.{0..4}``), so ``backbone.*`` keys of a torchvision ``ssd300_vgg16`` state dict load unchanged.

    Outputs six maps (38, 19, 10, 5, 3, 1 at 300 px): conv4_3 L2-normalised per location and rescaled by the learned
    ``scale_weight`` (initially 20), fc7 (dilated fc6 + 1x1 fc7 after a 3x3/1 pool5), and conv8_2 ... conv11_2.

    Args:
        width (float): channel multiplier (1.0 = VGG-16; e.g. 0.125 for a light model that trains on a CPU).
    """

    def __init__(self, width: float = 1.0):
        super().__init__()
        if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
            raise ValueError(f"width must be a positive number, got {width!r}")
        w = lambda c: _scaled(c, width)  # noqa: E731
        layers = _vgg16_layers(width)
        self.scale_weight = nn.Parameter(torch.ones(w(512)) * 20)
        self.features = nn.Sequential(*layers[:23])  # conv1_1 .. conv4_3 + ReLU
        fc = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=False),  # pool5, resolution kept
            nn.Conv2d(w(512), w(1024), kernel_size=3, padding=6, dilation=6),  # fc6, atrous
            nn.ReLU(inplace=True),
            nn.Conv2d(w(1024), w(1024), kernel_size=1),  # fc7
            nn.ReLU(inplace=True),
        )
        xavier_init(fc)

        def extra_block(in_c: int, mid_c: int, out_c: int, **conv_kwargs) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(in_c, mid_c, kernel_size=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(mid_c, out_c, kernel_size=3, **conv_kwargs), nn.ReLU(inplace=True))

        extra = nn.ModuleList([
            extra_block(w(1024), w(256), w(512), padding=1, stride=2),  # conv8_2
            extra_block(w(512), w(128), w(256), padding=1, stride=2),  # conv9_2
            extra_block(w(256), w(128), w(256)),  # conv10_2
            extra_block(w(256), w(128), w(256)),  # conv11_2
        ])
        xavier_init(extra)
        # pool4 .. conv5_3 (+ ReLU), then pool5/fc6/fc7: torchvision keeps them together as extra.0.
        extra.insert(0, nn.Sequential(*layers[23:30], fc))
        self.extra = extra
        self.out_channels = [w(512), w(1024), w(512), w(256), w(256), w(256)]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.features(x)
        outputs = [self.scale_weight.view(1, -1, 1, 1) * F.normalize(x)]
        for block in self.extra:
            x = block(x)
            outputs.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(outputs))


def freeze_vgg_stages(backbone: VGG16SSDFeatures, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` of VGG's five stages (torchvision's rule: the stages start at
    layer 0 and at each of the first four pools; stage 5's convolutions live in ``extra.0``, which always trains)."""
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be an int in [0, 5], got {trainable_layers!r}")
    stage_starts = [0, 4, 9, 16, 23]
    freeze_before = 30 if trainable_layers == 0 else stage_starts[5 - trainable_layers]
    # VGG layers 0-22 are features.0-22; layers 23-29 (pool4, conv5_x) are extra.0.0-6.
    vgg_layers = list(backbone.features) + list(backbone.extra[0])[:7]
    for layer in vgg_layers[:freeze_before]:
        for parameter in layer.parameters():
            parameter.requires_grad_(False)


def load_vgg16_features(backbone: VGG16SSDFeatures, state_dict) -> None:
    """Load torchvision ``vgg16`` weights (``features.{i}.*``; the classifier's entries are ignored) into the VGG
    layers of ``backbone``: layers 0-22 are ``features``, 23-29 (pool4, conv5_x) are ``extra.0.0``-``extra.0.6``."""
    mapped = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue
        index = int(parts[1])
        target = f"features.{index}" if index < 23 else f"extra.0.{index - 23}"
        mapped[".".join([target, *parts[2:]])] = value
    expected = {k for k in backbone.state_dict() if k.startswith("features.") or
                (k.startswith("extra.0.") and int(k.split(".")[2]) < 7)}
    if set(mapped) != expected:
        raise ValueError(f"weights_backbone is not a VGG-16 state dict of this width: missing "
                         f"{sorted(expected - set(mapped))[:4]}, unexpected {sorted(set(mapped) - expected)[:4]}")
    backbone.load_state_dict(mapped, strict=False)
