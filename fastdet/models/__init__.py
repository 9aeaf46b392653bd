"""Detection models built on :mod:`fastdet.ops`: transforms, backbones, necks, heads and detectors.

Layout: ``backbones/`` (resnet, mobilenet, darknet, vgg, efficientnet), ``necks/`` (fpn, pan, bifpn), ``heads/`` (rpn,
roi_heads, mask_head, retinanet_head, ssd_head, fcos_head, yolo_head, efficientdet_head), the shared utilities
``layers`` (frozen BN, conv blocks, initialisations), ``matching`` (the one Matcher, the fg/bg sampler), ``targets``
(padded ground truth), ``postprocess`` (image sizes, anchors, flattening, stable top-k, per-image split) and
``proposals`` (external region proposals: selective search, tables and files, checks, padding, and the detector base
on them), and one thin file per detector (faster_rcnn, mask_rcnn, fast_rcnn, sppnet, rcnn, retinanet, ssd, ssdlite,
yolo, fcos, efficientdet) holding the detector class and its builders."""

from fastdet.models.backbones import (
    BackboneWithFPN,
    FeaturePyramidNetwork,
    FrozenBatchNorm2d,
    LastLevelMaxPool,
    LastLevelP6P7,
    resnet,
    resnet_fpn_backbone,
)
from fastdet.models.faster_rcnn import (
    FasterRCNN,
    fasterrcnn_mobilenet_v3_large_320_fpn,
    fasterrcnn_mobilenet_v3_large_fpn,
    fasterrcnn_resnet18_fpn,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
)
from fastdet.models.transform import DetectionTransform, ImageBatch

__all__ = [
    "BackboneWithFPN",
    "DetectionTransform",
    "FasterRCNN",
    "FeaturePyramidNetwork",
    "FrozenBatchNorm2d",
    "ImageBatch",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "LastLevelMaxPool",
    "LastLevelP6P7",
    "fasterrcnn_resnet18_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "resnet",
    "resnet_fpn_backbone",
]

from fastdet.models.yolo import YOLO, yolo, yolo_m, yolo_n, yolo_s  # noqa: E402

__all__ += ["YOLO", "yolo", "yolo_m", "yolo_n", "yolo_s"]

from fastdet.models.retinanet import (  # noqa: E402
    RetinaNet,
    retinanet_resnet18_fpn,
    retinanet_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
)
from fastdet.models.ssd import SSD, ssd300_vgg16, ssd300_vgg16_light  # noqa: E402
from fastdet.models.fcos import FCOS, fcos_resnet50_fpn  # noqa: E402
from fastdet.models.ssdlite import ssdlite320_mobilenet_v3_large  # noqa: E402

from fastdet.models.mask_rcnn import (  # noqa: E402
    MaskRCNN,
    maskrcnn_resnet18_fpn,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)

__all__ += ["MaskRCNN", "maskrcnn_resnet18_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2"]
__all__ += ["RetinaNet", "retinanet_resnet18_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "SSD",
            "ssd300_vgg16", "ssd300_vgg16_light", "FCOS", "fcos_resnet50_fpn",
            "ssdlite320_mobilenet_v3_large"]

# The detector builders, all with torchvision's keyword-only signature (weights, progress, num_classes with the
# background included, weights_backbone, trainable_backbone_layers, **kwargs; see fastdet.models.weights): what
# `fastdet train --model` accepts.
DETECTOR_BUILDERS = (
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet18_fpn", "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2", "retinanet_resnet18_fpn", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large",
    "ssd300_vgg16_light", "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn_v2",
    "maskrcnn_resnet18_fpn", "yolo", "yolo_n", "yolo_s", "yolo_m",
)
__all__ += ["DETECTOR_BUILDERS"]

from fastdet.models.efficientdet import (  # noqa: E402
    EfficientDet,
    efficientdet_d0,
    efficientdet_d1,
    efficientdet_d2,
    efficientdet_d3,
    efficientdet_d4,
    efficientdet_d5,
    efficientdet_d6,
    efficientdet_d7,
)

__all__ += ["EfficientDet"] + [f"efficientdet_d{i}" for i in range(8)]
DETECTOR_BUILDERS += tuple(f"efficientdet_d{i}" for i in range(8))

from fastdet.models.rcnn import RCNN, rcnn_resnet18, rcnn_resnet50  # noqa: E402

__all__ += ["RCNN", "rcnn_resnet18", "rcnn_resnet50"]
DETECTOR_BUILDERS += ("rcnn_resnet18", "rcnn_resnet50")

from fastdet.models.fast_rcnn import FastRCNN, fast_rcnn_resnet18_fpn, fast_rcnn_resnet50_fpn  # noqa: E402
from fastdet.models.sppnet import SPPNet, sppnet_resnet18, sppnet_resnet50  # noqa: E402

__all__ += ["FastRCNN", "fast_rcnn_resnet18_fpn", "fast_rcnn_resnet50_fpn", "SPPNet", "sppnet_resnet18",
            "sppnet_resnet50"]
DETECTOR_BUILDERS += ("fast_rcnn_resnet50_fpn", "fast_rcnn_resnet18_fpn", "sppnet_resnet50", "sppnet_resnet18")
