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
from fastdet.ops.roi import MultiScaleRoIAlign, RoIAlign, RoIPool, multi_scale_roi_align, roi_align, roi_pool

__all__ = [
    "MultiScaleRoIAlign",
    "RoIAlign",
    "RoIPool",
    "batched_nms",
    "box_area",
    "box_convert",
    "box_iou",
    "clip_boxes_to_image",
    "complete_box_iou",
    "distance_box_iou",
    "generalized_box_iou",
    "multi_scale_roi_align",
    "multiclass_nms",
    "nms",
    "nms_fixed",
    "remove_small_boxes",
    "roi_align",
    "roi_pool",
]
