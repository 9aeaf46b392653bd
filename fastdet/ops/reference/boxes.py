"""Reference box utilities and pairwise IoU family, in plain PyTorch.

These functions are the test oracle for :mod:`fastdet.ops.boxes`: they are written to be read, not to be fast, and
they are differentiable through ordinary autograd, so their gradients define what fastdet's hand-written backward
kernels must produce.

Semantics (those of torchvision 0.29.1, except where noted):

* Areas are ``(x2 - x1) * (y2 - y1)`` with no clamping, so an inverted box has a negative (or, inverted on both axes,
  positive) area. Only the sides of intersections and enclosing boxes are clamped at zero.
* ``IoU = inter / union`` is NaN where the union is zero (e.g. a zero-area box against itself); nothing is guarded.
* DIoU and CIoU add ``eps`` to the squared diagonal of the enclosing box only; CIoU's ``alpha`` carries no gradient.
* float16/bfloat16 boxes are converted to float32 *before* any arithmetic and the result is float32. This is where the
  reference deliberately differs from torchvision, which subtracts corner coordinates in the low-precision dtype for
  IoU and GIoU (DIoU and CIoU upcast first there too). fastdet computes in float32 throughout.
* ``[..., N, 4]`` and ``[..., M, 4]`` inputs give ``[..., N, M]``; the leading dimensions broadcast.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "box_area",
    "box_convert",
    "box_iou",
    "clip_boxes_to_image",
    "complete_box_iou",
    "distance_box_iou",
    "generalized_box_iou",
    "remove_small_boxes",
]

FORMATS = ("xyxy", "xywh", "cxcywh")
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _check_boxes(boxes: Tensor, name: str, min_dim: int = 1) -> None:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {boxes.dtype}")
    if boxes.dim() < min_dim or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4] with at least {min_dim} dims, got {tuple(boxes.shape)}")


def _check_format(fmt: str, name: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"{name} must be one of {FORMATS}, got {fmt!r}")


def _upcast(boxes: Tensor) -> Tensor:
    """float16/bfloat16 -> float32 (exact); float32/float64 unchanged."""
    return boxes.float() if boxes.dtype in _LOW_PRECISION else boxes


# --------------------------------------------------------------------------------------------------------------------
# Single-set utilities
# --------------------------------------------------------------------------------------------------------------------


def _to_xyxy(boxes: Tensor, fmt: str) -> Tensor:
    first, second, third, fourth = boxes.unbind(-1)
    if fmt == "xyxy":
        corners = (first, second, third, fourth)
    elif fmt == "xywh":
        corners = (first, second, first + third, second + fourth)
    else:  # cxcywh: centre +- half the size; 0.5 * w and w / 2 round identically
        corners = (first - 0.5 * third, second - 0.5 * fourth, first + 0.5 * third, second + 0.5 * fourth)
    return torch.stack(corners, dim=-1)


def _from_xyxy(boxes: Tensor, fmt: str) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    if fmt == "xyxy":
        values = (x1, y1, x2, y2)
    elif fmt == "xywh":
        values = (x1, y1, x2 - x1, y2 - y1)
    else:
        values = ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)
    return torch.stack(values, dim=-1)


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert ``boxes (Tensor[..., 4])`` between ``'xyxy'``, ``'xywh'`` and ``'cxcywh'``.

    Every conversion goes through ``xyxy`` in the input dtype, which is also how torchvision chains its conversions, so
    the results agree bit for bit. Equal formats give a copy, never the input itself.
    """
    _check_boxes(boxes, "boxes")
    _check_format(in_fmt, "in_fmt")
    _check_format(out_fmt, "out_fmt")
    if in_fmt == out_fmt:
        return boxes.clone()
    return _from_xyxy(_to_xyxy(boxes, in_fmt), out_fmt)


def box_area(boxes: Tensor, fmt: str = "xyxy") -> Tensor:
    """Area of ``boxes (Tensor[..., 4])`` -> ``Tensor[...]``; float32 for float16/bfloat16 boxes. For ``xywh`` and
    ``cxcywh`` the area is ``w * h`` straight from the stored sizes (no round trip through corners)."""
    _check_boxes(boxes, "boxes")
    _check_format(fmt, "fmt")
    boxes = _upcast(boxes)
    if fmt == "xyxy":
        return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return boxes[..., 2] * boxes[..., 3]


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clamp x coordinates of ``boxes (Tensor[..., 4])`` (xyxy) to ``[0, width]`` and y to ``[0, height]``, with
    ``size = (height, width)``. NaN stays NaN. The clamp uses scalar bounds, so a coordinate lying exactly on a bound
    gets torch's scalar-clamp gradient there (not the half-and-half split of an elementwise minimum)."""
    _check_boxes(boxes, "boxes")
    height, width = size
    x1, y1, x2, y2 = boxes.unbind(-1)
    clipped = (
        x1.clamp(min=0, max=width),
        y1.clamp(min=0, max=height),
        x2.clamp(min=0, max=width),
        y2.clamp(min=0, max=height),
    )
    return torch.stack(clipped, dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (int64, ascending) of the boxes whose width and height are both ``>= min_size``. For inputs with more
    than one leading dim the indices refer to the first dim only, as in torchvision. NaN sides fail the test."""
    _check_boxes(boxes, "boxes")
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    big_enough = (widths >= min_size) & (heights >= min_size)
    return torch.where(big_enough)[0]


# --------------------------------------------------------------------------------------------------------------------
# Pairwise IoU family
# --------------------------------------------------------------------------------------------------------------------


def _prepare_pair(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    _check_boxes(boxes1, "boxes1", min_dim=2)
    _check_boxes(boxes2, "boxes2", min_dim=2)
    if boxes1.device != boxes2.device:
        raise ValueError(f"boxes1 and boxes2 must be on the same device, got {boxes1.device} and {boxes2.device}")
    dtype = torch.promote_types(boxes1.dtype, boxes2.dtype)
    return _upcast(boxes1.to(dtype)), _upcast(boxes2.to(dtype))


def _rows(t: Tensor) -> Tensor:
    """[..., N] -> [..., N, 1]: a per-box quantity of boxes1, laid along the rows of the pair matrix."""
    return t.unsqueeze(-1)


def _cols(t: Tensor) -> Tensor:
    """[..., M] -> [..., 1, M]: a per-box quantity of boxes2, laid along the columns."""
    return t.unsqueeze(-2)


def _corners_and_area(boxes: Tensor, fmt: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Corners and area of each box, evaluated as torchvision evaluates them for ``fmt``: for the size-based formats
    the far corner is ``x + w`` (or ``cx + w/2``) and the area is ``w * h``, not recomputed from the corners."""
    x1, y1, x2, y2 = _to_xyxy(boxes, fmt).unbind(-1)
    area = box_area(boxes, fmt)
    return x1, y1, x2, y2, area


def _inter_union(boxes1: Tensor, boxes2: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    ax1, ay1, ax2, ay2, area1 = _corners_and_area(boxes1, fmt)
    bx1, by1, bx2, by2, area2 = _corners_and_area(boxes2, fmt)
    inter_w = (torch.minimum(_rows(ax2), _cols(bx2)) - torch.maximum(_rows(ax1), _cols(bx1))).clamp(min=0)
    inter_h = (torch.minimum(_rows(ay2), _cols(by2)) - torch.maximum(_rows(ay1), _cols(by1))).clamp(min=0)
    inter = inter_w * inter_h
    union = _rows(area1) + _cols(area2) - inter
    return inter, union


def _enclosure_sides(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Width and height of the smallest box enclosing each pair (xyxy inputs), clamped at zero."""
    ax1, ay1, ax2, ay2 = boxes1.unbind(-1)
    bx1, by1, bx2, by2 = boxes2.unbind(-1)
    width = (torch.maximum(_rows(ax2), _cols(bx2)) - torch.minimum(_rows(ax1), _cols(bx1))).clamp(min=0)
    height = (torch.maximum(_rows(ay2), _cols(by2)) - torch.minimum(_rows(ay1), _cols(by1))).clamp(min=0)
    return width, height


def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
    """Pairwise IoU of ``boxes1 (Tensor[..., N, 4])`` and ``boxes2 (Tensor[..., M, 4])`` -> ``Tensor[..., N, M]``."""
    _check_format(fmt, "fmt")
    boxes1, boxes2 = _prepare_pair(boxes1, boxes2)
    inter, union = _inter_union(boxes1, boxes2, fmt)
    return inter / union


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise GIoU, ``IoU - (C - U) / C`` with ``C`` the enclosing box's area and ``U`` the union (xyxy boxes)."""
    boxes1, boxes2 = _prepare_pair(boxes1, boxes2)
    inter, union = _inter_union(boxes1, boxes2, "xyxy")
    iou = inter / union
    enc_w, enc_h = _enclosure_sides(boxes1, boxes2)
    enclosure = enc_w * enc_h
    return iou - (enclosure - union) / enclosure


def _diou_and_iou(boxes1: Tensor, boxes2: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    inter, union = _inter_union(boxes1, boxes2, "xyxy")
    iou = inter / union
    enc_w, enc_h = _enclosure_sides(boxes1, boxes2)
    diagonal_sq = enc_w**2 + enc_h**2 + eps
    ax1, ay1, ax2, ay2 = boxes1.unbind(-1)
    bx1, by1, bx2, by2 = boxes2.unbind(-1)
    # centres are formed per box first, then differenced, which fixes the rounding order
    dx = _rows((ax1 + ax2) / 2) - _cols((bx1 + bx2) / 2)
    dy = _rows((ay1 + ay2) / 2) - _cols((by1 + by2) / 2)
    centre_dist_sq = dx**2 + dy**2
    return iou - centre_dist_sq / diagonal_sq, iou


def distance_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise DIoU, ``IoU - d^2 / (c^2 + eps)``: ``d`` the distance between the centres, ``c`` the diagonal of the
    enclosing box (xyxy boxes)."""
    boxes1, boxes2 = _prepare_pair(boxes1, boxes2)
    diou, _ = _diou_and_iou(boxes1, boxes2, eps)
    return diou


def complete_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise CIoU, ``DIoU - alpha * v`` with ``v = 4/pi^2 (atan(w1/h1) - atan(w2/h2))^2`` and
    ``alpha = v / (1 - IoU + v + eps)``. ``alpha`` is computed without gradient tracking (the CIoU paper's choice,
    followed by torchvision), so the gradient is *not* the derivative of the returned value."""
    boxes1, boxes2 = _prepare_pair(boxes1, boxes2)
    diou, iou = _diou_and_iou(boxes1, boxes2, eps)
    ax1, ay1, ax2, ay2 = boxes1.unbind(-1)
    bx1, by1, bx2, by2 = boxes2.unbind(-1)
    angle_gap = _rows(torch.atan((ax2 - ax1) / (ay2 - ay1))) - _cols(torch.atan((bx2 - bx1) / (by2 - by1)))
    v = (4 / math.pi**2) * angle_gap**2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return diou - alpha * v
