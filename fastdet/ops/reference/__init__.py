"""Pure-PyTorch reference implementations of fastdet's ops: the test oracle.

Readable, differentiable through plain autograd, independent of the native extension (they work when ``fastdet._C``
failed to load) and of torchvision. Nothing here calls ``torch.ops.fastdet``.
"""

from fastdet.ops.reference.boxes import (
    box_area,
    box_convert,
    box_iou,
    clip_boxes_to_image,
    complete_box_iou,
    distance_box_iou,
    generalized_box_iou,
    remove_small_boxes,
)
from fastdet.ops.reference.nms import batched_nms, multiclass_nms, nms, nms_fixed
from fastdet.ops.reference.losses import (
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
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
    "complete_box_iou_loss",
    "distance_box_iou_loss",
    "generalized_box_iou_loss",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_with_labels",
    "smooth_l1_loss",
]
