"""Mask ops of Mask R-CNN: ``paste_masks_in_image`` (inference) and ``project_masks_on_boxes`` (training targets).

Drop-ins for torchvision's ``torchvision.models.detection.roi_heads.paste_masks_in_image`` and
``project_masks_on_boxes``, computed in one native pass over all detections:

* ``paste_masks_in_image`` writes every pixel of the ``[N, 1, H, W]`` output once. torchvision loops over the
  detections in Python, resizing each mask to its full box (a temporary as large as the box) before pasting it into
  its own zeroed image; fastdet allocates nothing but the output.
* ``project_masks_on_boxes`` reads bool/uint8 ground-truth masks directly; torchvision converts every mask of the
  image to a float copy of the full image size before ``roi_align``.

Neither op is differentiable (both are outside the autograd graph in Mask R-CNN: the pasted masks are post-processed
probabilities and the projected masks are targets).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdet.ops._errors import TensorShapeError, TensorTypeError
from fastdet.ops._registry import native, register_fake

__all__ = ["paste_masks_in_image", "project_masks_on_boxes"]


def _image_shape(image_shape) -> tuple[int, int]:
    try:
        height, width = image_shape
        return int(height), int(width)
    except (TypeError, ValueError):
        raise TypeError(f"image_shape must be a pair (height, width) of ints, got {image_shape!r}") from None


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int], padding: int = 1) -> Tensor:
    """Paste each detection's mask into an image-sized canvas, as torchvision's Mask R-CNN post-processing does.

    Args:
        masks (Tensor[N, 1, M, M] or Tensor[N, M, M]): per-detection masks (probabilities, any floating dtype).
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes in image pixels, any floating dtype.
        image_shape ((int, int)): ``(height, width)`` of the output canvas.
        padding (int): zero border added around each mask; the box grows by the same factor
            ``(M + 2 * padding) / M`` about its centre, so the mask's edge falls off smoothly instead of being cut.

    Returns:
        Tensor[N, 1, height, width] in ``masks``' dtype: zero outside each detection's pasted patch.

    Semantics are torchvision's (0.29): the grown box is truncated to integers ``(b0, b1, b2, b3)``; the padded mask
    is resized to ``max(b3 - b1 + 1, 1) x max(b2 - b0 + 1, 1)`` pixels with bilinear interpolation
    (``align_corners=False``) and written with its top-left pixel at ``(b0, b1)``, clipped to the image. The
    interpolation arithmetic is that of torch's CPU ``interpolate`` (fused multiply-adds as the x86-64 build
    compiles them): float32 results are bitwise torchvision's for patches with ``h + w > 128``, where torch uses its
    generic kernel, and within an ulp or two for smaller patches (torch switches to another kernel there). The CPU and
    CUDA kernels of fastdet agree bitwise. Where torchvision fails, results are defined: a box whose grown patch lies
    entirely outside the image, or that has a NaN/Inf (or beyond 2^52) coordinate, pastes nothing (torchvision
    raises or pastes a wrapped-around slice).
    """
    if not isinstance(masks, Tensor) or not isinstance(boxes, Tensor):
        raise TypeError("masks and boxes must be torch.Tensors")
    if not masks.is_floating_point():
        raise TensorTypeError(f"masks must be a floating-point tensor, got dtype {masks.dtype}")
    if not boxes.is_floating_point():
        raise TensorTypeError(f"boxes must be a floating-point tensor, got dtype {boxes.dtype}")
    if not (masks.dim() == 3 or (masks.dim() == 4 and masks.shape[1] == 1)):
        raise TensorShapeError(f"masks must have shape [N, 1, M, M] or [N, M, M], got {tuple(masks.shape)}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or boxes.shape[0] != masks.shape[0]:
        raise TensorShapeError(f"boxes must have shape [N, 4] with N = {masks.shape[0]} (one per mask), got "
                               f"{tuple(boxes.shape)}")
    height, width = _image_shape(image_shape)
    if height < 0 or width < 0:
        raise ValueError(f"image_shape must be non-negative, got {(height, width)}")
    if int(padding) < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    return native("paste_masks_in_image")(masks, boxes, height, width, int(padding))


# Fake kernel: the output shape follows from the arguments alone.
@register_fake("paste_masks_in_image")
def _paste_masks_in_image_fake(masks, boxes, height, width, padding=1):
    return masks.new_empty((masks.shape[0], 1, height, width))


def project_masks_on_boxes(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, M: int) -> Tensor:
    """Mask R-CNN's mask targets: each proposal's matched ground-truth mask resampled to ``M x M`` over the proposal.

    Args:
        gt_masks (Tensor[G, H, W]): one image's ground-truth instance masks, bool, uint8 or floating (uint8 values are
            used as numbers, as torchvision's float conversion does: COCO masks hold 0/1).
        boxes (Tensor[P, 4]): proposals ``(x1, y1, x2, y2)`` in the masks' pixel coordinates.
        matched_idxs (Tensor[P]): integer index into ``gt_masks`` of each proposal's ground truth.
        M (int): output side.

    Returns:
        Tensor[P, M, M] in ``boxes``' dtype (computed in float32, float64 for float64 boxes), equal to torchvision's
        ``roi_align(gt_masks[:, None].to(boxes), rois, (M, M), 1.0)`` (adaptive sampling, ``aligned=False``): bitwise
        on the CPU for float32/float64 boxes. A ``matched_idxs`` value outside ``[0, G)`` is a ``RuntimeError`` on the
        CPU; on CUDA (where checking would synchronise) that proposal's target is 0.
    """
    if not isinstance(gt_masks, Tensor) or not isinstance(boxes, Tensor) or not isinstance(matched_idxs, Tensor):
        raise TypeError("gt_masks, boxes and matched_idxs must be torch.Tensors")
    if gt_masks.dtype not in (torch.bool, torch.uint8) and not gt_masks.is_floating_point():
        raise TensorTypeError(f"gt_masks must be a bool, uint8 or floating-point tensor, got dtype {gt_masks.dtype}")
    if gt_masks.dim() != 3:
        raise TensorShapeError(f"gt_masks must have shape [G, H, W], got {tuple(gt_masks.shape)}")
    if not boxes.is_floating_point():
        raise TensorTypeError(f"boxes must be a floating-point tensor, got dtype {boxes.dtype}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise TensorShapeError(f"boxes must have shape [P, 4], got {tuple(boxes.shape)}")
    if matched_idxs.is_floating_point() or matched_idxs.is_complex() or matched_idxs.dtype == torch.bool:
        raise TensorTypeError(f"matched_idxs must be an integer tensor, got dtype {matched_idxs.dtype}")
    if matched_idxs.dim() != 1 or matched_idxs.shape[0] != boxes.shape[0]:
        raise TensorShapeError(f"matched_idxs must have shape [P] with P = {boxes.shape[0]}, got "
                               f"{tuple(matched_idxs.shape)}")
    return native("project_masks_on_boxes")(gt_masks, boxes, matched_idxs, int(M))


@register_fake("project_masks_on_boxes")
def _project_masks_on_boxes_fake(gt_masks, boxes, matched_idxs, M):
    return boxes.new_empty((boxes.shape[0], M, M))
