"""torchvision-compatible detection ops backed by fastdet's native kernels."""

from fastdet.ops.boxes import (
    box_area,
    box_convert,
    box_iou,
    clip_boxes_to_image,
    complete_box_iou,
    distance_box_iou,
    generalized_box_iou,
    remove_small_boxes,
)
from fastdet.ops.nms import batched_nms, multiclass_nms, nms, nms_fixed
from fastdet.ops.anchors import (
    AnchorGenerator,
    DefaultBoxGenerator,
    generate_anchors,
    ssd_default_boxes,
    yolo_grid_priors,
)
from fastdet.ops.box_coder import BoxCoder, box_decode, box_encode, decode_and_select

__all__ = [
    "AnchorGenerator",
    "BoxCoder",
    "DefaultBoxGenerator",
    "box_decode",
    "box_encode",
    "decode_and_select",
    "generate_anchors",
    "ssd_default_boxes",
    "yolo_grid_priors",
    "batched_nms",
    "box_area",
    "box_convert",
    "box_iou",
    "clip_boxes_to_image",
    "complete_box_iou",
    "distance_box_iou",
    "generalized_box_iou",
    "multiclass_nms",
    "nms",
    "nms_fixed",
    "remove_small_boxes",
]
