"""BiFPN (Tan, Pang & Le, "EfficientDet: Scalable and Efficient Object Detection", 2020): a weighted bidirectional
feature pyramid on P3-P7.

* P6 and P7 are made from C5 as in the reference implementations: P6 = max-pool 3x3/2 of a 1x1 conv + BN of C5 (to
  the BiFPN width), P7 = max-pool 3x3/2 of P6.
* One BiFPN layer is a top-down path (P6', P5', P4', then P3 out) followed by a bottom-up path (P4 ... P7 out); every
  node fuses its inputs with *fast normalised fusion*, ``out = sum_i w_i x_i / (eps + sum_j w_j)`` with learnable
  weights kept non-negative by a ReLU (eps 1e-4), then applies swish, a depthwise-separable 3x3 convolution and BN.
  Inputs are resampled to the node's level first: nearest-neighbour upsampling from a coarser level, max-pool 3x3/2
  from a finer one, and (first layer only, where the backbone's widths differ) a 1x1 conv + BN to the BiFPN width;
  each use of a backbone map gets its own 1x1 conv, as in the reference implementations.
* The layer is repeated ``num_layers`` times (D_bifpn of the compound-scaling table).

Feature maps at level l have ``ceil(H / 2^l)`` rows (stride-2 convs and pools with "same" padding all round up);
upsampling resizes to the finer map's exact size, so any input size works, although the anchors need the padded
input size to be a multiple of 2^7 (EfficientDet's transform pads to that).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet.models.layers import conv_norm_activation

__all__ = ["BiFPN", "BiFPNLayer", "FastNormalizedFusion", "SeparableConv2d"]

# The nodes of one BiFPN layer over levels 3-7: (output level, indices of its inputs) where indices 0-4 are the layer's
# inputs P3-P7 and index 5 + n the n-th node's output. The last five nodes are the layer's outputs P3-P7.
_NODES = (
    (6, (3, 4)),  # P6 top-down
    (5, (2, 5)),  # P5 top-down
    (4, (1, 6)),  # P4 top-down
    (3, (0, 7)),  # P3 out
    (4, (1, 7, 8)),  # P4 out
    (5, (2, 6, 9)),  # P5 out
    (6, (3, 5, 10)),  # P6 out
    (7, (4, 11)),  # P7 out
)
_MIN_LEVEL = 3
_NUM_LEVELS = 5


class SeparableConv2d(nn.Module):
    """Depthwise kxk convolution (no bias) followed by a pointwise 1x1 convolution (with bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        self.depthwise = nn.Conv2d(in_channels, in_channels, kernel_size, padding=kernel_size // 2,
                                   groups=in_channels, bias=False)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class FastNormalizedFusion(nn.Module):
    """``sum_i w_i x_i / (eps + sum_j w_j)`` with ``w = relu(weight)`` (learnable, initialised to ones): the paper's
    fast normalised fusion, a softmax-free weighting whose weights are non-negative and sum to (nearly) one."""

    def __init__(self, num_inputs: int, eps: float = 1e-4):
        super().__init__()
        if num_inputs < 2:
            raise ValueError(f"num_inputs must be >= 2, got {num_inputs}")
        self.weight = nn.Parameter(torch.ones(num_inputs))
        self.eps = float(eps)

    def normalized_weights(self) -> Tensor:
        """The weights actually applied, ``Tensor[num_inputs]``: non-negative, summing to ``S / (eps + S)``."""
        w = F.relu(self.weight)
        return w / (w.sum() + self.eps)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        w = self.normalized_weights().to(inputs[0].dtype)
        return torch.tensordot(w, torch.stack(list(inputs)), dims=1)


class _Resample(nn.Module):
    """Brings a map to a node's level and width: optional 1x1 conv + BN, then max-pool 3x3/2 (one level finer) or
    nearest upsampling to the node's size (coarser)."""

    def __init__(self, in_channels: int, out_channels: int, level_step: int,
                 norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.project = None
        if in_channels != out_channels:
            self.project = conv_norm_activation(in_channels, out_channels, 1, norm_layer=norm_layer,
                                                activation_layer=None, bias=True)
        self.level_step = level_step  # target level - source level

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        if self.project is not None:
            x = self.project(x)
        if self.level_step > 0:
            for _ in range(self.level_step):
                x = F.max_pool2d(x, 3, 2, 1)
        elif self.level_step < 0:
            x = F.interpolate(x, size=size, mode="nearest")
        return x


class _FusionNode(nn.Module):
    def __init__(self, level: int, input_levels: Sequence[int], input_channels: Sequence[int], channels: int,
                 norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.resample = nn.ModuleList([_Resample(c, channels, level - l, norm_layer)
                                       for l, c in zip(input_levels, input_channels)])
        self.fusion = FastNormalizedFusion(len(input_levels))
        self.act = nn.SiLU()
        self.conv = SeparableConv2d(channels, channels, 3)
        self.norm = norm_layer(channels)

    def forward(self, inputs: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        fused = self.fusion([r(x, size) for r, x in zip(self.resample, inputs)])
        return self.norm(self.conv(self.act(fused)))


class BiFPNLayer(nn.Module):
    """One top-down + bottom-up pass over P3-P7 (see the module docstring). ``in_channels``: the five inputs' widths
    (the backbone's for P3-P5 in the first layer; ``channels`` everywhere after)."""

    def __init__(self, in_channels: Sequence[int], channels: int,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        if len(in_channels) != _NUM_LEVELS:
            raise ValueError(f"in_channels must list {_NUM_LEVELS} widths (P3-P7), got {list(in_channels)}")
        levels = list(range(_MIN_LEVEL, _MIN_LEVEL + _NUM_LEVELS))
        widths = list(in_channels)
        self.nodes = nn.ModuleList()
        for level, inputs in _NODES:
            self.nodes.append(_FusionNode(level, [levels[i] for i in inputs], [widths[i] for i in inputs], channels,
                                          norm_layer))
            levels.append(level)
            widths.append(channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        maps = list(features)
        sizes = [tuple(f.shape[-2:]) for f in features]
        for node, (level, inputs) in zip(self.nodes, _NODES):
            maps.append(node([maps[i] for i in inputs], sizes[level - _MIN_LEVEL]))
        return maps[-_NUM_LEVELS:]


class BiFPN(nn.Module):
    """Backbone C3-C5 -> P3-P7 with ``channels`` channels through ``num_layers`` BiFPN layers.

    Args:
        in_channels (sequence of 3 ints): widths of C3, C4, C5.
        channels (int): the BiFPN width (W_bifpn).
        num_layers (int): the number of BiFPN layers (D_bifpn).
        norm_layer: the norm after every convolution (default ``BatchNorm2d``).

    ``forward`` takes the three maps (a list, or a dict in C3-C5 order) and returns an ``OrderedDict`` ``{"p3", ...,
    "p7"}``.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, num_layers: int,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) != 3:
            raise ValueError(f"in_channels must list the widths of C3, C4 and C5, got {in_channels}")
        for name, value in (("channels", channels), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.p6 = _Resample(in_channels[2], channels, 1, norm_layer)
        first = in_channels + [channels, channels]
        self.layers = nn.ModuleList([BiFPNLayer(first if i == 0 else [channels] * _NUM_LEVELS, channels, norm_layer)
                                     for i in range(num_layers)])
        self.out_channels = channels

    def forward(self, features) -> OrderedDict[str, Tensor]:
        maps = list(features.values()) if isinstance(features, dict) else list(features)
        if len(maps) != 3:
            raise ValueError(f"BiFPN expects the three maps C3, C4, C5, got {len(maps)}")
        p6 = self.p6(maps[2], (0, 0))
        maps += [p6, F.max_pool2d(p6, 3, 2, 1)]
        for layer in self.layers:
            maps = layer(maps)
        return OrderedDict((f"p{_MIN_LEVEL + i}", m) for i, m in enumerate(maps))
