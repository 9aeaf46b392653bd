"""Box utilities and the pairwise IoU family.

All boxes are ``(x1, y1, x2, y2)`` unless a ``fmt`` argument says otherwise, with ``x1 <= x2`` and ``y1 <= y2`` for
well-formed boxes. Degenerate boxes (``x2 < x1``) are accepted and follow torchvision's arithmetic: their area is
negative, intersections are clamped at zero.
"""

from __future__ import annotations


import torch
from torch import Tensor

from fastdet.ops import rotated as _rotated
from fastdet.ops._errors import BoxesShapeError, TensorShapeError
from fastdet.ops._pairwise import call_pairwise
from fastdet.ops._registry import native, register_autograd, register_fake

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

_IOU, _GIOU, _DIOU, _CIOU = 0, 1, 2, 3
_AXIS_ALIGNED_FORMATS = ("xyxy", "xywh", "cxcywh")


def _check_box_tensor(boxes: Tensor, name: str, min_dim: int = 1, shape_error: type = BoxesShapeError) -> None:
    # Integer (and bool) boxes are accepted, as torchvision does; complex ones are not. A wrong shape raises a
    # ValueError that is also what torchvision raises for it (an IndexError from its indexing, unless said otherwise).
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.is_complex():
        raise TypeError(f"{name} must be a real (floating-point or integer) tensor, got dtype {boxes.dtype}")
    if boxes.dim() < min_dim or boxes.shape[-1] != 4:
        raise shape_error(f"{name} must have shape [..., 4], got {tuple(boxes.shape)}")


def _check_format(fmt: str, name: str, rotated_too: bool = False) -> None:
    if fmt not in _AXIS_ALIGNED_FORMATS:
        allowed = _AXIS_ALIGNED_FORMATS + (tuple(_rotated.ROTATED_FORMATS) if rotated_too else ())
        raise ValueError(f"{name} must be one of {allowed}, got {fmt!r}")


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert ``boxes (Tensor[..., 4])`` between ``'xyxy'``, ``'xywh'`` (corner, size) and ``'cxcywh'`` (centre,
    size), or rotated boxes between ``'xywhr'``, ``'cxcywhr'`` (``[..., 5]``) and ``'xyxyxyxy'`` (``[..., 8]``; see
    :mod:`fastdet.ops.rotated`). Returns a new tensor (a copy when the formats are equal), as torchvision does."""
    if in_fmt in _rotated.ROTATED_FORMATS or out_fmt in _rotated.ROTATED_FORMATS:
        return _rotated.convert_rotated(boxes, in_fmt, out_fmt)
    _check_box_tensor(boxes, "boxes", shape_error=ValueError)  # torchvision: ValueError (unpacking)
    _check_format(in_fmt, "in_fmt")
    _check_format(out_fmt, "out_fmt")
    if in_fmt == out_fmt:
        return boxes.clone()
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "xywh":
        a, b, c, d = a, b, a + c, b + d
    elif in_fmt == "cxcywh":
        a, b, c, d = a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
    # now xyxy
    if out_fmt == "xywh":
        a, b, c, d = a, b, c - a, d - b
    elif out_fmt == "cxcywh":
        a, b, c, d = (a + c) / 2, (b + d) / 2, c - a, d - b
    return torch.stack((a, b, c, d), dim=-1)


def _upcast(boxes: Tensor) -> Tensor:
    # torchvision's _upcast: float16/bfloat16 -> float32, integers (and bool) narrower than int32 -> int32, so that
    # products of coordinates do not overflow.
    if boxes.is_floating_point():
        return boxes if boxes.dtype in (torch.float32, torch.float64) else boxes.float()
    return boxes if boxes.dtype in (torch.int32, torch.int64) else boxes.int()


def box_area(boxes: Tensor, fmt: str = "xyxy") -> Tensor:
    """Area of ``boxes (Tensor[..., 4])`` -> ``Tensor[...]``. float16/bfloat16 boxes give float32 areas (as
    torchvision), so large boxes do not overflow; integer boxes give integer areas (int64 for int64 boxes, int32 for
    narrower integers, as torchvision)."""
    _check_box_tensor(boxes, "boxes")
    _check_format(fmt, "fmt")
    boxes = _upcast(boxes)
    if fmt == "xyxy":
        return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return boxes[..., 2] * boxes[..., 3]


def clip_boxes_to_image(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip ``boxes (Tensor[..., 4])`` (xyxy) to an image of ``size = (height, width)``. NaN coordinates stay NaN."""
    _check_box_tensor(boxes, "boxes", shape_error=TensorShapeError)  # torchvision: RuntimeError
    if len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size!r}")
    height, width = size
    if height < 0 or width < 0:
        raise ValueError(f"size must be non-negative (height, width), got {size!r}")
    # Scalar-bound clamps, one per coordinate: an elementwise minimum against a bounds tensor would split the
    # gradient half-and-half for a coordinate lying exactly on the border (common for already-clipped boxes), where
    # torchvision's scalar clamp gives a definite value.
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        (x1.clamp(min=0, max=width), y1.clamp(min=0, max=height), x2.clamp(min=0, max=width),
         y2.clamp(min=0, max=height)),
        dim=-1,
    )


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices (``Tensor[K]`` int64) of the boxes ``(Tensor[N, 4])`` whose width and height are both >= ``min_size``.
    Boxes with NaN sides are removed."""
    _check_box_tensor(boxes, "boxes")
    ws = boxes[..., 2] - boxes[..., 0]
    hs = boxes[..., 3] - boxes[..., 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]


def _to_xyxy(boxes: Tensor, fmt: str) -> Tensor:
    if fmt == "xyxy":
        return boxes
    if boxes.dtype in (torch.float16, torch.bfloat16):
        # The kernel computes in float32; converting first would round x + w to the low-precision dtype (at x = 1000
        # a float16 box of width 0.3 would get width 0.5).
        boxes = boxes.float()
    return box_convert(boxes, fmt, "xyxy")


def _float_operands(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor, torch.dtype | None]:
    """Integer boxes for the IoU family, as torchvision takes them: with a floating-point partner they take its dtype;
    two integer sets are computed in float64 (exact for coordinates below 2**26) and the result is returned in the
    default dtype (float32), torchvision's ``inter / union`` result dtype. Returns the operands and the dtype to cast
    the result to (None: keep). Floating-point inputs pass through untouched."""
    float1, float2 = boxes1.is_floating_point(), boxes2.is_floating_point()
    if float1 and float2:
        return boxes1, boxes2, None
    if float1 or float2:
        dtype = boxes1.dtype if float1 else boxes2.dtype
        return boxes1.to(dtype), boxes2.to(dtype), None
    return boxes1.double(), boxes2.double(), torch.get_default_dtype()


def _pairwise(boxes1: Tensor, boxes2: Tensor, variant: int, eps: float) -> Tensor:
    """Run the native pairwise kernel on ``[..., N, 4] x [..., M, 4]``; leading dims broadcast like torchvision's."""
    _check_box_tensor(boxes1, "boxes1", min_dim=2)
    _check_box_tensor(boxes2, "boxes2", min_dim=2)
    boxes1, boxes2, result_dtype = _float_operands(boxes1, boxes2)
    if result_dtype is not None:
        return _pairwise(boxes1, boxes2, variant, eps).to(result_dtype)
    return call_pairwise(native("pairwise_box_iou"), boxes1, boxes2, variant, eps)


def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy") -> Tensor:
    """Pairwise intersection-over-union.

    Args:
        boxes1 (Tensor[..., N, 4]): first set of boxes.
        boxes2 (Tensor[..., M, 4]): second set of boxes; leading dims broadcast against boxes1's, and a batch
            ``[B, N, 4] x [B, M, 4]`` runs in one kernel launch.
        fmt (str): ``'xyxy'`` (default), ``'xywh'`` or ``'cxcywh'``; or a rotated format, ``'cxcywhr'``, ``'xywhr'``
            or ``'xyxyxyxy'``, for :func:`fastdet.ops.rotated.box_iou_rotated` (float32 result, not differentiable).

    Returns:
        Tensor[..., N, M]: float32 for float16/bfloat16/float32 inputs (computed in float32; see below),
        float64 for float64. IoU is NaN where the union is 0 (two zero-area boxes), as in torchvision.
        Differentiable with respect to both inputs. Integer boxes are accepted, as in torchvision: with a
        floating-point partner they are converted to its dtype; two integer sets give the default dtype (float32),
        computed in float64. The same holds for the GIoU/DIoU/CIoU functions below.

    Differences from torchvision: float16/bfloat16 boxes are converted to float32 before anything else, where
    torchvision forms ``x + w`` and the corner differences in the low-precision dtype. For ``'xywh'``/``'cxcywh'``
    the area is recomputed from the converted corners, ``((x + w) - x) * ((y + h) - y)``, where torchvision
    multiplies ``w * h``; in float32/float64 the two can differ by the rounding of ``x + w`` (up to half an ulp of
    ``x + w``, relative to ``w``).
    """
    if fmt in _rotated.ROTATED_FORMATS:
        return _rotated.box_iou_rotated(boxes1, boxes2, fmt)
    _check_format(fmt, "fmt", rotated_too=True)
    # checked here, before the format conversion, so that errors name boxes1/boxes2 rather than box_convert's "boxes"
    _check_box_tensor(boxes1, "boxes1", min_dim=2)
    _check_box_tensor(boxes2, "boxes2", min_dim=2)
    boxes1, boxes2, result_dtype = _float_operands(boxes1, boxes2)
    iou = _pairwise(_to_xyxy(boxes1, fmt), _to_xyxy(boxes2, fmt), _IOU, 0.0)
    return iou if result_dtype is None else iou.to(result_dtype)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU: ``IoU - (C - U) / C`` with ``C`` the area of the smallest enclosing box.
    Shapes and dtypes as :func:`box_iou`; boxes are xyxy."""
    return _pairwise(boxes1, boxes2, _GIOU, 0.0)


def distance_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise distance IoU: ``IoU - d^2 / (c^2 + eps)`` with ``d`` the distance between centres and ``c`` the
    diagonal of the enclosing box. Shapes and dtypes as :func:`box_iou`; boxes are xyxy."""
    return _pairwise(boxes1, boxes2, _DIOU, float(eps))


def complete_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Pairwise complete IoU: DIoU minus ``alpha * v``, the aspect-ratio term, with ``alpha`` treated as a constant
    in the backward pass (as torchvision and the CIoU paper do). Shapes and dtypes as :func:`box_iou`."""
    return _pairwise(boxes1, boxes2, _CIOU, float(eps))


# Fake kernel: output shape [.., N, M] and dtype are known from the inputs, so torch.compile can trace through.
@register_fake("pairwise_box_iou")
def _pairwise_box_iou_fake(boxes1, boxes2, variant, eps):
    torch._check(boxes1.dim() == boxes2.dim() and boxes1.dim() in (2, 3))
    dtype = torch.float64 if boxes1.dtype == torch.float64 else torch.float32
    return boxes1.new_empty((*boxes1.shape[:-1], boxes2.shape[-2]), dtype=dtype)


@register_fake("_pairwise_box_iou_backward")
def _pairwise_box_iou_backward_fake(grad, boxes1, boxes2, variant, eps):
    return torch.empty_like(boxes1), torch.empty_like(boxes2)


def _pairwise_setup_context(ctx, inputs, output):
    boxes1, boxes2, variant, eps = inputs
    ctx.save_for_backward(boxes1, boxes2)
    ctx.variant, ctx.eps = variant, eps


def _pairwise_backward(ctx, grad):
    boxes1, boxes2 = ctx.saved_tensors
    g1, g2 = torch.ops.fastdet._pairwise_box_iou_backward(grad, boxes1, boxes2, ctx.variant, ctx.eps)
    return g1, g2, None, None


# Autograd through a registered backward op, so compiled graphs and export see the backward as one op too.
register_autograd("pairwise_box_iou", _pairwise_backward, _pairwise_setup_context)
