"""EfficientDet's class and box nets: depthwise-separable towers shared by the pyramid levels, with per-level batch
norm (see :mod:`fastdet.models.efficientdet` for the detector and the choices made)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from fastdet.models.heads.retinanet_head import (
    BOX_LOSS_TYPES,
    retinanet_box_loss,
    retinanet_classification_loss,
)
from fastdet.models.necks.bifpn import SeparableConv2d
from fastdet.models.postprocess import flatten_level
from fastdet.models.targets import PaddedTargets

__all__ = ["EfficientDetHead", "NUM_LEVELS"]

_PRIOR_PROBABILITY = 0.01
_HUBER_DELTA = 0.1
_HUBER_BOX_LOSS_WEIGHT = 50.0
NUM_LEVELS = 5  # P3-P7


def _head_norm(channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels, eps=1e-3)



class _SeparableTower(nn.Module):
    """``num_layers`` separable 3x3 convs shared by the levels, each followed by the level's own BN and swish, and a
    separable 3x3 predictor of ``num_anchors * columns`` outputs; ``forward`` returns ``[B, sum_l H_l W_l A,
    columns]`` with anchors ordered as the anchor generator's (row, column, anchor shape)."""

    def __init__(self, channels: int, num_layers: int, num_anchors: int, columns: int, num_levels: int,
                 norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.convs = nn.ModuleList([SeparableConv2d(channels, channels) for _ in range(num_layers)])
        self.norms = nn.ModuleList([nn.ModuleList([norm_layer(channels) for _ in range(num_layers)])
                                    for _ in range(num_levels)])
        self.act = nn.SiLU()
        self.predictor = SeparableConv2d(channels, num_anchors * columns)
        self.num_anchors = num_anchors
        self.columns = columns

    def forward(self, features: list[Tensor]) -> Tensor:
        if len(features) != len(self.norms):
            raise ValueError(f"the head has BN layers for {len(self.norms)} levels, got {len(features)} feature maps")
        outputs = []
        for x, norms in zip(features, self.norms):
            for conv, norm in zip(self.convs, norms):
                x = self.act(norm(conv(x)))
            outputs.append(flatten_level(self.predictor(x), self.columns))
        return torch.cat(outputs, dim=1)


def _class_predictor(channels: int, num_anchors: int, num_classes: int) -> SeparableConv2d:
    predictor = SeparableConv2d(channels, num_anchors * num_classes)
    nn.init.constant_(predictor.pointwise.bias, -math.log((1 - _PRIOR_PROBABILITY) / _PRIOR_PROBABILITY))
    return predictor


class EfficientDetHead(nn.Module):
    """Class and box nets (``class_net``, ``box_net``), shared by the levels with per-level BN.

    ``forward(features)`` returns ``{"cls_logits": [B, A_total, K], "bbox_regression": [B, A_total, 4]}`` (deltas with
    box-coder weights 1); :meth:`compute_loss` turns them and matched anchors into ``{"classification",
    "bbox_regression"}`` losses.

    Args:
        channels, num_anchors, num_classes: the BiFPN width, anchors per location, classes.
        num_layers (int): D_class, the depth of both nets.
        bbox_loss_type (str): ``"huber"`` (EfficientDet's; ``huber_delta`` 0.1) or one of RetinaNet's (``"l1"``,
            ``"smooth_l1"``, ``"giou"``, ``"diou"``, ``"ciou"``).
        box_loss_weight (float, optional): default 50 for the Huber loss (averaged over the 4 coordinates, as the
            reference), 1 otherwise.
    """

    def __init__(self, channels: int, num_anchors: int, num_classes: int, num_layers: int = 3,
                 num_levels: int = NUM_LEVELS, bbox_loss_type: str = "huber", box_loss_weight: float | None = None,
                 huber_delta: float = _HUBER_DELTA, norm_layer: Callable[[int], nn.Module] = _head_norm):
        super().__init__()
        if bbox_loss_type != "huber" and bbox_loss_type not in BOX_LOSS_TYPES:
            raise ValueError(f"bbox_loss_type must be 'huber' or one of {BOX_LOSS_TYPES}, got {bbox_loss_type!r}")
        if not (math.isfinite(huber_delta) and huber_delta > 0):
            raise ValueError(f"huber_delta must be a positive number, got {huber_delta!r}")
        if box_loss_weight is None:
            box_loss_weight = _HUBER_BOX_LOSS_WEIGHT if bbox_loss_type == "huber" else 1.0
        if not (math.isfinite(box_loss_weight) and box_loss_weight >= 0):
            raise ValueError(f"box_loss_weight must be a non-negative number, got {box_loss_weight!r}")
        self.class_net = _SeparableTower(channels, num_layers, num_anchors, num_classes, num_levels, norm_layer)
        self.class_net.predictor = _class_predictor(channels, num_anchors, num_classes)
        self.box_net = _SeparableTower(channels, num_layers, num_anchors, 4, num_levels, norm_layer)
        self.num_classes = num_classes
        self.bbox_loss_type = bbox_loss_type
        self.box_loss_weight = float(box_loss_weight)
        self.huber_delta = float(huber_delta)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return {"cls_logits": self.class_net(features), "bbox_regression": self.box_net(features)}

    def replace_class_predictor(self, num_classes: int) -> None:
        old = self.class_net.predictor.pointwise
        fresh = _class_predictor(self.class_net.predictor.depthwise.in_channels, self.class_net.num_anchors,
                                 num_classes)
        self.class_net.predictor = fresh.to(old.weight.device, old.weight.dtype)
        self.class_net.columns = num_classes
        self.num_classes = num_classes

    def compute_loss(self, padded_targets: PaddedTargets, head_outputs: dict[str, Tensor], anchors: Tensor,
                     matched_idxs: Tensor) -> dict[str, Tensor]:
        """Losses of a batch (see the module docstring); arguments as ``RetinaNetHead.compute_loss``."""
        deltas = head_outputs["bbox_regression"]
        if self.bbox_loss_type == "huber":
            # huber_d(x) = d^2 * smooth_l1_1(x / d): RetinaNet's smooth-L1 box loss on deltas and targets scaled by
            # 1 / d (box-coder weights 1 / d scale the encoded targets), times d^2, per coordinate.
            d = self.huber_delta
            box = retinanet_box_loss(deltas / d, padded_targets.boxes, anchors, matched_idxs, "smooth_l1",
                                     (1.0 / d,) * 4) * (d * d / 4.0)
        else:
            box = retinanet_box_loss(deltas, padded_targets.boxes, anchors, matched_idxs, self.bbox_loss_type)
        return {
            "classification": retinanet_classification_loss(head_outputs["cls_logits"], padded_targets.labels,
                                                            matched_idxs),
            "bbox_regression": box * self.box_loss_weight,
        }
