"""Detection models built on :mod:`fastdet.ops`: transforms, backbones, necks, heads and detectors."""

from fastdet.models.backbones import (
    BackboneWithFPN,
    FeaturePyramidNetwork,
    FrozenBatchNorm2d,
    LastLevelMaxPool,
    LastLevelP6P7,
    resnet,
    resnet_fpn_backbone,
)
from fastdet.models.faster_rcnn import FasterRCNN, fasterrcnn_resnet18_fpn, fasterrcnn_resnet50_fpn
from fastdet.models.transform import DetectionTransform, ImageBatch

__all__ = [
    "BackboneWithFPN",
    "DetectionTransform",
    "FasterRCNN",
    "FeaturePyramidNetwork",
    "FrozenBatchNorm2d",
    "ImageBatch",
    "LastLevelMaxPool",
    "LastLevelP6P7",
    "fasterrcnn_resnet18_fpn",
    "fasterrcnn_resnet50_fpn",
    "resnet",
    "resnet_fpn_backbone",
]

from fastdet.models.yolo import YOLO, yolo, yolo_m, yolo_n, yolo_s  # noqa: E402

__all__ += ["YOLO", "yolo", "yolo_m", "yolo_n", "yolo_s"]

from fastdet.models.retinanet import RetinaNet, retinanet_resnet18_fpn, retinanet_resnet50_fpn  # noqa: E402
from fastdet.models.ssd import SSD, ssd300_vgg16, ssd300_vgg16_light  # noqa: E402

__all__ += ["RetinaNet", "retinanet_resnet18_fpn", "retinanet_resnet50_fpn", "SSD", "ssd300_vgg16",
            "ssd300_vgg16_light"]

# The detector builders (each takes num_classes, background included): what `fastdet train --model` accepts.
DETECTOR_BUILDERS = (
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet18_fpn", "retinanet_resnet50_fpn", "retinanet_resnet18_fpn",
    "ssd300_vgg16", "ssd300_vgg16_light", "yolo", "yolo_n", "yolo_s", "yolo_m",
)
__all__ += ["DETECTOR_BUILDERS"]
