"""Feature pyramid network (Lin et al. 2017) with torchvision's module and state-dict names, its extra-level
variants (P6 max pool for Faster R-CNN, P6/P7 convs for RetinaNet) and the backbone + FPN wrapper.

Naming contract: ``FeaturePyramidNetwork``: ``inner_blocks.{i}.0`` (1x1 lateral convs) and ``layer_blocks.{i}.0``
(3x3 output convs); ``BackboneWithFPN``: ``body.*`` and ``fpn.*``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fastdet.models.layers import IntermediateLayers, conv_norm_activation

__all__ = ["BackboneWithFPN", "FeaturePyramidNetwork", "LastLevelMaxPool", "LastLevelP6P7"]


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
