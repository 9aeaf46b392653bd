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
from fastdet.ops.losses import (
    ciou_loss,
    complete_box_iou_loss,
    diou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
    giou_loss,
    sigmoid_focal_loss,
    sigmoid_focal_loss_with_labels,
    smooth_l1_loss,
)

__all__ = [
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
    "ciou_loss",
    "complete_box_iou_loss",
    "diou_loss",
    "distance_box_iou_loss",
    "generalized_box_iou_loss",
    "giou_loss",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_with_labels",
    "smooth_l1_loss",
]
