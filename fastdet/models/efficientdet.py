"""EfficientDet D0-D7 (Tan, Pang & Le, "EfficientDet: Scalable and Efficient Object Detection", CVPR 2020).

An EfficientNet backbone (C3-C5, :mod:`fastdet.models.efficientnet`), a BiFPN on P3-P7 (:mod:`fastdet.models.bifpn`)
and class/box heads shared by all levels, scaled together by the compound coefficient (:data:`EFFICIENTDET_CONFIGS`:
input size, backbone, BiFPN width and depth, head depth). The detector is a one-stage anchor detector with RetinaNet's
contract, so :class:`EfficientDet` is a :class:`~fastdet.models.retinanet.RetinaNet` with other parts: the same batched
anchor matching, focal loss, box coding and fixed-size detection selection on fastdet's fused ops.

Choices, and where they follow the reference implementations (google/automl, rwightman/efficientdet-pytorch):

* Heads: ``D_class`` depthwise-separable 3x3 convs (shared by the levels) each followed by a *per-level* BN and swish,
  then a separable 3x3 predictor (class bias ``-log(99)``: prior 0.01).
* Anchors: levels P3-P7, sizes ``anchor_scale * stride * 2^(k/3)`` (anchor scale 4, k = 0, 1, 2) and aspect ratios
  (h/w) 0.5, 1, 2 with the area kept (the reference's (1.4, 0.7) pairs have 2 % less area), centred on the cells
  (offset 0.5).
* Matching: IoU >= 0.5 positive, < 0.5 negative, every box also claims its best anchors (the reference's argmax
  matcher with forced row matches).
* Losses: sigmoid focal loss (alpha 0.25, gamma 2; the reference uses gamma 1.5) normalised by the positives, and the
  Huber box loss (delta 0.1) on the encoded deltas, averaged over the four coordinates of the positives and weighted
  by 50 (the reference's ``box_loss_weight``); ``bbox_loss_type`` may also be a RetinaNet loss (``"l1"``, ``"giou"``,
  ...).
* Input: the longer side resized to the input size and the batch padded to a multiple of 128 (2^7, P7's stride).
* Post-processing: :func:`fastdet.ops.multiclass_nms` with gaussian soft-NMS by default (``nms_method="soft"``, the
  reference's default) and at most 100 detections per image; ``nms_method="hard"`` gives greedy NMS.
* BN: eps 1e-3 (the reference's), PyTorch's default momentum (0.1; the reference's 0.01 suits long schedules only).

No published EfficientDet weights exist in torchvision: ``weights`` takes a ``.pth`` path or a state dict of the same
architecture; ``weights_backbone`` takes torchvision's ImageNet EfficientNet weights (``EfficientNet_B{n}_Weights``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

from torch import Tensor, nn

from fastdet import ops
from fastdet.models.backbones.efficientnet import efficientnet_features
from fastdet.models.heads.efficientdet_head import NUM_LEVELS, EfficientDetHead
from fastdet.models.necks.bifpn import BiFPN
from fastdet.models.retinanet import RetinaNet
from fastdet.models.weights import plan_build

__all__ = [
    "EFFICIENTDET_CONFIGS",
    "EfficientDet",
    "EfficientDetBackbone",
    "EfficientDetConfig",
    "EfficientDetHead",
    "efficientdet_anchor_generator",
    "efficientdet_d0",
    "efficientdet_d1",
    "efficientdet_d2",
    "efficientdet_d3",
    "efficientdet_d4",
    "efficientdet_d5",
    "efficientdet_d6",
    "efficientdet_d7",
]

_NUM_LEVELS = NUM_LEVELS
_MIN_LEVEL = 3


class EfficientDetConfig(NamedTuple):
    image_size: int  # input resolution R_input
    backbone: str  # EfficientNet variant
    bifpn_channels: int  # W_bifpn
    bifpn_layers: int  # D_bifpn
    head_layers: int  # D_class (the box head has as many)


# The paper's Table 1 (compound scaling). D7 keeps D6's B6 backbone at a larger input.
EFFICIENTDET_CONFIGS = {
    "d0": EfficientDetConfig(512, "b0", 64, 3, 3),
    "d1": EfficientDetConfig(640, "b1", 88, 4, 3),
    "d2": EfficientDetConfig(768, "b2", 112, 5, 3),
    "d3": EfficientDetConfig(896, "b3", 160, 6, 4),
    "d4": EfficientDetConfig(1024, "b4", 224, 7, 4),
    "d5": EfficientDetConfig(1280, "b5", 288, 7, 4),
    "d6": EfficientDetConfig(1280, "b6", 384, 8, 5),
    "d7": EfficientDetConfig(1536, "b6", 384, 8, 5),
}


def efficientdet_anchor_generator(anchor_scale: float = 4.0, num_scales: int = 3,
                                  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> ops.AnchorGenerator:
    """EfficientDet's anchors on P3-P7: on level l, sizes ``anchor_scale * 2^l * 2^(k / num_scales)`` for
    ``k < num_scales`` times the height/width ``aspect_ratios``, centred on the cells (offset 0.5)."""
    if not (math.isfinite(anchor_scale) and anchor_scale > 0):
        raise ValueError(f"anchor_scale must be a positive number, got {anchor_scale!r}")
    if isinstance(num_scales, bool) or not isinstance(num_scales, int) or num_scales < 1:
        raise ValueError(f"num_scales must be a positive int, got {num_scales!r}")
    sizes = tuple(tuple(anchor_scale * 2 ** level * 2 ** (k / num_scales) for k in range(num_scales))
                  for level in range(_MIN_LEVEL, _MIN_LEVEL + _NUM_LEVELS))
    return ops.AnchorGenerator(sizes, (tuple(aspect_ratios),) * _NUM_LEVELS, offset=0.5)


class EfficientDetBackbone(nn.Module):
    """EfficientNet C3-C5 (``body``) + BiFPN (``fpn``) -> ``{"p3", ..., "p7"}`` with ``out_channels`` channels."""

    def __init__(self, body: nn.Module, fpn: BiFPN):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = fpn.out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


class EfficientDet(RetinaNet):
    """EfficientDet detector: a :class:`RetinaNet` (same arguments, training and detection contract) with
    EfficientDet's defaults.

    Args:
        backbone (nn.Module): returns the five maps P3-P7 and has ``out_channels`` (e.g. :class:`EfficientDetBackbone`).
        num_classes (int): number of classes (sigmoid outputs; label 0 is background by fastdet's convention but has
            an output like any other class).
        image_size (int): input resolution: the longer image side is resized to it (``min_size``/``max_size`` may be
            given instead) and batches are padded to a multiple of 128.
        head (nn.Module, optional): default :class:`EfficientDetHead` with ``head_layers`` layers and
            ``bbox_loss_type`` (``"huber"``), ``box_loss_weight``.
        anchor_generator: default :func:`efficientdet_anchor_generator` (anchor scale 4, 3 scales x 3 ratios).
        nms_method (str): ``"soft"`` (gaussian soft-NMS, default), ``"soft_linear"`` or ``"hard"``.
        Other keyword arguments (``score_thresh``, ``nms_thresh``, ``detections_per_img`` (100),
        ``topk_candidates``, ``fg_iou_thresh``/``bg_iou_thresh`` (0.5/0.5), ``image_mean``, ``image_std``) go to
        :class:`RetinaNet`.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, image_size: int = 512, head: nn.Module | None = None,
                 anchor_generator: ops.AnchorGenerator | None = None, head_layers: int = 3,
                 bbox_loss_type: str = "huber", box_loss_weight: float | None = None, nms_method: str = "soft",
                 detections_per_img: int = 100, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                 **kwargs):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an out_channels attribute (the channel count of every feature map)")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if anchor_generator is None:
            anchor_generator = efficientdet_anchor_generator()
        if head is None and isinstance(anchor_generator, ops.AnchorGenerator):
            head = EfficientDetHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0],
                                    num_classes, head_layers, bbox_loss_type=bbox_loss_type,
                                    box_loss_weight=box_loss_weight)
        kwargs.setdefault("min_size", image_size)
        kwargs.setdefault("max_size", image_size)
        kwargs.setdefault("size_divisible", 2 ** (_MIN_LEVEL + _NUM_LEVELS - 1))
        super().__init__(backbone, num_classes, anchor_generator=anchor_generator, head=head, nms_method=nms_method,
                         detections_per_img=detections_per_img, fg_iou_thresh=fg_iou_thresh,
                         bg_iou_thresh=bg_iou_thresh, **kwargs)

    def replace_class_heads(self, num_classes: int) -> None:
        """Fine-tuning: a fresh class predictor for ``num_classes`` (prior-probability bias) on the loaded class net,
        on the old layer's device and dtype."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.head.replace_class_predictor(num_classes)
        self.num_classes = num_classes


def _efficientdet(variant: str, *, weights, progress: bool, num_classes: int | None, weights_backbone,
                  trainable_backbone_layers: int | None, **kwargs) -> EfficientDet:
    config = EFFICIENTDET_CONFIGS[variant]
    backbone_enum = f"EfficientNet_B{config.backbone[1]}_Weights"
    # EfficientDet trains every layer of the backbone, batch norms included (as torchvision's v2 detectors do);
    # norm_layer="FrozenBatchNorm2d" freezes the backbone's statistics for small batches.
    plan = plan_build(None, backbone_enum, weights=weights, weights_backbone=weights_backbone,
                      num_classes=num_classes, trainable_backbone_layers=trainable_backbone_layers,
                      max_trainable_layers=8, default_trainable_layers=8, progress=progress,
                      norm_layer=kwargs.pop("norm_layer", nn.BatchNorm2d))
    body = efficientnet_features(config.backbone, plan.trainable_backbone_layers, plan.norm_layer,
                                 plan.backbone_state_dict(progress))
    fpn = BiFPN(body.out_channels, config.bifpn_channels, config.bifpn_layers,
                norm_layer=partial(nn.BatchNorm2d, eps=1e-3))
    kwargs.setdefault("image_size", config.image_size)
    kwargs.setdefault("head_layers", config.head_layers)
    model = EfficientDet(EfficientDetBackbone(body, fpn), plan.num_classes, **kwargs)
    return plan.load_into(model, progress)


def _builder(variant: str):
    config = EFFICIENTDET_CONFIGS[variant]

    def build(*, weights=None, progress: bool = True, num_classes: int | None = None, weights_backbone=None,
              trainable_backbone_layers: int | None = None, **kwargs) -> EfficientDet:
        return _efficientdet(variant, weights=weights, progress=progress, num_classes=num_classes,
                             weights_backbone=weights_backbone, trainable_backbone_layers=trainable_backbone_layers,
                             **kwargs)

    build.__name__ = build.__qualname__ = f"efficientdet_{variant}"
    build.__doc__ = (
        f"EfficientDet-{variant.upper()}: EfficientNet-{config.backbone.upper()} backbone, {config.image_size} px "
        f"input, BiFPN of {config.bifpn_layers} layers x {config.bifpn_channels} channels, class/box nets of "
        f"{config.head_layers} layers (the paper's compound scaling).\n\n"
        f"    ``weights``: a ``.pth`` path or a state dict of this architecture (no published EfficientDet weights; "
        f"a name such as ``'DEFAULT'`` is an error); ``weights_backbone``: "
        f"``EfficientNet_B{config.backbone[1]}_Weights`` (enum, name, path or state dict; see "
        f":mod:`fastdet.models.weights`). ``num_classes`` defaults to 91. ``trainable_backbone_layers`` (0-8) counts "
        f"the EfficientNet stages from the last down (the stem is the eighth; default 8: all). ``norm_layer`` "
        f"(default ``BatchNorm2d``) is the backbone's norm. Other keyword arguments (``image_size``, ``head_layers``, "
        f"``bbox_loss_type``, ``nms_method``, ...) go to :class:`EfficientDet`.")
    return build


efficientdet_d0 = _builder("d0")
efficientdet_d1 = _builder("d1")
efficientdet_d2 = _builder("d2")
efficientdet_d3 = _builder("d3")
efficientdet_d4 = _builder("d4")
efficientdet_d5 = _builder("d5")
efficientdet_d6 = _builder("d6")
efficientdet_d7 = _builder("d7")
