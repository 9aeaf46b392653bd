"""Region-of-interest pooling: ``roi_align``, ``roi_pool``, ``multi_scale_roi_align`` and their modules.

Drop-ins for ``torchvision.ops.roi_align`` / ``roi_pool`` / ``MultiScaleRoIAlign`` with the same signatures and
results (float32/float64 on the CPU: bitwise identical to torchvision's CPU kernels, forward and backward).

Boxes are ``(x1, y1, x2, y2)`` in input-image coordinates, given either as

* ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or
* a list of ``Tensor[L_i, 4]``, one per image of the batch (image ``i`` gets batch index ``i``).

Common to all ops here:

* Feature maps may be float16, bfloat16, float32 or float64; positions, weights and sums are computed in float32
  (float64 for float64 features) and the result is rounded once to the feature dtype. Boxes may have any floating
  dtype (they are read in that precision), so float16 features with float32 boxes work as under autocast.
* Feature maps are read through their strides: channels-last (or sliced) maps are not copied, and the output and the
  input gradient come back in the feature map's memory format.
* The backward is deterministic on the CPU (no atomics; every gradient element is summed in one fixed order) and,
  when ``torch.use_deterministic_algorithms(True)`` is on, on CUDA too (bitwise identical from run to run).
  Boxes get no gradient, as in torchvision.

Bad input has defined results (torchvision crashes or reads out of bounds on some of these):

* a box with a NaN or infinite coordinate pools to 0 and passes no gradient (``roi_pool``: 0, argmax -1);
* a batch index outside ``[0, N)`` (after truncation towards zero, as torchvision converts it) is a ``RuntimeError``
  on the CPU. On CUDA it cannot be checked without a host synchronisation, so the kernels instead pool such a RoI to
  0 and pass no gradient; call :func:`check_rois` first if you want the error there too;
* inverted boxes follow torchvision's arithmetic (``aligned=False`` makes them 1 x 1 pixel; ``aligned=True`` gives
  0); huge boxes cost O(H * W) per channel, not O(box area).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastdet.ops._errors import (BoxesFormatError, BoxesTypeError, MissingFeatureMapError, TensorShapeError,
                                TensorTypeError)
from fastdet.ops._registry import autocast_float32, native, register_autocast, register_autograd, register_fake

__all__ = [
    "MultiScaleRoIAlign",
    "RoIAlign",
    "RoIPool",
    "check_rois",
    "multi_scale_roi_align",
    "roi_align",
    "roi_pool",
]

BoxesArg = Tensor | Sequence[Tensor]


# ---------------------------------------------------------------------------------------------------------------------
# argument handling
# ---------------------------------------------------------------------------------------------------------------------


# Error types: each is also what torchvision raises for the same input (see fastdet/ops/_errors.py).
def _check_feature(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TensorTypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 4:
        raise TensorShapeError(f"{name} must have shape [N, C, H, W], got {tuple(t.shape)}")


def _pair(output_size, name: str = "output_size") -> tuple[int, int]:
    message = f"{name} must be a positive int or a pair of positive ints, got {output_size!r}"
    if isinstance(output_size, int):
        size = (output_size, output_size)
    elif isinstance(output_size, (list, tuple)):
        size = tuple(output_size)
        if len(size) == 1:
            size = (size[0], size[0])
    else:
        raise TensorTypeError(message)
    if not all(isinstance(s, int) for s in size):
        raise TensorTypeError(message)
    if len(size) != 2 or min(size) <= 0:
        raise TensorShapeError(message)
    return size


def _to_rois(boxes: BoxesArg, device: torch.device) -> Tensor:
    """``Tensor[K, 5]`` rois from either box format (torchvision's ``convert_boxes_to_roi_format``)."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise BoxesFormatError(f"boxes must be a Tensor[K, 5] (batch_index, x1, y1, x2, y2) or a list of "
                                   f"Tensor[L, 4], got a tensor of shape {tuple(boxes.shape)}")
        rois = boxes
    elif isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise BoxesFormatError(f"boxes[{i}] must be a Tensor[L, 4] (x1, y1, x2, y2), got {shape}")
        if len(boxes) == 0:
            raise ValueError("boxes must hold one Tensor[L, 4] per image; got an empty list")
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0)
    else:
        raise BoxesTypeError(f"boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}")
    if not rois.is_floating_point():
        raise TensorTypeError(f"boxes must be floating-point, got dtype {rois.dtype}")
    if rois.device != device:
        raise ValueError(f"input and boxes must be on the same device, got {device} and {rois.device}")
    return rois


def _channels_last(t: Tensor) -> bool:
    # The kernels' rule (roi_channels_last in csrc/ops/roi_align.cpp): channels-last unless also plain contiguous.
    return (not t.is_contiguous()) and t.is_contiguous(memory_format=torch.channels_last)


def _deterministic() -> bool:
    # The backward ops take the flag as an argument (the native code has no stable way to read torch's global
    # setting); with it, the CUDA backward sums every gradient element in a fixed order. Read in the autograd backward,
    # so it is the setting in force when the gradient is computed (under torch.compile: when the backward is traced,
    # and Dynamo guards on it).
    return torch.are_deterministic_algorithms_enabled()


def _fx_leaf_call(fn, *args):
    """Under ``torch.fx.symbolic_trace``, record ``fn(*args)`` as one ``call_function`` node and return its Proxy;
    otherwise None.

    The argument checks here inspect tensor types and sizes, which a Proxy cannot answer, so the RoI functions and
    modules are leaves of a traced graph, as torchvision's are (torchvision also ``torch.fx.wrap``s them, which covers
    calls from this module only; this covers calls from anywhere).
    """
    for arg in args:
        items = arg if isinstance(arg, (list, tuple)) else (arg,)
        for item in items:
            if isinstance(item, torch.fx.Proxy):
                return item.tracer.create_proxy("call_function", fn, args, {})
    return None


def check_rois(boxes: BoxesArg, batch_size: int) -> None:
    """Raise ``ValueError`` if a ``Tensor[K, 5]`` holds a batch index outside ``[0, batch_size)`` (or NaN).

    On CUDA this synchronises with the device (it reads one flag back), which is why the CUDA kernels do not do it
    themselves; the CPU kernels always check.
    """
    if not isinstance(boxes, Tensor):
        return  # list format: indices are generated, always valid
    index = boxes[:, 0]
    bad = ~((index > -1) & (index < batch_size))
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        raise ValueError(f"boxes[{k}, 0] = {float(index[k])} is not a valid batch index for batch size {batch_size}")


# ---------------------------------------------------------------------------------------------------------------------
# roi_align
# ---------------------------------------------------------------------------------------------------------------------


@torch.fx.wrap
def roi_align(
    input: Tensor,
    boxes: BoxesArg,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign (Mask R-CNN): bilinearly sampled average pooling of box regions, a drop-in for
    ``torchvision.ops.roi_align``.

    Args:
        input (Tensor[N, C, H, W]): feature maps.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): ``(batch_index, x1, y1, x2, y2)`` rows, or one ``(x1, y1, x2,
            y2)`` tensor per image, in input-image coordinates.
        output_size (int or (int, int)): ``(pooled_height, pooled_width)`` bins per box.
        spatial_scale (float): feature-map pixels per input-image pixel, e.g. ``1/16`` for a stride-16 map. Box
            coordinates are multiplied by it.
        sampling_ratio (int): bilinear samples per bin along each axis. ``<= 0`` is adaptive:
            ``ceil(box_height / pooled_height)`` (resp. width) samples, computed per box (only samples on the map are
            visited, so a huge box costs at most about one sample per map pixel). An explicit value costs its square
            per output element and must be at most 64 (a ``RuntimeError`` otherwise; torchvision has no limit).
        aligned (bool): the pixel model.

            * ``False`` (torchvision's default, and the original Mask R-CNN): a box coordinate ``x`` is used as is,
              i.e. feature value ``[i]`` is taken to sit at coordinate ``i``. This puts every box half a pixel off
              (the box ``[0, 1]`` around pixel 0 is sampled at ``0.25`` and ``0.75``, between pixels 0 and 1), and
              boxes are forced to be at least 1 x 1 pixel, so tiny or inverted boxes still pool something.
            * ``True`` (detectron2's and mmcv's default): pixel ``i`` covers ``[i, i + 1)`` with its centre at
              ``i + 0.5``, so scaled coordinates are shifted by ``-0.5`` before sampling. The box ``[0, 1]`` is then
              sampled around pixel 0's centre, and a box of size ``s`` pools exactly ``s`` pixels; no minimum size is
              imposed (an inverted box pools 0).

            Models trained with one setting must be run with the same one.

    Returns:
        Tensor[K, C, pooled_height, pooled_width]: in ``input``'s dtype and memory format. Differentiable with respect
        to ``input``.

    Sampling follows torchvision exactly: bin ``(ph, pw)`` averages ``grid_h * grid_w`` samples at bin-relative
    positions ``(i + 0.5) / grid``; a sample more than one pixel outside the map (``y < -1``, ``y > H``, ...)
    counts as 0, other samples are clamped to the map and interpolated. See the module docstring for bad input.
    """
    traced = _fx_leaf_call(roi_align, input, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    if traced is not None:
        return traced
    _check_feature(input, "input")
    ph, pw = _pair(output_size)
    rois = _to_rois(boxes, input.device)
    return native("roi_align")(input, rois, float(spatial_scale), ph, pw, int(sampling_ratio), bool(aligned))


# Fake kernel: output shape/layout from the inputs, so torch.compile and export can trace the op.
@register_fake("roi_align")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    torch._check(input.dim() == 4)
    torch._check(rois.dim() == 2)
    fmt = torch.channels_last if _channels_last(input) else torch.contiguous_format
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width)).contiguous(
        memory_format=fmt)


@register_fake("_roi_align_backward")
def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height,
                             width, sampling_ratio, aligned, channels_last, deterministic=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return grad.new_empty((batch_size, channels, height, width)).contiguous(memory_format=fmt)


def _roi_align_setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, pooled_height, pooled_width, *input.shape, sampling_ratio, aligned,
                _channels_last(input))


def _roi_align_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    grad_input = torch.ops.fastdet._roi_align_backward(grad, rois, *ctx.args, _deterministic())
    return grad_input, None, None, None, None, None, None


# Autograd through a registered backward op, so compiled graphs see the backward as one op too.
register_autograd("roi_align", _roi_align_backward, _roi_align_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# roi_pool
# ---------------------------------------------------------------------------------------------------------------------


@torch.fx.wrap
def roi_pool(
    input: Tensor,
    boxes: BoxesArg,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
) -> Tensor:
    """RoIPool (Fast R-CNN): max pooling over box regions quantised to whole pixels, a drop-in for
    ``torchvision.ops.roi_pool``.

    Args:
        input (Tensor[N, C, H, W]): feature maps.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): as for :func:`roi_align`.
        output_size (int or (int, int)): ``(pooled_height, pooled_width)``.
        spatial_scale (float): feature-map pixels per input-image pixel.

    Returns:
        Tensor[K, C, pooled_height, pooled_width]: the maximum of each bin; 0 for a bin that covers no pixel.

    Box corners are scaled and rounded to whole pixels (half away from zero); a box spans ``x2 - x1 + 1`` pixels (at
    least 1) and bin ``p`` covers ``[floor(p * s), ceil((p + 1) * s))`` of it, ``s = span / pooled``, clipped to the
    map. NaN feature values never win. The gradient of each bin flows to the first pixel (in row-major order) holding
    its maximum, as in torchvision.
    """
    traced = _fx_leaf_call(roi_pool, input, boxes, output_size, spatial_scale)
    if traced is not None:
        return traced
    _check_feature(input, "input")
    ph, pw = _pair(output_size)
    rois = _to_rois(boxes, input.device)
    output, _ = native("roi_pool")(input, rois, float(spatial_scale), ph, pw)
    return output


@register_fake("roi_pool")
def _roi_pool_fake(input, rois, spatial_scale, pooled_height, pooled_width):
    torch._check(input.dim() == 4)
    torch._check(rois.dim() == 2)
    fmt = torch.channels_last if _channels_last(input) else torch.contiguous_format
    shape = (rois.shape[0], input.shape[1], pooled_height, pooled_width)
    output = input.new_empty(shape).contiguous(memory_format=fmt)
    argmax = input.new_empty(shape, dtype=torch.int32).contiguous(memory_format=fmt)
    return output, argmax


@register_fake("_roi_pool_backward")
def _roi_pool_backward_fake(grad, rois, argmax, spatial_scale, batch_size, channels, height, width, channels_last,
                            deterministic=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return grad.new_empty((batch_size, channels, height, width)).contiguous(memory_format=fmt)


def _roi_pool_setup_context(ctx, inputs, output):
    input, rois, spatial_scale, pooled_height, pooled_width = inputs
    ctx.save_for_backward(rois, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.args = (spatial_scale, *input.shape, _channels_last(input))


def _roi_pool_backward(ctx, grad, grad_argmax):
    rois, argmax = ctx.saved_tensors
    grad_input = torch.ops.fastdet._roi_pool_backward(grad, rois, argmax, *ctx.args, _deterministic())
    return grad_input, None, None, None, None


register_autograd("roi_pool", _roi_pool_backward, _roi_pool_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# multi-scale (FPN) RoIAlign
# ---------------------------------------------------------------------------------------------------------------------


def fpn_levels(boxes: Tensor, k_min: int, k_max: int, canonical_scale: float = 224.0, canonical_level: int = 4,
               eps: float = 1e-6) -> Tensor:
    """FPN level index (0 = level ``k_min``) of each box ``(Tensor[K, 4])``, Eq. (1) of the FPN paper as torchvision's
    ``LevelMapper`` computes it: ``clamp(floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps), k_min,
    k_max) - k_min``, evaluated in the boxes' dtype (float32 for float16/bfloat16). Runs on the boxes' device, without
    synchronisation. Boxes with a NaN area go to level 0 (they pool to 0 anyway)."""
    if boxes.dtype not in (torch.float32, torch.float64):
        boxes = boxes.float()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    levels = torch.floor(canonical_level + torch.log2(torch.sqrt(area) / canonical_scale) + eps)
    levels = torch.clamp(levels, min=k_min, max=k_max)
    levels = torch.where(torch.isnan(levels), float(k_min), levels)
    return levels.to(torch.int64) - k_min


def _infer_scale(feature_size: int, image_size: int) -> float:
    # torchvision's _infer_scale: the power of two nearest to feature / image size (round half to even, as torch.round).
    return 2.0 ** round(math.log2(float(feature_size) / float(image_size)))


@torch.fx.wrap
def multi_scale_roi_align(
    features: Sequence[Tensor],
    boxes: BoxesArg,
    output_size: int | tuple[int, int],
    sampling_ratio: int = -1,
    canonical_scale: float = 224.0,
    canonical_level: int = 4,
    *,
    spatial_scales: Sequence[float] | None = None,
    image_shapes: Sequence[tuple[int, int]] | None = None,
    aligned: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """RoIAlign over a feature pyramid: each box is pooled from the level its size selects (FPN, Eq. 1).

    Args:
        features (list of Tensor[N, C, H_l, W_l]): pyramid levels, finest first, all with the same N, C, dtype and
            device (at most 8 levels).
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): as for :func:`roi_align`.
        output_size, sampling_ratio, aligned: as for :func:`roi_align` (torchvision's MultiScaleRoIAlign uses
            ``aligned=False``).
        canonical_scale (float), canonical_level (int): a box of ``sqrt(area) == canonical_scale`` maps to level
            ``canonical_level``.
        spatial_scales (list of float): scale of each level. If omitted it is inferred as torchvision does from
            ``image_shapes`` (list of ``(height, width)`` of the images before batching): the power of two nearest
            to ``H_l / max(height)``.
        eps (float): added before the floor, as in torchvision's LevelMapper.

    Returns:
        Tensor[K, C, pooled_height, pooled_width] in the features' dtype.

    Levels are ``log2(1 / spatial_scale)``; ``k_min``/``k_max`` are those of the first and last level. The level of
    every box is computed on the device with the same float operations as torchvision's LevelMapper (see
    :func:`fpn_levels`), and all levels are pooled by one kernel launch, without a Python loop over levels and without
    host synchronisation.
    """
    traced = _fx_leaf_call(_multi_scale_roi_align_call, features, boxes, output_size, sampling_ratio, canonical_scale,
                           canonical_level, spatial_scales, image_shapes, aligned, eps)
    if traced is not None:
        return traced
    if isinstance(features, Tensor) or not isinstance(features, (list, tuple)) or len(features) == 0:
        raise TypeError("features must be a non-empty list of Tensor[N, C, H, W]")
    for i, f in enumerate(features):
        _check_feature(f, f"features[{i}]")
    if spatial_scales is None:
        if image_shapes is None:
            raise ValueError("multi_scale_roi_align needs spatial_scales or image_shapes")
        original_height = max(s[0] for s in image_shapes)
        spatial_scales = [_infer_scale(f.shape[-2], original_height) for f in features]
    spatial_scales = [float(s) for s in spatial_scales]
    if len(spatial_scales) != len(features):
        raise ValueError(f"spatial_scales must have one entry per level ({len(features)}), got {len(spatial_scales)}")
    ph, pw = _pair(output_size)
    rois = _to_rois(boxes, features[0].device)
    k_min = int(-math.log2(spatial_scales[0]))
    k_max = int(-math.log2(spatial_scales[-1]))
    levels = fpn_levels(rois[:, 1:], k_min, k_max, canonical_scale, canonical_level, eps)
    if len(features) == 1:
        levels = torch.zeros_like(levels)  # torchvision pools a single level without a level mapping
    return native("multi_scale_roi_align")(list(features), rois, levels, spatial_scales, ph, pw, int(sampling_ratio),
                                           bool(aligned))


def _multi_scale_roi_align_call(features, boxes, output_size, sampling_ratio, canonical_scale, canonical_level,
                                spatial_scales, image_shapes, aligned, eps):
    # multi_scale_roi_align with positional arguments only: the target of its torch.fx call_function nodes.
    return multi_scale_roi_align(features, boxes, output_size, sampling_ratio, canonical_scale, canonical_level,
                                 spatial_scales=spatial_scales, image_shapes=image_shapes, aligned=aligned, eps=eps)


@register_fake("multi_scale_roi_align")
def _multi_scale_roi_align_fake(features, rois, levels, spatial_scales, pooled_height, pooled_width, sampling_ratio,
                                aligned):
    f0 = features[0]
    fmt = torch.channels_last if _channels_last(f0) else torch.contiguous_format
    return f0.new_empty((rois.shape[0], f0.shape[1], pooled_height, pooled_width)).contiguous(memory_format=fmt)


@register_fake("_multi_scale_roi_align_backward")
def _multi_scale_roi_align_backward_fake(grad, rois, levels, spatial_scales, pooled_height, pooled_width, batch_size,
                                         channels, heights, widths, sampling_ratio, aligned, channels_last,
                                         deterministic=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [grad.new_empty((batch_size, channels, h, w)).contiguous(memory_format=fmt) for h, w in zip(heights, widths)]


def _multi_scale_setup_context(ctx, inputs, output):
    features, rois, levels, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois, levels)
    f0 = features[0]
    ctx.args = (spatial_scales, pooled_height, pooled_width, f0.shape[0], f0.shape[1], [f.shape[2] for f in features],
                [f.shape[3] for f in features], sampling_ratio, aligned, _channels_last(f0))


def _multi_scale_backward(ctx, grad):
    rois, levels = ctx.saved_tensors
    grads = torch.ops.fastdet._multi_scale_roi_align_backward(grad, rois, levels, *ctx.args, _deterministic())
    return list(grads), None, None, None, None, None, None, None


register_autograd("multi_scale_roi_align", _multi_scale_backward, _multi_scale_setup_context)


# ---------------------------------------------------------------------------------------------------------------------
# autocast
# ---------------------------------------------------------------------------------------------------------------------
# torchvision's autocast kernel of roi_align (and, on CUDA, roi_pool) casts the feature map and the boxes to float32,
# runs the op and casts the result back to the feature map's dtype. fastdet's kernels already compute in float32 for
# float16/bfloat16 feature maps and round once to the feature dtype, which is exactly that result, so the feature map
# is passed as is (no float32 copy of every level) and only the boxes are cast as torchvision casts them. roi_pool
# (a max, exact in any dtype) and multi_scale_roi_align (roi_align over levels in torchvision) get the same treatment,
# on the CPU too.


def _roi_align_autocast(op, input, rois, *args):
    return op(input, autocast_float32(rois), *args)


def _roi_pool_autocast(op, input, rois, *args):
    return op(input, autocast_float32(rois), *args)


def _multi_scale_roi_align_autocast(op, features, rois, levels, *args):
    return op(features, autocast_float32(rois), levels, *args)


register_autocast("roi_align", _roi_align_autocast)
register_autocast("roi_pool", _roi_pool_autocast)
register_autocast("multi_scale_roi_align", _multi_scale_roi_align_autocast)


# ---------------------------------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------------------------------


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (torchvision's ``RoIAlign``; note ``aligned`` defaults to False there and
    here, True in detectron2/mmcv)."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, rois: BoxesArg) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})")


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool` (torchvision's ``RoIPool``)."""

    def __init__(self, output_size, spatial_scale: float):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale

    def forward(self, input: Tensor, rois: BoxesArg) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale})"


class MultiScaleRoIAlign(nn.Module):
    """FPN RoIAlign over named feature maps, compatible with ``torchvision.ops.MultiScaleRoIAlign``.

    Args:
        featmap_names (list of str): keys of the feature dict to pool from; levels are taken in the dict's order,
            finest first (as torchvision does).
        output_size (int or (int, int)), sampling_ratio (int): as for :func:`roi_align`.
        canonical_scale (int), canonical_level (int): the FPN level mapping (224 and 4, as in the paper).

    ``forward(x, boxes, image_shapes)``: ``x`` a dict of ``Tensor[N, C, H_l, W_l]``, ``boxes`` a list of
    ``Tensor[L_i, 4]`` per image, ``image_shapes`` the ``(height, width)`` of each image before batching. Returns
    ``Tensor[sum L_i, C, pooled_height, pooled_width]``. Scales are inferred from the feature and image sizes exactly as
    torchvision does (recomputed every call, so ``self.scales`` describes the last call), and all levels are pooled in
    one kernel launch (see :func:`multi_scale_roi_align`).
    """

    def __init__(self, featmap_names: list[str], output_size, sampling_ratio: int, *, canonical_scale: int = 224,
                 canonical_level: int = 4):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.scales = None
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        args = (x, self.featmap_names, boxes, image_shapes, self.output_size, self.sampling_ratio, self.canonical_scale,
                self.canonical_level)
        traced = _fx_leaf_call(_multi_scale_pool, *args)  # torch.fx: one leaf call (self.scales is not updated)
        if traced is not None:
            return traced
        result, self.scales = _multi_scale_pool_and_scales(*args)
        return result

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio})")


def _multi_scale_pool_and_scales(x, featmap_names, boxes, image_shapes, output_size, sampling_ratio, canonical_scale,
                                 canonical_level):
    """MultiScaleRoIAlign's forward: the pooled features and the scales inferred for this call."""
    if not isinstance(x, dict):
        raise TypeError(f"x must be a dict of feature maps Tensor[N, C, H, W], got {type(x).__name__}")
    # torchvision's _filter_input: the dict's order, not featmap_names' order, decides the level order.
    features = [v for k, v in x.items() if k in featmap_names]
    if not features:  # torchvision: an IndexError from indexing the empty list
        raise MissingFeatureMapError(f"x holds none of the feature maps {list(featmap_names)}; its keys are {list(x)}")
    if image_shapes is None or len(image_shapes) == 0:
        raise ValueError("image_shapes must list the (height, width) of every image before batching, got "
                         f"{image_shapes!r}")
    original_height = max(s[0] for s in image_shapes)
    scales = [_infer_scale(f.shape[-2], original_height) for f in features]
    return multi_scale_roi_align(features, boxes, output_size, sampling_ratio, canonical_scale, canonical_level,
                                 spatial_scales=scales), scales


@torch.fx.wrap
def _multi_scale_pool(x, featmap_names, boxes, image_shapes, output_size, sampling_ratio, canonical_scale,
                      canonical_level):
    # The target of MultiScaleRoIAlign's torch.fx call_function nodes (see MultiScaleRoIAlign.forward).
    return _multi_scale_pool_and_scales(x, featmap_names, boxes, image_shapes, output_size, sampling_ratio,
                                        canonical_scale, canonical_level)[0]
