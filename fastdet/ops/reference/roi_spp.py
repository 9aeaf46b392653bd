"""Reference RoI spatial pyramid pooling (SPP-Net) in plain PyTorch: the test oracle for :mod:`fastdet.ops.roi_spp`.

Written independently of roi_pool (kernel or reference): for each pyramid level, the bins of every RoI are pixel
masks over the feature map, and each bin's maximum is picked with ``argmax`` (the first maximum in row-major order)
and gathered, so plain autograd sends the gradient where the kernel does. Bin quantisation is roi_pool's
(torchvision's): rounded corners (half away from zero), a span of at least one pixel, ``floor``/``ceil`` bin edges
computed in the accumulation dtype, an empty bin pooling 0, a bin whose values are all NaN or <= -FLT_MAX pooling
-FLT_MAX (the kernels' initial value), a non-finite box pooling 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastdet.ops.reference.roi import _FLT_MAX, _acc, _rois

__all__ = ["roi_spp"]

_CORNER_LIMIT = float(2**40)


def _round_half_away(v: Tensor) -> Tensor:
    # C's round(): exact in float64 for float32 inputs (torch.round rounds half to even)
    v = v.double()
    return torch.sign(v) * torch.floor(v.abs() + 0.5)


def _bin_edges(start: Tensor, span: Tensor, level: int, size: int, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """``[K, level]`` first and one-past-last pixel of every bin along one axis, clipped to ``[0, size]``."""
    bin_size = span.to(acc) / level
    p = torch.arange(level, dtype=acc, device=span.device)
    lo = torch.floor(p[None] * bin_size[:, None]).long() + start[:, None]
    hi = torch.ceil((p[None] + 1) * bin_size[:, None]).long() + start[:, None]
    return lo.clamp(0, size), hi.clamp(0, size)


def roi_spp(features: Tensor, boxes, levels: Sequence[int] = (1, 2, 4), spatial_scale: float = 1.0) -> Tensor:
    """Reference :func:`fastdet.ops.roi_spp`; same arguments and result ``[K, C * sum(l * l)]``."""
    levels = [levels] if isinstance(levels, int) else list(levels)
    rois = _rois(boxes)
    acc = _acc(features.dtype)
    feats = features.to(acc)
    N, C, H, W = features.shape
    rois = rois.to(acc)
    K = rois.shape[0]
    index = rois[:, 0]
    bad = ~((index > -1) & (index < N))
    if bool(bad.any()):
        raise RuntimeError(f"{float(index[bad][0])} is not a valid batch index for batch size {N}")
    batch = index.long()  # truncation towards zero, as torchvision converts it
    scaled = rois[:, 1:] * torch.tensor(spatial_scale, dtype=acc)
    finite = torch.isfinite(scaled).all(dim=1)
    corners = _round_half_away(torch.where(finite[:, None], scaled, torch.zeros_like(scaled)))
    corners = corners.clamp(-_CORNER_LIMIT, _CORNER_LIMIT).long()
    x1, y1, x2, y2 = corners.unbind(dim=1)
    span_w = (x2 - x1 + 1).clamp(min=1)
    span_h = (y2 - y1 + 1).clamp(min=1)

    values = feats[batch].reshape(K, C, H * W)  # [K, C, H*W]
    ranked = torch.where(torch.isnan(values), torch.full_like(values, -torch.inf), values)
    rows = torch.arange(H, device=features.device)
    cols = torch.arange(W, device=features.device)
    pooled = []
    for level in levels:
        h_lo, h_hi = _bin_edges(y1, span_h, level, H, acc)
        w_lo, w_hi = _bin_edges(x1, span_w, level, W, acc)
        in_row = (rows >= h_lo[..., None]) & (rows < h_hi[..., None])  # [K, l, H]
        in_col = (cols >= w_lo[..., None]) & (cols < w_hi[..., None])  # [K, l, W]
        mask = in_row[:, :, None, :, None] & in_col[:, None, :, None, :] & finite[:, None, None, None, None]
        mask = mask.reshape(K, level * level, H * W)  # [K, bins, H*W], bins row-major
        candidates = torch.where(mask[:, None], ranked[:, :, None], torch.full((), -torch.inf, dtype=acc,
                                                                               device=features.device))
        first = candidates.argmax(dim=-1)  # [K, C, bins]: the first maximum in row-major order
        top = candidates.gather(-1, first[..., None])[..., 0]
        picked = values.gather(-1, first)  # differentiable path to the winning pixel
        covered = mask.any(dim=-1)[:, None].expand_as(top)
        wins = covered & (top > -_FLT_MAX)
        fallback = torch.where(covered, torch.full_like(top, -_FLT_MAX), torch.zeros_like(top))
        pooled.append(torch.where(wins, picked, fallback).reshape(K, C * level * level))
    return torch.cat(pooled, dim=1).to(features.dtype)
