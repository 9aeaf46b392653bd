"""YOLOv5's CSP-Darknet backbone and its building blocks (conv-BN-SiLU, CSP bottleneck, C3, SPPF), scaled by a
width and a depth multiplier. Module names are YOLOv5's (``cv1``, ``cv2``, ``m``...), so state dicts keep their keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["C3", "SPPF", "Bottleneck", "CSPBackbone", "ConvBNAct", "scaled_channels", "scaled_depth"]


class ConvBNAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> SiLU, 'same' padding for odd kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                              kernel_size // 2 if padding is None else padding, bias=False)
        # YOLOv5's BatchNorm settings: a slower running-statistics update than PyTorch's default.
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 conv -> 3x3 conv, with a residual connection when ``shortcut`` and the channel counts agree."""

    def __init__(self, in_channels: int, out_channels: int, shortcut: bool = True, expansion: float = 1.0):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.cv1 = ConvBNAct(in_channels, hidden, 1)
        self.cv2 = ConvBNAct(hidden, out_channels, 3)
        self.add = shortcut and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convs: half the channels go through ``depth`` bottlenecks, the other half bypass them, and
    a 1x1 conv fuses the two."""

    def __init__(self, in_channels: int, out_channels: int, depth: int = 1, shortcut: bool = True):
        super().__init__()
        hidden = out_channels // 2
        self.cv1 = ConvBNAct(in_channels, hidden, 1)
        self.cv2 = ConvBNAct(in_channels, hidden, 1)
        self.cv3 = ConvBNAct(2 * hidden, out_channels, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut) for _ in range(depth)))

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools (receptive fields 5, 9, 13) concatenated."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5):
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = ConvBNAct(in_channels, hidden, 1)
        self.cv2 = ConvBNAct(hidden * 4, out_channels, 1)
        self.pool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat((x, y1, y2, self.pool(y2)), dim=1))


def scaled_channels(channels: int, width_multiple: float) -> int:
    # YOLOv5 rounds channel counts up to multiples of 8.
    return max(8, int(math.ceil(channels * width_multiple / 8) * 8))


def scaled_depth(depth: int, depth_multiple: float) -> int:
    return max(1, round(depth * depth_multiple))


class CSPBackbone(nn.Module):
    """YOLOv5's CSP-Darknet backbone; returns the feature maps at strides 8, 16 and 32."""

    def __init__(self, width_multiple: float, depth_multiple: float, in_channels: int = 3):
        super().__init__()
        c = [scaled_channels(x, width_multiple) for x in (64, 128, 256, 512, 1024)]
        d = [scaled_depth(x, depth_multiple) for x in (3, 6, 9, 3)]
        self.stem = ConvBNAct(in_channels, c[0], 6, 2, 2)
        self.stage2 = nn.Sequential(ConvBNAct(c[0], c[1], 3, 2), C3(c[1], c[1], d[0]))
        self.stage3 = nn.Sequential(ConvBNAct(c[1], c[2], 3, 2), C3(c[2], c[2], d[1]))
        self.stage4 = nn.Sequential(ConvBNAct(c[2], c[3], 3, 2), C3(c[3], c[3], d[2]))
        self.stage5 = nn.Sequential(ConvBNAct(c[3], c[4], 3, 2), C3(c[4], c[4], d[3]), SPPF(c[4], c[4]))
        self.out_channels = (c[2], c[3], c[4])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p3 = self.stage3(self.stage2(self.stem(x)))
        p4 = self.stage4(p3)
        return p3, p4, self.stage5(p4)
