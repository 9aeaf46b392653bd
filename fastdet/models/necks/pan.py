"""YOLOv5's PAN neck: a top-down (FPN) path then a bottom-up path over the backbone's stride 8, 16 and 32 maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet.models.backbones.darknet import C3, ConvBNAct, scaled_depth

__all__ = ["PANNeck"]


class PANNeck(nn.Module):
    """YOLOv5's PAN neck: top-down fusion (FPN) then bottom-up fusion; returns maps at strides 8, 16, 32."""

    def __init__(self, in_channels: tuple[int, int, int], depth_multiple: float):
        super().__init__()
        c3, c4, c5 = in_channels
        depth = scaled_depth(3, depth_multiple)
        self.lateral5 = ConvBNAct(c5, c4, 1)
        self.top_down4 = C3(2 * c4, c4, depth, shortcut=False)
        self.lateral4 = ConvBNAct(c4, c3, 1)
        self.top_down3 = C3(2 * c3, c3, depth, shortcut=False)
        self.down3 = ConvBNAct(c3, c3, 3, 2)
        self.bottom_up4 = C3(2 * c3, c4, depth, shortcut=False)
        self.down4 = ConvBNAct(c4, c4, 3, 2)
        self.bottom_up5 = C3(2 * c4, c5, depth, shortcut=False)
        self.out_channels = (c3, c4, c5)

    def forward(self, features: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        p3, p4, p5 = features
        lat5 = self.lateral5(p5)
        td4 = self.top_down4(torch.cat((F.interpolate(lat5, size=p4.shape[-2:], mode="nearest"), p4), dim=1))
        lat4 = self.lateral4(td4)
        out3 = self.top_down3(torch.cat((F.interpolate(lat4, size=p3.shape[-2:], mode="nearest"), p3), dim=1))
        out4 = self.bottom_up4(torch.cat((self.down3(out3), lat4), dim=1))
        out5 = self.bottom_up5(torch.cat((self.down4(out4), lat5), dim=1))
        return out3, out4, out5
