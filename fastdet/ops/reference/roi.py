"""Reference RoIAlign, RoIPool and multi-scale RoIAlign in plain PyTorch: the test oracle for :mod:`fastdet.ops.roi`.

Written to be read: a Python loop over boxes, bilinear interpolation spelled out, and ordinary autograd for the
gradient (with respect to the features). Semantics are torchvision's (0.29), plus fastdet's defined outputs for bad
input (a box with a NaN/Inf coordinate pools to 0). Positions and weights are computed in float32 (float64 for
float64 features), like the kernels; only the order of the final sums may differ, so results agree to rounding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["multi_scale_roi_align", "roi_align", "roi_pool"]

_FLT_MAX = 3.4028234663852886e38


def _pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def _rois(boxes) -> Tensor:
    if isinstance(boxes, Tensor):
        return boxes
    return torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)], dim=0)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _axis_samples(start: Tensor, bin_size: Tensor, pooled: int, grid: int, size: int):
    """Sample positions of one axis for all bins: ``[pooled, grid]`` low/high pixel indices, their weights, and a
    validity mask. Position ``i`` of bin ``p`` is ``start + p * bin + (i + 0.5) * bin / grid``; a position outside
    ``[-1, size]`` is invalid (contributes 0); others are clamped to ``[0, size - 1]`` and split between the two
    neighbouring pixels."""
    p = torch.arange(pooled, dtype=start.dtype).unsqueeze(1)
    i = torch.arange(grid, dtype=start.dtype).unsqueeze(0)
    coord = (start + p * bin_size) + ((i + 0.5) * bin_size) / grid
    valid = (coord >= -1) & (coord <= size)
    coord = coord.clamp(min=0)
    low = coord.floor().to(torch.int64)
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    coord = torch.where(at_edge, low.to(coord.dtype), coord)
    frac = coord - low.to(coord.dtype)  # weight of `high`
    return low.clamp(min=0), high.clamp(min=0), frac, 1 - frac, valid


def roi_align(input: Tensor, boxes, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1,
              aligned: bool = False) -> Tensor:
    """Reference :func:`fastdet.ops.roi_align`; same arguments and result."""
    ph_count, pw_count = _pair(output_size)
    rois = _rois(boxes)
    acc = _acc(input.dtype)
    feats = input.to(acc)
    N, C, H, W = input.shape
    outputs = []
    for roi in rois.to(acc):
        batch = roi[0]
        scale = torch.tensor(spatial_scale, dtype=acc)
        offset = 0.5 if aligned else 0.0
        x1, y1, x2, y2 = (roi[1:] * scale - offset).unbind()
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:  # legacy behaviour: at least one pixel
            roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
        out = feats.new_zeros(C, ph_count, pw_count)
        coords = torch.stack([x1, y1, x2, y2, roi_w, roi_h])
        index_ok = bool(batch > -1) and bool(batch < N)
        if not index_ok:
            raise RuntimeError(f"{float(batch)} is not a valid batch index for batch size {N}")
        if H == 0 or W == 0 or not bool(torch.isfinite(coords).all()):
            outputs.append(out)  # defined output for non-finite boxes (and empty maps): zeros
            continue
        bin_h, bin_w = roi_h / ph_count, roi_w / pw_count
        if sampling_ratio > 0:
            grid_h = grid_w = sampling_ratio
        else:  # adaptive: about one sample per pixel
            grid_h = max(int(math.ceil(float(roi_h / ph_count))), 0)
            grid_w = max(int(math.ceil(float(roi_w / pw_count))), 0)
        count = max(grid_h * grid_w, 1)
        if grid_h == 0 or grid_w == 0:
            outputs.append(out)
            continue
        ylo, yhi, ly, hy, yok = _axis_samples(y1, bin_h, ph_count, grid_h, H)  # [PH, gh]
        xlo, xhi, lx, hx, xok = _axis_samples(x1, bin_w, pw_count, grid_w, W)  # [PW, gw]
        plane = feats[int(batch)]  # [C, H, W]

        # Broadcast to [C, PH, gh, PW, gw]: every (bin, sample) pair of the RoI.
        def corner(yidx, xidx):
            return plane[:, yidx[:, :, None, None], xidx[None, None, :, :]]

        w_ll = hy[:, :, None, None] * hx[None, None]  # top-left
        w_lh = hy[:, :, None, None] * lx[None, None]  # top-right
        w_hl = ly[:, :, None, None] * hx[None, None]  # bottom-left
        w_hh = ly[:, :, None, None] * lx[None, None]  # bottom-right
        value = (w_ll * corner(ylo, xlo) + w_lh * corner(ylo, xhi) + w_hl * corner(yhi, xlo)
                 + w_hh * corner(yhi, xhi))
        mask = (yok[:, :, None, None] & xok[None, None]).to(acc)
        out = (value * mask).sum(dim=(2, 4)) / count
        outputs.append(out)
    if not outputs:
        return input.new_zeros(0, C, ph_count, pw_count)
    return torch.stack(outputs).to(input.dtype)


def roi_pool(input: Tensor, boxes, output_size, spatial_scale: float = 1.0) -> Tensor:
    """Reference :func:`fastdet.ops.roi_pool`; same arguments and result."""
    ph_count, pw_count = _pair(output_size)
    rois = _rois(boxes)
    acc = _acc(input.dtype)
    feats = input.to(acc)
    N, C, H, W = input.shape
    outputs = []
    for roi in rois.to(acc):
        batch = roi[0]
        if not (bool(batch > -1) and bool(batch < N)):
            raise RuntimeError(f"{float(batch)} is not a valid batch index for batch size {N}")
        scaled = roi[1:] * torch.tensor(spatial_scale, dtype=acc)
        out = feats.new_zeros(C, ph_count, pw_count)
        if not bool(torch.isfinite(scaled).all()):
            outputs.append(out)
            continue
        # round half away from zero (C's round), not torch.round's half-to-even
        x1, y1, x2, y2 = (int(math.copysign(math.floor(abs(float(v)) + 0.5), float(v))) for v in scaled)
        roi_w, roi_h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
        bin_h = torch.tensor(roi_h, dtype=acc) / ph_count
        bin_w = torch.tensor(roi_w, dtype=acc) / pw_count
        plane = feats[int(batch)]
        cells = []
        for ph in range(ph_count):
            h0 = min(max(int(math.floor(float(ph * bin_h))) + y1, 0), H)
            h1 = min(max(int(math.ceil(float((ph + 1) * bin_h))) + y1, 0), H)
            for pw in range(pw_count):
                w0 = min(max(int(math.floor(float(pw * bin_w))) + x1, 0), W)
                w1 = min(max(int(math.ceil(float((pw + 1) * bin_w))) + x1, 0), W)
                if h1 <= h0 or w1 <= w0:
                    cells.append(feats.new_zeros(C))
                    continue
                region = plane[:, h0:h1, w0:w1].reshape(C, -1)
                # the first maximum in row-major order wins; NaN never does
                ranked = torch.where(torch.isnan(region), torch.full_like(region, -math.inf), region)
                first = ranked.argmax(dim=1, keepdim=True)
                best = region.gather(1, first).squeeze(1)
                cells.append(torch.where(best > -_FLT_MAX, best, torch.full_like(best, -_FLT_MAX)))
        out = torch.stack(cells, dim=1).reshape(C, ph_count, pw_count)
        outputs.append(out)
    if not outputs:
        return input.new_zeros(0, C, ph_count, pw_count)
    return torch.stack(outputs).to(input.dtype)


def multi_scale_roi_align(features, boxes, output_size, sampling_ratio: int = -1, canonical_scale: float = 224.0,
                          canonical_level: int = 4, *, spatial_scales, aligned: bool = False,
                          eps: float = 1e-6) -> Tensor:
    """Reference :func:`fastdet.ops.multi_scale_roi_align` (explicit ``spatial_scales``): assign each box a level
    with FPN's Eq. (1), then pool each level's boxes with :func:`roi_align` -- a loop over levels, as torchvision
    writes it."""
    rois = _rois(boxes)
    ph_count, pw_count = _pair(output_size)
    if len(features) == 1:
        return roi_align(features[0], rois, output_size, spatial_scales[0], sampling_ratio, aligned)
    k_min = int(-math.log2(spatial_scales[0]))
    k_max = int(-math.log2(spatial_scales[-1]))
    b = rois[:, 1:]
    if b.dtype not in (torch.float32, torch.float64):
        b = b.float()
    size = torch.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    level = torch.floor(canonical_level + torch.log2(size / canonical_scale) + eps).clamp(k_min, k_max)
    level = torch.where(torch.isnan(level), float(k_min), level).to(torch.int64) - k_min
    f0 = features[0]
    result = f0.new_zeros(rois.shape[0], f0.shape[1], ph_count, pw_count)
    for index, (feature, scale) in enumerate(zip(features, spatial_scales)):
        chosen = torch.where(level == index)[0]
        if chosen.numel():
            pooled = roi_align(feature, rois[chosen], output_size, scale, sampling_ratio, aligned)
            result = result.index_put((chosen,), pooled)
    return result
