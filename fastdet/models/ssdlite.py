"""SSDlite320 with a MobileNetV3-Large backbone (torchvision's ``ssdlite320_mobilenet_v3_large``): the
:class:`fastdet.models.ssd.SSD` detector (same matching, hard-negative-mining loss and batched selection) with
depthwise-separable prediction heads and SSDlite's MobileNetV3 feature extractor, torchvision's state-dict keys."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn

from fastdet import ops
from fastdet.models.backbones.mobilenet import SSDLiteFeatureExtractor, freeze_mobilenet_stages, mobilenet_v3_large
from fastdet.models.heads.ssd_head import SSDLiteClassificationHead, SSDLiteHead, SSDLiteRegressionHead
from fastdet.models.layers import normal_init
from fastdet.models.postprocess import probe_out_channels
from fastdet.models.ssd import SSD
from fastdet.models.weights import plan_build

__all__ = ["SSDLiteClassificationHead", "SSDLiteHead", "SSDLiteRegressionHead", "ssdlite320_mobilenet_v3_large"]


def ssdlite320_mobilenet_v3_large(*, weights=None, progress: bool = True, num_classes: int | None = None,
                                  weights_backbone="IMAGENET1K_V1", trainable_backbone_layers: int | None = None,
                                  norm_layer: Callable[[int], nn.Module] | None = None,
                                  reduced_tail: bool | None = None, **kwargs) -> SSD:
    """SSDlite320 on MobileNetV3-Large: torchvision's ``ssdlite320_mobilenet_v3_large`` (signature, defaults, default
    boxes, normalisation to [-1, 1], state-dict keys).

    ``weights``: ``SSDLite320_MobileNet_V3_Large_Weights`` (enum or name), a ``.pth`` path or a state dict.
    ``weights_backbone`` defaults to ``MobileNet_V3_Large_Weights.IMAGENET1K_V1`` as in torchvision (the file must
    be in the hub cache, see :mod:`fastdet.models.weights`); without it the backbone's last stage is halved
    (``reduced_tail``, the paper's Table 6) and initialised N(0, 0.03), as torchvision does.
    ``trainable_backbone_layers`` in [0, 6], default 6. ``norm_layer``: default ``BatchNorm2d(eps=0.001,
    momentum=0.03)``. ``reduced_tail`` (fastdet extra): None = torchvision's rule (reduced without backbone weights).
    Other keyword arguments go to :class:`fastdet.models.ssd.SSD` (torchvision's defaults here:
    score 0.001, NMS 0.55, 300 candidates and detections)."""
    if "size" in kwargs:
        raise ValueError("SSDlite320's input size is fixed at (320, 320); do not pass size")
    plan = plan_build("SSDLite320_MobileNet_V3_Large_Weights", "MobileNet_V3_Large_Weights", weights=weights,
                      weights_backbone=weights_backbone, num_classes=num_classes,
                      trainable_backbone_layers=trainable_backbone_layers, max_trainable_layers=6,
                      default_trainable_layers=6, progress=progress,
                      norm_layer=norm_layer or partial(nn.BatchNorm2d, eps=0.001, momentum=0.03))
    backbone_weights = plan.backbone_state_dict(progress)
    if reduced_tail is None:
        reduced_tail = backbone_weights is None
    network = mobilenet_v3_large(norm_layer=plan.norm_layer, reduced_tail=reduced_tail)
    if backbone_weights is None:
        normal_init(network)
    else:
        network.load_state_dict(backbone_weights)
    stages = freeze_mobilenet_stages(network.features, plan.trainable_backbone_layers)
    backbone = SSDLiteFeatureExtractor(network.features, stages[-2], plan.norm_layer)
    backbone.reduced_tail = reduced_tail  # an architecture choice a rebuild must repeat (weights.rebuild_kwargs)
    size = (320, 320)
    anchor_generator = ops.DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    out_channels = probe_out_channels(backbone, size)
    defaults = {"score_thresh": 0.001, "nms_thresh": 0.55, "detections_per_img": 300, "topk_candidates": 300,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    head = SSDLiteHead(out_channels, anchor_generator.num_anchors_per_location(), plan.num_classes, plan.norm_layer)
    model = SSD(backbone, anchor_generator, size, plan.num_classes, head=head, **{**defaults, **kwargs})
    return plan.load_into(model, progress)
