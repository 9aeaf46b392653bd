"""MobileNetV3-Large (Howard et al. 2019) with torchvision's module and state-dict names, and the two ways
torchvision's detectors cut it into a backbone: an FPN on its last two stages (Faster R-CNN) and SSDlite's feature
extractor (split at C4's expansion, plus four depthwise extra blocks).

Naming contract: ``features.{i}``: ``features.0`` is the stem conv block, ``features.1``-``features.15`` the inverted
residual blocks (``block.{j}`` = expand / depthwise / squeeze-excitation (``fc1``, ``fc2``) / project, each conv block
``{conv}.0`` + ``{norm}.1``), ``features.16`` the last 1x1 conv block; ``classifier.0`` and ``classifier.3`` the two
linear layers. torchvision's ImageNet checkpoints load into :class:`MobileNetV3` unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastdet.models.layers import classifier_init, conv_norm_activation, normal_init
from fastdet.models.necks.fpn import BackboneWithFPN, LastLevelMaxPool

__all__ = [
    "InvertedResidual",
    "MobileNetV3",
    "SSDLiteFeatureExtractor",
    "SqueezeExcitation",
    "freeze_mobilenet_stages",
    "mobilenet_fpn_backbone",
    "mobilenet_v3_large",
]


def make_divisible(value: float, divisor: int = 8) -> int:
    """The nearest multiple of ``divisor`` (at least ``divisor``) not more than 10 % below ``value`` (MobileNet's
    channel rounding)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded



def _normal_linear_init(linear: nn.Linear) -> None:
    nn.init.normal_(linear.weight, 0, 0.01)  # torchvision's MobileNetV3 classifier
    nn.init.zeros_(linear.bias)

class BlockConfig(NamedTuple):
    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    use_hardswish: bool
    stride: int
    dilation: int


class SqueezeExcitation(nn.Module):
    """Channel attention: global average -> 1x1 ``fc1`` -> ReLU -> 1x1 ``fc2`` -> hard sigmoid, times the input."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidual(nn.Module):
    """1x1 expansion (skipped when it would not change the width), depthwise kxk (strided unless dilated),
    optional squeeze-excitation, linear 1x1 projection; residual when the shape is kept."""

    def __init__(self, cfg: BlockConfig, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        activation = nn.Hardswish if cfg.use_hardswish else nn.ReLU
        layers: list[nn.Module] = []
        if cfg.expanded_channels != cfg.input_channels:
            layers.append(conv_norm_activation(cfg.input_channels, cfg.expanded_channels, 1, norm_layer=norm_layer,
                                               activation_layer=activation))
        stride = 1 if cfg.dilation > 1 else cfg.stride
        layers.append(conv_norm_activation(cfg.expanded_channels, cfg.expanded_channels, cfg.kernel, stride,
                                           groups=cfg.expanded_channels, norm_layer=norm_layer,
                                           activation_layer=activation, dilation=cfg.dilation))
        if cfg.use_se:
            layers.append(SqueezeExcitation(cfg.expanded_channels, make_divisible(cfg.expanded_channels // 4)))
        layers.append(conv_norm_activation(cfg.expanded_channels, cfg.out_channels, 1, norm_layer=norm_layer,
                                           activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cfg.out_channels
        self.use_res_connect = cfg.stride == 1 and cfg.input_channels == cfg.out_channels
        self.is_strided = cfg.stride > 1  # starts a new stage (torchvision's _is_cn)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


def _large_config(width_mult: float, reduced_tail: bool, dilated: bool) -> tuple[list[BlockConfig], int]:
    divide = 2 if reduced_tail else 1
    dilation = 2 if dilated else 1
    # (input, kernel, expanded, output, SE, hard-swish, stride, dilation): the paper's Table 1
    rows = [
        (16, 3, 16, 16, False, False, 1, 1),
        (16, 3, 64, 24, False, False, 2, 1),
        (24, 3, 72, 24, False, False, 1, 1),
        (24, 5, 72, 40, True, False, 2, 1),
        (40, 5, 120, 40, True, False, 1, 1),
        (40, 5, 120, 40, True, False, 1, 1),
        (40, 3, 240, 80, False, True, 2, 1),
        (80, 3, 200, 80, False, True, 1, 1),
        (80, 3, 184, 80, False, True, 1, 1),
        (80, 3, 184, 80, False, True, 1, 1),
        (80, 3, 480, 112, True, True, 1, 1),
        (112, 3, 672, 112, True, True, 1, 1),
        (112, 5, 672, 160 // divide, True, True, 2, dilation),
        (160 // divide, 5, 960 // divide, 160 // divide, True, True, 1, dilation),
        (160 // divide, 5, 960 // divide, 160 // divide, True, True, 1, dilation),
    ]
    scale = lambda c: make_divisible(c * width_mult)  # noqa: E731
    configs = [BlockConfig(scale(i), k, scale(e), scale(o), se, hs, s, d) for i, k, e, o, se, hs, s, d in rows]
    return configs, scale(1280 // divide)


class MobileNetV3(nn.Module):
    """MobileNetV3 classifier with torchvision's layout (see the module docstring)."""

    def __init__(self, configs: list[BlockConfig], last_channel: int, num_classes: int = 1000,
                 norm_layer: Callable[[int], nn.Module] | None = None, dropout: float = 0.2):
        super().__init__()
        if norm_layer is None:
            norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
        layers: list[nn.Module] = [conv_norm_activation(3, configs[0].input_channels, 3, 2, norm_layer=norm_layer,
                                                        activation_layer=nn.Hardswish)]
        layers += [InvertedResidual(cfg, norm_layer) for cfg in configs]
        last_in = configs[-1].out_channels
        layers.append(conv_norm_activation(last_in, 6 * last_in, 1, norm_layer=norm_layer,
                                           activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channel, num_classes))
        classifier_init(self, _normal_linear_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v3_large(norm_layer: Callable[[int], nn.Module] | None = None, width_mult: float = 1.0,
                       reduced_tail: bool = False, dilated: bool = False, num_classes: int = 1000) -> MobileNetV3:
    """A randomly initialised MobileNetV3-Large (torchvision's ``mobilenet_v3_large`` layout and initialisation);
    ``reduced_tail`` halves the last stage's channels, ``dilated`` replaces its stride by dilation."""
    configs, last_channel = _large_config(width_mult, reduced_tail, dilated)
    return MobileNetV3(configs, last_channel, num_classes, norm_layer)


def _stage_indices(features: nn.Sequential) -> list[int]:
    # The stem, every block that starts a stage (strided), and the last block: torchvision's stage boundaries.
    return [0] + [i for i, b in enumerate(features) if getattr(b, "is_strided", False)] + [len(features) - 1]


def freeze_mobilenet_stages(features: nn.Sequential, trainable_layers: int) -> list[int]:
    """Freeze all but the last ``trainable_layers`` stages of ``features`` (torchvision's rule; 0 freezes all);
    returns the stage start indices."""
    stages = _stage_indices(features)
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or \
            not 0 <= trainable_layers <= len(stages):
        raise ValueError(f"trainable_backbone_layers must be an int in [0, {len(stages)}], got {trainable_layers!r}")
    freeze_before = len(features) if trainable_layers == 0 else stages[len(stages) - trainable_layers]
    for block in list(features)[:freeze_before]:
        block.requires_grad_(False)
    return stages


def mobilenet_fpn_backbone(network: MobileNetV3, trainable_layers: int, out_channels: int = 256) -> BackboneWithFPN:
    """torchvision's ``_mobilenet_extractor(fpn=True)``: an FPN (plus max-pool level) on the last two stages of
    ``network.features`` (keys ``body.{i}``)."""
    features = network.features
    stages = freeze_mobilenet_stages(features, trainable_layers)
    returned = stages[-2:]
    return BackboneWithFPN(features, {str(i): str(k) for k, i in enumerate(returned)},
                           [_out_channels(features[i]) for i in returned], out_channels, LastLevelMaxPool())


def _out_channels(block: nn.Module) -> int:
    # An InvertedResidual records its width; the stem and the last block are conv-norm-activation Sequentials.
    return block.out_channels if isinstance(block, InvertedResidual) else block[0].out_channels


class SSDLiteFeatureExtractor(nn.Module):
    """SSDlite's MobileNetV3 feature maps (torchvision's ``SSDLiteFeatureExtractorMobileNet``): ``features.0`` runs
    up to C4's expansion layer (output 1, stride 16), ``features.1`` the rest of the network (output 2, stride 32),
    and four ``extra`` blocks (1x1, depthwise 3x3/2, 1x1, ReLU6) halve the resolution four more times."""

    def __init__(self, features: nn.Sequential, c4_pos: int, norm_layer: Callable[[int], nn.Module],
                 width_mult: float = 1.0, min_depth: int = 16):
        super().__init__()
        c4 = features[c4_pos]
        if c4.use_res_connect:
            raise ValueError("the C4 block must not be residual")
        self.features = nn.Sequential(nn.Sequential(*features[:c4_pos], c4.block[0]),
                                      nn.Sequential(c4.block[1:], *features[c4_pos + 1:]))
        depth = lambda d: max(min_depth, int(d * width_mult))  # noqa: E731
        last = _out_channels(features[-1])

        def extra_block(in_channels: int, out_channels: int) -> nn.Sequential:
            mid = out_channels // 2
            return nn.Sequential(
                conv_norm_activation(in_channels, mid, 1, norm_layer=norm_layer, activation_layer=nn.ReLU6),
                conv_norm_activation(mid, mid, 3, 2, groups=mid, norm_layer=norm_layer, activation_layer=nn.ReLU6),
                conv_norm_activation(mid, out_channels, 1, norm_layer=norm_layer, activation_layer=nn.ReLU6))

        self.extra = nn.ModuleList([extra_block(last, depth(512)), extra_block(depth(512), depth(256)),
                                    extra_block(depth(256), depth(256)), extra_block(depth(256), depth(128))])
        normal_init(self.extra)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        outputs = []
        for block in self.features:
            x = block(x)
            outputs.append(x)
        for block in self.extra:
            x = block(x)
            outputs.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(outputs))
