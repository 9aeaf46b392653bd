"""Rotated boxes: format conversion, pairwise rotated IoU, and rotated NMS.

Formats (torchvision 0.29's):

* ``'cxcywhr'``: ``(cx, cy, w, h, r)``, centre, width, height and an angle ``r`` in degrees, counter-clockwise in the
  image plane (y pointing down): the top edge of a box with ``r = 90`` points up the image.
* ``'xywhr'``: ``(x1, y1, w, h, r)`` with ``(x1, y1)`` the box's top-left corner (before rotation, rotated with it).
* ``'xyxyxyxy'``: the four corners ``(x1, y1, ..., x4, y4)``: top-left, top-right, bottom-right, bottom-left.

``box_convert`` and ``box_iou(..., fmt=)`` in :mod:`fastdet.ops.boxes` accept these formats and land here.
:func:`nms_rotated` and :func:`batched_nms_rotated` go past torchvision (detectron2 and mmcv have them): the visit order
and threshold rule of :func:`fastdet.ops.nms` with the rotated IoU, categories separated inside the kernel.
"""

from __future__ import annotations


import torch
from torch import Tensor

from fastdet.ops._pairwise import call_pairwise
from fastdet.ops._registry import native, register_fake
from fastdet.ops.nms import _check_same_device, _check_tensor, _check_threshold, _kept_count

__all__ = ["batched_nms_rotated", "box_iou_rotated", "nms_rotated"]

ROTATED_FORMATS = ("xywhr", "cxcywhr", "xyxyxyxy")
_SIZES = {"xywhr": 5, "cxcywhr": 5, "xyxyxyxy": 8}


def _check_rotated(boxes, fmt: str, name: str, min_dim: int = 1) -> None:
    _check_tensor(boxes, name)
    if boxes.dtype == torch.bool or boxes.is_complex():
        raise TypeError(f"{name} must be a real floating-point or integer tensor, got dtype {boxes.dtype}")
    k = _SIZES[fmt]
    if boxes.dim() < min_dim or boxes.shape[-1] != k:
        lead = "N, " if min_dim >= 2 else ""
        raise ValueError(f"{name} in format {fmt!r} must have shape [..., {lead}{k}], got {tuple(boxes.shape)}")


# Conversions, written as torchvision 0.29 writes them (same operations in the same order and dtype), so results match
# it bit for bit. Integer boxes are converted in floating point and rounded back to their dtype at each step.
def _finish(boxes: Tensor, dtype: torch.dtype) -> Tensor:
    if not dtype.is_floating_point:
        return boxes.round().to(dtype)
    return boxes


def _cxcywhr_to_xywhr(boxes: Tensor) -> Tensor:
    cx, cy, w, h, r = boxes.unbind(-1)
    rad = r * torch.pi / 180.0
    cos, sin = torch.cos(rad), torch.sin(rad)
    x1 = cx - w / 2 * cos - h / 2 * sin
    y1 = cy - h / 2 * cos + w / 2 * sin
    return _finish(torch.stack((x1, y1, w, h, r), dim=-1), boxes.dtype)


def _xywhr_to_cxcywhr(boxes: Tensor) -> Tensor:
    x1, y1, w, h, r = boxes.unbind(-1)
    rad = r * torch.pi / 180.0
    cos, sin = torch.cos(rad), torch.sin(rad)
    cx = x1 + w / 2 * cos + h / 2 * sin
    cy = y1 - w / 2 * sin + h / 2 * cos
    return _finish(torch.stack((cx, cy, w, h, r), dim=-1), boxes.dtype)


def _xywhr_to_xyxyxyxy(boxes: Tensor) -> Tensor:
    x1, y1, w, h, r = boxes.unbind(-1)
    rad = r * torch.pi / 180.0
    cos, sin = torch.cos(rad), torch.sin(rad)
    x2 = x1 + w * cos
    y2 = y1 - w * sin
    x3 = x2 + h * sin
    y3 = y2 + h * cos
    x4 = x1 + h * sin
    y4 = y1 + h * cos
    return _finish(torch.stack((x1, y1, x2, y2, x3, y3, x4, y4), dim=-1), boxes.dtype)


def _xyxyxyxy_to_xywhr(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2, x3, y3, _, _ = boxes.unbind(-1)
    r = torch.atan2(y1 - y2, x2 - x1) * 180 / torch.pi
    w = ((x2 - x1) ** 2 + (y1 - y2) ** 2).sqrt()
    h = ((x3 - x2) ** 2 + (y3 - y2) ** 2).sqrt()
    return _finish(torch.stack((x1, y1, w, h, r), dim=-1), boxes.dtype)


_STEPS = {
    ("cxcywhr", "xywhr"): (_cxcywhr_to_xywhr,),
    ("xywhr", "cxcywhr"): (_xywhr_to_cxcywhr,),
    ("xywhr", "xyxyxyxy"): (_xywhr_to_xyxyxyxy,),
    ("xyxyxyxy", "xywhr"): (_xyxyxyxy_to_xywhr,),
    ("cxcywhr", "xyxyxyxy"): (_cxcywhr_to_xywhr, _xywhr_to_xyxyxyxy),
    ("xyxyxyxy", "cxcywhr"): (_xyxyxyxy_to_xywhr, _xywhr_to_cxcywhr),
}


def convert_rotated(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """``box_convert`` between the rotated formats (called by :func:`fastdet.ops.box_convert`). Converting between an
    axis-aligned and a rotated format raises NotImplementedError, as in torchvision; an unknown format ValueError."""
    known = ("xyxy", "xywh", "cxcywh", *ROTATED_FORMATS)
    for name, fmt in (("in_fmt", in_fmt), ("out_fmt", out_fmt)):
        if fmt not in known:
            raise ValueError(f"{name} must be one of {known}, got {fmt!r}")
    if in_fmt not in ROTATED_FORMATS or out_fmt not in ROTATED_FORMATS:
        raise NotImplementedError(
            f"box_convert between an axis-aligned and a rotated format is not supported (as in torchvision): "
            f"in_fmt {in_fmt!r}, out_fmt {out_fmt!r}"
        )
    _check_rotated(boxes, in_fmt, "boxes")
    if in_fmt == out_fmt:
        return boxes.clone()
    for step in _STEPS[(in_fmt, out_fmt)]:
        boxes = step(boxes)
    return boxes


def _to_cxcywhr(boxes: Tensor, fmt: str) -> Tensor:
    # Integer and low-precision boxes are converted in float32 (the kernel's computation type): converting first in
    # float16 would round the corners to float16.
    if not boxes.is_floating_point() or boxes.dtype in (torch.float16, torch.bfloat16):
        boxes = boxes.float()
    return boxes if fmt == "cxcywhr" else convert_rotated(boxes, fmt, "cxcywhr")


def box_iou_rotated(boxes1: Tensor, boxes2: Tensor, fmt: str = "cxcywhr") -> Tensor:
    """Pairwise IoU of rotated boxes; ``box_iou(boxes1, boxes2, fmt=<rotated format>)`` lands here.

    Args:
        boxes1 (Tensor[..., N, K]): K = 5 for ``'cxcywhr'`` / ``'xywhr'``, 8 for ``'xyxyxyxy'``.
        boxes2 (Tensor[..., M, K]): leading dims broadcast against boxes1's; ``[B, N, K] x [B, M, K]`` runs in one
            kernel launch.
        fmt (str): ``'cxcywhr'`` (default), ``'xywhr'`` or ``'xyxyxyxy'``.

    Returns:
        Tensor[..., N, M] float32 (torchvision's result dtype for every input dtype): the exact area of the
        intersection polygon over the union, computed in float32 (float64 for float64 boxes). Boxes of area below
        1e-14 (zero-size, or negative width or height) have IoU 0 with everything, as in torchvision.

    Differences from torchvision: float16/bfloat16 and integer boxes are accepted (converted to float32; torchvision
    raises), batched and broadcast leading dims are accepted (torchvision takes [N, 5] only), and float32 results are
    accurate to a few float32 ulps, where torchvision's float32 kernel is occasionally off by several percent for
    near-degenerate intersection polygons (its float64 results agree with fastdet's to ~1e-7). Not differentiable.
    """
    if fmt not in ROTATED_FORMATS:
        raise ValueError(f"fmt must be one of {ROTATED_FORMATS} for rotated boxes, got {fmt!r}")
    _check_rotated(boxes1, fmt, "boxes1", min_dim=2)
    _check_rotated(boxes2, fmt, "boxes2", min_dim=2)
    if boxes1.device != boxes2.device:
        raise ValueError(f"boxes1 and boxes2 must be on the same device, got {boxes1.device} and {boxes2.device}")
    boxes1, boxes2 = _to_cxcywhr(boxes1, fmt), _to_cxcywhr(boxes2, fmt)
    return call_pairwise(native("box_iou_rotated"), boxes1, boxes2)


def nms_rotated(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy non-maximum suppression of rotated boxes.

    Args:
        boxes (Tensor[N, 5]): ``(cx, cy, w, h, angle)`` boxes (``'cxcywhr'``, degrees counter-clockwise),
            float16/bfloat16/float32/float64.
        scores (Tensor[N]): a score per box.
        iou_threshold (float): boxes overlapping a kept, higher-scoring box with rotated IoU > iou_threshold are
            discarded.

    Returns:
        Tensor[K] int64: indices of the kept boxes, by decreasing score (ties: increasing index).

    The rules are :func:`fastdet.ops.nms`'s: the stable visit order, IoU strictly above the threshold (compared
    exactly against the float64 threshold) suppresses, NaN IoU never does; IoU in float32 (float64 for float64
    boxes), with :func:`box_iou_rotated`'s arithmetic.
    """
    _check_tensor(boxes, "boxes")
    _check_tensor(scores, "scores")
    _check_same_device(boxes=boxes, scores=scores)
    return native("nms_rotated")(boxes, scores, _check_threshold(iou_threshold, "iou_threshold"))


def batched_nms_rotated(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """:func:`nms_rotated` within each category: boxes of different categories (``idxs (Tensor[N])``, integers)
    never suppress each other. Categories are separated inside the kernel (no coordinate offsets), with no Python
    loop. Returns kept indices (Tensor[K] int64) by decreasing score (ties: increasing index)."""
    _check_tensor(boxes, "boxes")
    _check_tensor(scores, "scores")
    _check_tensor(idxs, "idxs")
    _check_same_device(boxes=boxes, scores=scores, idxs=idxs)
    return native("batched_nms_rotated")(boxes, scores, idxs, _check_threshold(iou_threshold, "iou_threshold"))


# Fake kernels, for torch.compile and export.
@register_fake("box_iou_rotated")
def _box_iou_rotated_fake(boxes1, boxes2):
    torch._check(boxes1.dim() == boxes2.dim() and boxes1.dim() in (2, 3))
    return boxes1.new_empty((*boxes1.shape[:-1], boxes2.shape[-2]), dtype=torch.float32)


@register_fake("_box_iou_rotated_kernel")
def _box_iou_rotated_kernel_fake(boxes1, boxes2):
    return boxes1.new_empty((*boxes1.shape[:-1], boxes2.shape[-2]), dtype=torch.float32)


# nms_rotated / batched_nms_rotated return a data-dependent number of indices: an unbacked symint in [0, N].
def _kept_indices_fake(boxes):
    torch._check(boxes.dim() == 2 and boxes.shape[-1] == 5)
    return boxes.new_empty((_kept_count(boxes),), dtype=torch.int64)


@register_fake("nms_rotated")
def _nms_rotated_fake(boxes, scores, iou_threshold):
    return _kept_indices_fake(boxes)


@register_fake("batched_nms_rotated")
def _batched_nms_rotated_fake(boxes, scores, idxs, iou_threshold):
    return _kept_indices_fake(boxes)


@register_fake("_nms_rotated_keep_flags")
def _nms_rotated_keep_flags_fake(boxes, categories, iou_threshold):
    return boxes.new_empty(boxes.shape[:-1], dtype=torch.bool)
