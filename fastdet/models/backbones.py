"""Backbones and feature pyramids: ResNet bodies and FPN with torchvision's module and state-dict names, so
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
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BackboneWithFPN",
    "BasicBlock",
    "Bottleneck",
    "FeaturePyramidNetwork",
    "FrozenBatchNorm2d",
    "IntermediateLayers",
    "LastLevelMaxPool",
    "LastLevelP6P7",
    "ResNet",
    "conv_norm_activation",
    "resnet",
    "resnet_fpn_backbone",
]


class FrozenBatchNorm2d(nn.Module):
    """Batch normalisation with fixed statistics and affine parameters, all stored as buffers (never trained).

    Computes ``x * scale + shift`` with ``scale = weight * rsqrt(running_var + eps)`` and
    ``shift = bias - running_mean * scale``, the same sequence of float operations as torchvision's
    ``FrozenBatchNorm2d``, so results are bitwise identical. State dicts of ``nn.BatchNorm2d`` load too: their
    ``num_batches_tracked`` entry is ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.weight.shape[0]}, eps={self.eps})"


def conv_norm_activation(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                         groups: int = 1, norm_layer: Callable[[int], nn.Module] | None = None,
                         activation_layer: Callable[..., nn.Module] | None = nn.ReLU, dilation: int = 1,
                         bias: bool | None = None) -> nn.Sequential:
    """``Sequential(conv, [norm], [activation])`` laid out as torchvision's ``Conv2dNormActivation`` (so keys are
    ``<name>.0.weight``, ``<name>.1.*``): "same" padding ``(k - 1) // 2 * dilation``, a conv bias only without a norm
    layer (unless ``bias`` says otherwise), an in-place activation."""
    if bias is None:
        bias = norm_layer is None
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                                         (kernel_size - 1) // 2 * dilation, dilation=dilation, groups=groups,
                                         bias=bias)]
    if norm_layer is not None:
        layers.append(norm_layer(out_channels))
    if activation_layer is not None:
        layers.append(activation_layer(inplace=True))
    return nn.Sequential(*layers)


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
        return self.relu(out + identity)


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
        return self.relu(out + identity)


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


class IntermediateLayers(nn.ModuleDict):
    """Runs the direct children of ``model`` in registration order up to the last one named in ``return_layers`` and
    returns ``OrderedDict(new_name -> output)`` for those named (torchvision's ``IntermediateLayerGetter``). Children
    after the last returned one (pooling, ``fc``) are dropped, so state-dict keys are the model's own."""

    def __init__(self, model: nn.Module, return_layers: dict[str, str]):
        children = dict(model.named_children())
        missing = set(return_layers) - set(children)
        if missing:
            raise ValueError(f"return_layers names modules the model does not have: {sorted(missing)}")
        remaining = dict(return_layers)
        kept = OrderedDict()
        for name, module in children.items():
            kept[name] = module
            remaining.pop(name, None)
            if not remaining:
                break
        super().__init__(kept)
        self.return_layers = dict(return_layers)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class LastLevelMaxPool(nn.Module):
    """Extra FPN level ``"pool"``: a stride-2, 1x1 max pool of the coarsest output (Faster R-CNN's P6)."""

    def forward(self, results: list[Tensor], inputs: list[Tensor], names: list[str]
                ) -> tuple[list[Tensor], list[str]]:
        return results + [F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0)], names + ["pool"]


class LastLevelP6P7(nn.Module):
    """Extra FPN levels ``"p6"`` and ``"p7"`` (RetinaNet): ``p6 = conv3x3/2(x)``, ``p7 = conv3x3/2(relu(p6))``. ``x`` is
    the FPN's own P5 output when ``in_channels == out_channels`` and the backbone's C5 otherwise (torchvision's
    ``use_P5`` rule)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)
        self.use_P5 = in_channels == out_channels

    def forward(self, results: list[Tensor], inputs: list[Tensor], names: list[str]
                ) -> tuple[list[Tensor], list[str]]:
        source = results[-1] if self.use_P5 else inputs[-1]
        p6 = self.p6(source)
        p7 = self.p7(F.relu(p6))
        return results + [p6, p7], names + ["p6", "p7"]


class FeaturePyramidNetwork(nn.Module):
    """Top-down feature pyramid (Lin et al. 2017) over an ordered dict of features, finest first.

    Each level gets a 1x1 lateral conv (``inner_blocks``); from the coarsest level down, the running top-down map is
    upsampled (nearest, to the lateral's exact size) and added to the lateral; a 3x3 conv (``layer_blocks``) produces
    each output. ``extra_blocks`` appends levels after the coarsest. With ``norm_layer`` every conv is followed by it
    (``inner_blocks.{i}.1``, ``layer_blocks.{i}.1``) and has no bias, as in torchvision's v2 models. Convs use
    kaiming-uniform (a=1) weights and zero bias, as torchvision.
    """

    def __init__(self, in_channels_list: Sequence[int], out_channels: int, extra_blocks: nn.Module | None = None,
                 norm_layer: Callable[[int], nn.Module] | None = None):
        super().__init__()
        if len(in_channels_list) == 0 or any(c <= 0 for c in in_channels_list):
            raise ValueError(f"in_channels_list must be non-empty positive channel counts, got {in_channels_list!r}")

        self.inner_blocks = nn.ModuleList(
            conv_norm_activation(c, out_channels, 1, norm_layer=norm_layer, activation_layer=None)
            for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(
            conv_norm_activation(out_channels, out_channels, 3, norm_layer=norm_layer, activation_layer=None)
            for _ in in_channels_list)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        self.extra_blocks = extra_blocks

    def forward(self, x: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
        names = list(x.keys())
        inputs = list(x.values())
        if len(inputs) != len(self.inner_blocks):
            raise ValueError(f"the FPN was built for {len(self.inner_blocks)} levels, got {len(inputs)} features")
        top_down = self.inner_blocks[-1](inputs[-1])
        results = [self.layer_blocks[-1](top_down)]
        for level in range(len(inputs) - 2, -1, -1):
            lateral = self.inner_blocks[level](inputs[level])
            top_down = lateral + F.interpolate(top_down, size=lateral.shape[-2:], mode="nearest")
            results.insert(0, self.layer_blocks[level](top_down))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, inputs, names)
        return OrderedDict(zip(names, results))


class BackboneWithFPN(nn.Module):
    """``body`` (the layers of ``backbone`` named in ``return_layers``) followed by an FPN.

    Args:
        backbone (nn.Module): e.g. a :class:`ResNet`; its children run in order.
        return_layers (dict): child name -> output key, e.g. ``{"layer1": "0", ..., "layer4": "3"}``.
        in_channels_list (list of int): channels of each returned layer.
        out_channels (int): FPN channels (also ``self.out_channels``).
        extra_blocks (nn.Module, optional): :class:`LastLevelMaxPool` (default) or :class:`LastLevelP6P7`.
        norm_layer (optional): normalisation after each FPN convolution (see :class:`FeaturePyramidNetwork`).
    """

    def __init__(self, backbone: nn.Module, return_layers: dict[str, str], in_channels_list: Sequence[int],
                 out_channels: int, extra_blocks: nn.Module | None = None,
                 norm_layer: Callable[[int], nn.Module] | None = None):
        super().__init__()
        if extra_blocks is None:
            extra_blocks = LastLevelMaxPool()
        self.body = IntermediateLayers(backbone, return_layers)
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels, extra_blocks, norm_layer)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


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
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be an int in [0, 5], got {trainable_layers!r}")
    body = resnet(depth, norm_layer=norm_layer)
    if body_state_dict is not None:
        body.load_state_dict(body_state_dict)
    stages_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        stages_to_train.append("bn1")
    for name, parameter in body.named_parameters():
        if not any(name.startswith(stage) for stage in stages_to_train):
            parameter.requires_grad_(False)
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
