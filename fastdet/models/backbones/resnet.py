"""ResNet bodies and the ResNet + FPN backbone builder, with torchvision's module and state-dict names, so
torchvision (and torchvision-trained) checkpoints load unchanged.

Naming contract (what makes checkpoints interchangeable):

* ``resnet(depth)``: ``conv1, bn1, layer1..layer4, fc``; blocks are ``BasicBlock`` (``conv1, bn1, conv2, bn2``)
  or ``Bottleneck`` (``conv1..conv3, bn1..bn3``) with an optional ``downsample`` = ``Sequential(conv, norm)``. The
  stride of a Bottleneck sits on its 3x3 convolution (ResNet v1.5, as torchvision).
* ``FeaturePyramidNetwork``: ``inner_blocks.{i}.0`` (1x1 lateral convs) and ``layer_blocks.{i}.0`` (3x3 output convs).
* ``BackboneWithFPN``: ``body.*`` and ``fpn.*``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from fastdet.models.layers import FrozenBatchNorm2d, IntermediateLayers
from fastdet.models.necks.fpn import BackboneWithFPN

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "freeze_resnet_stages",
    "resnet",
    "resnet_fpn_backbone",
    "resnet_trunk_backbone",
    "SingleMapBackbone",
]


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity  # in place, as torchvision: no extra feature-map allocation per block
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection (ResNet-50/101)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet v1.5 classifier (stem, four stages, global pooling, ``fc``); module names as torchvision's."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], num_classes: int = 1000,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self._norm_layer = norm_layer
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                self._norm_layer(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self._norm_layer)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, norm_layer=self._norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_RESNET_LAYOUTS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
}


def resnet(depth: int, norm_layer: Callable[[int], nn.Module] = FrozenBatchNorm2d, num_classes: int = 1000) -> ResNet:
    """A randomly initialised ResNet-``depth`` (18, 34, 50 or 101) with torchvision's names and initialisation."""
    if depth not in _RESNET_LAYOUTS:
        raise ValueError(f"depth must be one of {sorted(_RESNET_LAYOUTS)}, got {depth!r}")
    block, layers = _RESNET_LAYOUTS[depth]
    return ResNet(block, layers, num_classes=num_classes, norm_layer=norm_layer)


def freeze_resnet_stages(body: ResNet, trainable_layers: int) -> None:
    """Keep ``requires_grad`` only on the last ``trainable_layers`` stages of ``body`` (counted from ``layer4`` down
    to ``conv1``; with 5, ``bn1`` too; ``fc`` never, as torchvision's detection backbones). Modifies ``body``."""
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be an int in [0, 5], got {trainable_layers!r}")
    stages_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        stages_to_train.append("bn1")
    for name, parameter in body.named_parameters():
        if not any(name.startswith(stage) for stage in stages_to_train):
            parameter.requires_grad_(False)


def resnet_fpn_backbone(depth: int, trainable_layers: int = 3, returned_layers: Sequence[int] | None = None,
                        extra_blocks: nn.Module | None = None,
                        norm_layer: Callable[[int], nn.Module] = FrozenBatchNorm2d,
                        out_channels: int = 256, body_state_dict: Mapping[str, Tensor] | None = None,
                        fpn_norm_layer: Callable[[int], nn.Module] | None = None) -> BackboneWithFPN:
    """ResNet-``depth`` + FPN, as torchvision's ``resnet_fpn_backbone`` builds it.

    Args:
        depth: 18, 34, 50 or 101.
        trainable_layers (int in [0, 5]): how many stages, counted from ``layer4`` down to ``conv1``, keep
            ``requires_grad``; with 5, ``bn1`` trains too (matters only for a trainable ``norm_layer``).
        returned_layers (list of int in [1, 4]): stages fed to the FPN (default all four), keyed "0", "1", ...
        extra_blocks: default :class:`LastLevelMaxPool`.
        norm_layer: :class:`FrozenBatchNorm2d` (pretrained-style, the default) or ``nn.BatchNorm2d``.
        body_state_dict: ImageNet classifier weights (``fc`` included, as torchvision publishes them) loaded strictly
            into the ResNet before it is cut into a feature extractor.
        fpn_norm_layer: normalisation after each FPN convolution (``nn.BatchNorm2d`` in torchvision's v2 models).
    """
    body = _pretrained_resnet(depth, trainable_layers, norm_layer, body_state_dict)
    if returned_layers is None:
        returned_layers = [1, 2, 3, 4]
    returned_layers = list(returned_layers)
    if not returned_layers or min(returned_layers) < 1 or max(returned_layers) > 4:
        raise ValueError(f"returned_layers must be stage numbers in [1, 4], got {returned_layers!r}")
    return_layers = {f"layer{stage}": str(i) for i, stage in enumerate(returned_layers)}
    # Channels of stage k: 64 * 2^(k-1) times the block expansion; body.inplanes holds the last stage's (512 * exp).
    stage2_channels = body.inplanes // 8
    in_channels_list = [stage2_channels * 2 ** (stage - 1) for stage in returned_layers]
    return BackboneWithFPN(body, return_layers, in_channels_list, out_channels, extra_blocks, fpn_norm_layer)


def _pretrained_resnet(depth: int, trainable_layers: int, norm_layer: Callable[[int], nn.Module],
                       body_state_dict: Mapping[str, Tensor] | None) -> ResNet:
    """A ResNet-``depth`` with ``body_state_dict`` loaded strictly (when given) and every stage but the last
    ``trainable_layers`` frozen (:func:`freeze_resnet_stages`)."""
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be an int in [0, 5], got {trainable_layers!r}")
    body = resnet(depth, norm_layer=norm_layer)
    if body_state_dict is not None:
        body.load_state_dict(body_state_dict)
    freeze_resnet_stages(body, trainable_layers)
    return body


class SingleMapBackbone(nn.Module):
    """A network's children run up to one of them, giving one feature map: ``{"0": Tensor[B, C, H/s, W/s]}``
    (``out_channels`` = C, ``stride`` = s). State-dict keys are ``body.<the network's own names>``."""

    def __init__(self, network: nn.Module, last_layer: str, out_channels: int, stride: int):
        super().__init__()
        self.body = IntermediateLayers(network, {last_layer: "0"})
        self.out_channels = int(out_channels)
        self.stride = int(stride)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.body(x)


def resnet_trunk_backbone(depth: int, last_stage: int = 3, trainable_layers: int = 3,
                          norm_layer: Callable[[int], nn.Module] = FrozenBatchNorm2d,
                          body_state_dict: Mapping[str, Tensor] | None = None) -> SingleMapBackbone:
    """ResNet-``depth`` up to ``layer{last_stage}`` (no FPN): one feature map of stride ``2 ** (last_stage + 1)``,
    e.g. C4 (``last_stage=3``, stride 16: 256 channels for ResNet-18/34, 1024 for ResNet-50/101), the single-map
    backbone of the SPP-Net / Fast R-CNN era. ``trainable_layers``, ``norm_layer`` and ``body_state_dict`` as in
    :func:`resnet_fpn_backbone` (stages after ``last_stage`` are dropped whatever their flag)."""
    if isinstance(last_stage, bool) or last_stage not in (1, 2, 3, 4):
        raise ValueError(f"last_stage must be a stage number in [1, 4], got {last_stage!r}")
    body = _pretrained_resnet(depth, trainable_layers, norm_layer, body_state_dict)
    channels = body.inplanes // 8 * 2 ** (last_stage - 1)
    return SingleMapBackbone(body, f"layer{last_stage}", channels, 2 ** (last_stage + 1))
