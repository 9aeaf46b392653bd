"""RoI spatial pyramid pooling (SPP-Net): ``roi_spp`` and its module ``RoISPP``.

SPP-Net (He et al., 2014) pools every region from the conv feature map of the whole image with a spatial pyramid:
each pyramid level ``l`` max-pools the region into an ``l x l`` grid, and the bins of all levels are concatenated
into one fixed-length vector, whatever the region's size. ``roi_spp`` does that for every RoI in one pass (one kernel
launch for all levels), with roi_pool's bin quantisation, so

    roi_spp(x, boxes, levels, s) == torch.cat([roi_pool(x, boxes, (l, l), s).flatten(1) for l in levels], dim=1)

bit for bit (for torchvision's ``roi_pool`` too, on the CPU). Boxes are given as for :func:`fastdet.ops.roi_pool`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastdet.ops._registry import autocast_float32, native, register_autocast, register_autograd, register_fake
from fastdet.ops.roi import BoxesArg, _channels_last, _check_feature, _deterministic, _fx_leaf_call, _to_rois

__all__ = ["RoISPP", "roi_spp"]


def _levels(levels) -> list[int]:
    """``levels`` as a list of ints (the native op checks the values: 1 to 16 levels, each positive, at most 4096 bins
    in all)."""
    if isinstance(levels, int) and not isinstance(levels, bool):
        return [levels]
    if isinstance(levels, (list, tuple)) and all(isinstance(l, int) and not isinstance(l, bool) for l in levels):
        return [int(l) for l in levels]
    raise TypeError(f"levels must be an int or a sequence of ints (bins per side of each pyramid level), got "
                    f"{levels!r}")


@torch.fx.wrap
def roi_spp(
    features: Tensor,
    boxes: BoxesArg,
    levels: Sequence[int] = (1, 2, 4),
    spatial_scale: float = 1.0,
) -> Tensor:
    """Spatial pyramid pooling over box regions (SPP-Net): every level's max-pooled bins, concatenated, in one pass.

    Args:
        features (Tensor[N, C, H, W]): feature maps (float16, bfloat16, float32 or float64; any layout: channels-last
            or sliced maps are read through their strides, not copied).
        boxes (Tensor[K, 5] or list of Tensor[L_i, 4]): ``(batch_index, x1, y1, x2, y2)`` rows, or one ``(x1, y1, x2,
            y2)`` tensor per image, in input-image coordinates (as :func:`fastdet.ops.roi_pool`).
        levels (sequence of int): bins per side of each pyramid level, e.g. ``(1, 2, 4)`` or SPP-Net's
            ``(1, 2, 3, 6)``. 1 to 16 levels, each positive, at most 4096 bins in all (``sum(l * l)``); repeats are
            allowed. A ``RuntimeError`` naming ``levels`` otherwise.
        spatial_scale (float): feature-map pixels per input-image pixel (e.g. ``1/16``).

    Returns:
        Tensor[K, C * sum(l * l)] in ``features``' dtype. Layout: the levels one after another, in the order given;
        inside level ``l``, channel-major, then the ``l x l`` bins in row-major order. Element ``(k, c, ph, pw)`` of
        level ``j`` is at column ``C * sum(levels[i] ** 2 for i < j) + c * l * l + ph * l + pw``. This is exactly
        ``torch.cat([roi_pool(features, boxes, (l, l), spatial_scale).flatten(1) for l in levels], 1)``.
        Differentiable with respect to ``features``.

    Bins follow roi_pool (torchvision) exactly: box corners are scaled and rounded to whole pixels (half away from
    zero), the box spans ``x2 - x1 + 1`` pixels (at least 1, so flipped or zero-size boxes pool a 1 x 1 region) and bin
    ``p`` of level ``l`` covers ``[floor(p * span / l), ceil((p + 1) * span / l))`` of it, clipped to the map. A bin
    covering no pixel (a box outside the map) gives 0; a box with a NaN/Inf coordinate gives 0 everywhere. NaN feature
    values never win. The gradient of each bin flows to the first pixel (row-major) holding its maximum. The backward
    is deterministic on the CPU, and on CUDA under ``torch.use_deterministic_algorithms(True)``.
    """
    traced = _fx_leaf_call(roi_spp, features, boxes, levels, spatial_scale)
    if traced is not None:
        return traced
    _check_feature(features, "features")
    rois = _to_rois(boxes, features.device)
    output, _ = native("roi_spp")(features, rois, _levels(levels), float(spatial_scale))
    return output


# Fake kernel: output shapes from the inputs, so torch.compile (dynamic shapes too) and torch.export can trace the op.
@register_fake("roi_spp")
def _roi_spp_fake(input, rois, levels, spatial_scale):
    torch._check(input.dim() == 4)
    torch._check(rois.dim() == 2)
    torch._check(len(levels) > 0 and all(l > 0 for l in levels))
    bins = sum(l * l for l in levels)
    output = input.new_empty((rois.shape[0], input.shape[1] * bins))
    argmax = input.new_empty((rois.shape[0], input.shape[1], bins), dtype=torch.int32)
    return output, argmax


@register_fake("_roi_spp_backward")
def _roi_spp_backward_fake(grad, rois, argmax, levels, spatial_scale, batch_size, channels, height, width,
                           channels_last, deterministic=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return grad.new_empty((batch_size, channels, height, width)).contiguous(memory_format=fmt)


def _roi_spp_setup_context(ctx, inputs, output):
    input, rois, levels, spatial_scale = inputs
    ctx.save_for_backward(rois, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.args = (levels, spatial_scale, *input.shape, _channels_last(input))


def _roi_spp_backward(ctx, grad, grad_argmax):
    rois, argmax = ctx.saved_tensors
    grad_input = torch.ops.fastdet._roi_spp_backward(grad, rois, argmax, *ctx.args, _deterministic())
    return grad_input, None, None, None


# Autograd through a registered backward op, so compiled graphs see the backward as one op too.
register_autograd("roi_spp", _roi_spp_backward, _roi_spp_setup_context)


# Autocast as roi_pool's (fastdet/ops/roi.py): the kernel already computes in float32 for 16-bit maps (a max is exact
# in any dtype), so only the boxes are cast as torchvision's autocast casts them.
def _roi_spp_autocast(op, input, rois, *args):
    return op(input, autocast_float32(rois), *args)


register_autocast("roi_spp", _roi_spp_autocast)


class RoISPP(nn.Module):
    """Module form of :func:`roi_spp`: ``RoISPP(levels, spatial_scale)(features, boxes)`` ->
    ``Tensor[K, C * sum(l * l)]``."""

    def __init__(self, levels: Sequence[int] = (1, 2, 4), spatial_scale: float = 1.0):
        super().__init__()
        self.levels = tuple(_levels(levels))
        self.spatial_scale = spatial_scale

    def output_channels(self, in_channels: int) -> int:
        """Width of the pooled vector for ``in_channels``-channel features: ``in_channels * sum(l * l)``."""
        return in_channels * sum(l * l for l in self.levels)

    def forward(self, features: Tensor, boxes: BoxesArg) -> Tensor:
        return roi_spp(features, boxes, self.levels, self.spatial_scale)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(levels={self.levels}, spatial_scale={self.spatial_scale})"
