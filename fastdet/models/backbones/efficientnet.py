"""EfficientNet-B0 ... B7 (Tan & Le 2019) with torchvision's module and state-dict names, and the C3-C5 feature
extractor EfficientDet puts its BiFPN on.

Naming contract (torchvision's ``efficientnet_b*``): ``features.0`` is the stem (3x3/2 conv block), ``features.1`` -
``features.7`` the seven MBConv stages (``features.{s}.{j}.block.{k}``: 1x1 expansion when the expansion ratio is not
1, depthwise kxk, squeeze-excitation (``fc1``, ``fc2``), linear 1x1 projection; each conv block ``{k}.0`` conv +
``{k}.1`` norm), ``features.8`` the last 1x1 conv block and ``classifier.1`` the linear layer. torchvision's ImageNet
checkpoints load into :class:`EfficientNet` unchanged; the library itself does not import torchvision.

Compound scaling: width multiplier on every stage's channels (rounded to multiples of 8), depth multiplier on every
stage's block count (rounded up). Stochastic depth (torchvision's ``"row"`` mode: a whole residual branch dropped per
sample) grows linearly with the block index up to 0.2.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastdet.models.layers import classifier_init, conv_norm_activation
from fastdet.models.backbones.mobilenet import SqueezeExcitation, make_divisible

__all__ = [
    "EFFICIENTNET_SCALING",
    "EfficientNet",
    "EfficientNetFeatures",
    "MBConv",
    "efficientnet",
    "efficientnet_features",
]

# (width multiplier, depth multiplier, classifier dropout) of B0-B7 (the EfficientNet paper / torchvision).
EFFICIENTNET_SCALING = {
    "b0": (1.0, 1.0, 0.2), "b1": (1.0, 1.1, 0.2), "b2": (1.1, 1.2, 0.3), "b3": (1.2, 1.4, 0.3),
    "b4": (1.4, 1.8, 0.4), "b5": (1.6, 2.2, 0.4), "b6": (1.8, 2.6, 0.5), "b7": (2.0, 3.1, 0.5),
}

# B0's stages: (expansion ratio, kernel, stride, input channels, output channels, blocks).
_B0_STAGES = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)

# The stages whose outputs are C3 (stride 8), C4 (stride 16) and C5 (stride 32): the last stage of each stride.
_PYRAMID_STAGES = (3, 5, 7)



def _uniform_linear_init(linear: nn.Linear) -> None:
    bound = 1.0 / math.sqrt(linear.out_features)  # torchvision's EfficientNet classifier
    nn.init.uniform_(linear.weight, -bound, bound)
    nn.init.zeros_(linear.bias)

class MBConvConfig(NamedTuple):
    expand_ratio: int
    kernel: int
    stride: int
    input_channels: int
    out_channels: int
    num_layers: int


def _scaled_stages(width_mult: float, depth_mult: float) -> list[MBConvConfig]:
    return [MBConvConfig(e, k, s, make_divisible(i * width_mult), make_divisible(o * width_mult),
                         int(math.ceil(n * depth_mult))) for e, k, s, i, o, n in _B0_STAGES]


class _SiLUSqueezeExcitation(SqueezeExcitation):
    """EfficientNet's squeeze-excitation: SiLU between the two 1x1 convs and a sigmoid gate (MobileNetV3's uses ReLU
    and a hard sigmoid); same module names."""

    def __init__(self, channels: int, squeeze_channels: int):
        super().__init__(channels, squeeze_channels)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()


class MBConv(nn.Module):
    """Mobile inverted bottleneck: 1x1 expansion (skipped for ratio 1), depthwise kxk (strided), squeeze-excitation
    to a quarter of the *input* width, linear 1x1 projection; residual with stochastic depth when the shape is kept."""

    def __init__(self, cfg: MBConvConfig, stochastic_depth_prob: float, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        expanded = make_divisible(cfg.input_channels * cfg.expand_ratio)
        layers: list[nn.Module] = []
        if expanded != cfg.input_channels:
            layers.append(conv_norm_activation(cfg.input_channels, expanded, 1, norm_layer=norm_layer,
                                               activation_layer=nn.SiLU))
        layers.append(conv_norm_activation(expanded, expanded, cfg.kernel, cfg.stride, groups=expanded,
                                           norm_layer=norm_layer, activation_layer=nn.SiLU))
        layers.append(_SiLUSqueezeExcitation(expanded, max(1, cfg.input_channels // 4)))
        layers.append(conv_norm_activation(expanded, cfg.out_channels, 1, norm_layer=norm_layer,
                                           activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = cfg.stride == 1 and cfg.input_channels == cfg.out_channels
        self.stochastic_depth_prob = float(stochastic_depth_prob)
        self.out_channels = cfg.out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        if not self.use_res_connect:
            return out
        p = self.stochastic_depth_prob
        if self.training and p > 0.0:
            # One Bernoulli draw per sample; survivors are rescaled so the expectation is unchanged.
            keep = torch.empty((out.shape[0], 1, 1, 1), dtype=out.dtype, device=out.device).bernoulli_(1.0 - p)
            out = out * keep.div_(1.0 - p)
        return out + x


def _default_norm_layer(variant: str) -> Callable[[int], nn.Module]:
    # torchvision's B5-B7 (ported from the TensorFlow checkpoints) use TensorFlow's batch-norm eps and momentum.
    if variant in ("b5", "b6", "b7"):
        return partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)
    return nn.BatchNorm2d


def _with_variant_eps(norm_layer: Callable[[int], nn.Module], variant: str) -> Callable[[int], nn.Module]:
    # A caller's norm class (e.g. FrozenBatchNorm2d for a pretrained backbone) keeps the checkpoint's eps.
    if variant in ("b5", "b6", "b7") and isinstance(norm_layer, type):
        if issubclass(norm_layer, nn.BatchNorm2d):
            return partial(norm_layer, eps=0.001, momentum=0.01)
        return partial(norm_layer, eps=0.001)
    return norm_layer


class EfficientNet(nn.Module):
    """EfficientNet classifier with torchvision's layout (see the module docstring)."""

    def __init__(self, variant: str = "b0", num_classes: int = 1000,
                 norm_layer: Callable[[int], nn.Module] | None = None, stochastic_depth_prob: float = 0.2):
        super().__init__()
        if variant not in EFFICIENTNET_SCALING:
            raise ValueError(f"variant must be one of {sorted(EFFICIENTNET_SCALING)}, got {variant!r}")
        if not 0.0 <= stochastic_depth_prob < 1.0:
            raise ValueError(f"stochastic_depth_prob must be in [0, 1), got {stochastic_depth_prob!r}")
        width, depth, dropout = EFFICIENTNET_SCALING[variant]
        norm_layer = _default_norm_layer(variant) if norm_layer is None else _with_variant_eps(norm_layer, variant)
        stages = _scaled_stages(width, depth)
        total_blocks = sum(s.num_layers for s in stages)
        layers: list[nn.Module] = [conv_norm_activation(3, stages[0].input_channels, 3, 2, norm_layer=norm_layer,
                                                        activation_layer=nn.SiLU)]
        block_id = 0
        for cfg in stages:
            blocks = []
            for j in range(cfg.num_layers):
                block_cfg = cfg if j == 0 else cfg._replace(input_channels=cfg.out_channels, stride=1)
                blocks.append(MBConv(block_cfg, stochastic_depth_prob * block_id / total_blocks, norm_layer))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
        last_in = stages[-1].out_channels
        layers.append(conv_norm_activation(last_in, 4 * last_in, 1, norm_layer=norm_layer, activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.stage_channels = [stages[0].input_channels] + [s.out_channels for s in stages]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True), nn.Linear(4 * last_in, num_classes))
        classifier_init(self, _uniform_linear_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet(variant: str = "b0", norm_layer: Callable[[int], nn.Module] | None = None,
                 num_classes: int = 1000, stochastic_depth_prob: float = 0.2) -> EfficientNet:
    """A randomly initialised EfficientNet-``variant`` (``"b0"`` ... ``"b7"``), torchvision's ``efficientnet_b*``
    layout and initialisation."""
    return EfficientNet(variant, num_classes, norm_layer, stochastic_depth_prob)


class EfficientNetFeatures(nn.Module):
    """The stem and the seven MBConv stages of an :class:`EfficientNet` (``features.0`` - ``features.7``; the last
    1x1 conv block and the classifier are dropped), returning ``{"c3", "c4", "c5"}`` (strides 8, 16, 32).

    ``out_channels`` lists the three maps' widths (B0: 40, 112, 320).
    """

    def __init__(self, network: EfficientNet, trainable_layers: int = 8):
        super().__init__()
        self.features = nn.Sequential(*list(network.features)[:8])
        if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or \
                not 0 <= trainable_layers <= 8:
            raise ValueError(f"trainable_backbone_layers must be an int in [0, 8], got {trainable_layers!r}")
        # Trainable layers count from the last stage down (torchvision's rule); the stem is the eighth.
        for block in list(self.features)[:8 - trainable_layers]:
            block.requires_grad_(False)
        self.out_channels = [network.stage_channels[s] for s in _PYRAMID_STAGES]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        outputs = OrderedDict()
        for index, block in enumerate(self.features):
            x = block(x)
            if index in _PYRAMID_STAGES:
                outputs[f"c{_PYRAMID_STAGES.index(index) + 3}"] = x
        return outputs


def efficientnet_features(variant: str, trainable_layers: int = 8,
                          norm_layer: Callable[[int], nn.Module] | None = None,
                          state_dict=None) -> EfficientNetFeatures:
    """EfficientNet-``variant``'s C3-C5 feature extractor; ``state_dict`` (a torchvision ImageNet checkpoint of the
    same variant, e.g. from ``weights_backbone``) is loaded strictly into the whole classifier before it is cut."""
    network = efficientnet(variant, norm_layer)
    if state_dict is not None:
        network.load_state_dict(state_dict)
    return EfficientNetFeatures(network, trainable_layers)
