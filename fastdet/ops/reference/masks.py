"""Reference mask ops: readable pure PyTorch, one detection at a time (the oracle for fastdet.ops.masks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdet.ops.reference.roi import roi_align

__all__ = ["paste_masks_in_image", "project_masks_on_boxes"]


def _expanded_int_boxes(boxes: Tensor, scale: float) -> Tensor:
    # Grow each box about its centre by `scale`, in the box dtype, then truncate towards zero.
    half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    cx = (boxes[:, 2] + boxes[:, 0]) * 0.5
    cy = (boxes[:, 3] + boxes[:, 1]) * 0.5
    grown = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)
    return grown, grown.to(torch.int64)


def paste_masks_in_image(masks: Tensor, boxes: Tensor, image_shape: tuple[int, int], padding: int = 1) -> Tensor:
    """Each mask zero-padded by ``padding``, resized bilinearly to its grown integer box and written into an empty
    image; the parts outside the image are dropped (a box entirely outside, or with a non-finite coordinate, pastes
    nothing)."""
    if masks.dim() == 4:
        masks = masks[:, 0]
    height, width = int(image_shape[0]), int(image_shape[1])
    out = masks.new_zeros((masks.shape[0], 1, height, width))
    if masks.shape[0] == 0:
        return out
    m = masks.shape[-1]
    scale = float(m + 2 * padding) / m
    padded = F.pad(masks, (padding,) * 4)
    grown, ints = _expanded_int_boxes(boxes, scale)
    finite = grown.isfinite().all(dim=1) & (grown.abs() < 2.0**52).all(dim=1)
    for i in range(masks.shape[0]):
        if not bool(finite[i]):
            continue
        x0, y0, x1, y1 = (int(v) for v in ints[i])
        w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)
        left, top = max(x0, 0), max(y0, 0)
        right, bottom = min(x0 + w, width), min(y0 + h, height)
        if right <= left or bottom <= top:
            continue
        resized = F.interpolate(padded[i][None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        out[i, 0, top:bottom, left:right] = resized[top - y0 : bottom - y0, left - x0 : right - x0]
    return out


def project_masks_on_boxes(gt_masks: Tensor, boxes: Tensor, matched_idxs: Tensor, M: int) -> Tensor:
    """RoIAlign (output M x M, spatial scale 1, adaptive sampling, aligned=False) of the matched ground-truth mask
    over each box, on a float copy of the masks."""
    rois = torch.cat([matched_idxs.to(boxes)[:, None], boxes], dim=1)
    return roi_align(gt_masks[:, None].to(boxes), rois, (M, M), 1.0, -1, False)[:, 0]
