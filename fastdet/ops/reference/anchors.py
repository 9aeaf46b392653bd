"""Reference anchor and prior generators in plain PyTorch, level by level: the definition of what
:mod:`fastdet.ops.anchors` computes in one kernel.

Output order: level by level; within a level row-major over the grid (y, then x); within a cell the level's shapes in
order. Boxes are xyxy in pixels (YOLO priors may be cxcywh).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["cell_anchors", "generate_anchors", "ssd_default_boxes", "yolo_grid_priors"]


def cell_anchors(sizes, aspect_ratios) -> Tensor:
    """Zero-centred anchors of one level, float32 [len(ratios) * len(sizes), 4]: ratio = h / w, area = size^2, the
    half-sides (w / 2, h / 2) rounded half to even (torchvision's convention)."""
    scales = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = ratios.sqrt()
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


def _stride_pair(s):
    return (float(s[0]), float(s[1])) if isinstance(s, (tuple, list)) else (float(s), float(s))


def _round(t, dtype):
    """float64 -> dtype, through float32 for float16/bfloat16 (the kernels' definition)."""
    if dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    return t.to(dtype)


def _level_grid(h: int, w: int, stride_yx, offset: float, dtype):
    """Cell positions (x + offset) * stride_x, (y + offset) * stride_y, formed in float64 and rounded to dtype, each of
    shape [h * w] in row-major order."""
    sy, sx = stride_yx
    xs = _round((torch.arange(w, dtype=torch.float64) + offset) * sx, dtype)
    ys = _round((torch.arange(h, dtype=torch.float64) + offset) * sy, dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return grid_x.reshape(-1), grid_y.reshape(-1)


def generate_anchors(feature_sizes, strides, sizes, aspect_ratios, *, offset=0.0, dtype=torch.float32, device="cpu"):
    """torchvision AnchorGenerator anchors for explicit grids and strides (see fastdet.ops.generate_anchors)."""
    if not isinstance(sizes[0], (list, tuple)):
        sizes = tuple((s,) for s in sizes)
    if not isinstance(aspect_ratios[0], (list, tuple)):
        aspect_ratios = (aspect_ratios,) * len(sizes)
    levels = []
    for (h, w), stride, size, ratios in zip(feature_sizes, strides, sizes, aspect_ratios):
        base = cell_anchors(size, ratios).to(dtype)
        sx_, sy_ = _level_grid(h, w, _stride_pair(stride), offset, dtype)
        shifts = torch.stack((sx_, sy_, sx_, sy_), dim=1)
        # one rounding to dtype per coordinate (float16 adds are formed in float32 by torch)
        levels.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 4))
    return torch.cat(levels).to(device)


def ssd_default_boxes(feature_sizes, image_size, aspect_ratios, *, min_ratio=0.15, max_ratio=0.9, scales=None,
                      steps=None, clip=True, dtype=torch.float32, device="cpu"):
    """SSD default boxes (torchvision DefaultBoxGenerator) for one image, xyxy pixels."""
    k_levels = len(aspect_ratios)
    if scales is None:
        if k_levels > 1:
            scales = [min_ratio + (max_ratio - min_ratio) * k / (k_levels - 1.0) for k in range(k_levels)] + [1.0]
        else:
            scales = [min_ratio, max_ratio]
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    image_h, image_w = image_size
    levels = []
    for k, (fh, fw) in enumerate(feature_sizes):
        wh = [[scales[k], scales[k]], [math.sqrt(scales[k] * scales[k + 1])] * 2]
        for ar in aspect_ratios[k]:
            wh += [[scales[k] * math.sqrt(ar), scales[k] / math.sqrt(ar)],
                   [scales[k] / math.sqrt(ar), scales[k] * math.sqrt(ar)]]
        wh = torch.tensor(wh, dtype=torch.float32)
        if clip:
            wh = wh.clamp(0, 1)
        div_y, div_x = (image_h / steps[k], image_w / steps[k]) if steps is not None else (fh, fw)
        # centres (i + 0.5) / f in float32, rounded to the feature dtype, then promoted with the float32 sizes
        cx = ((torch.arange(fw, dtype=torch.float32) + 0.5) / div_x).to(dtype).to(out_dtype)
        cy = ((torch.arange(fh, dtype=torch.float32) + 0.5) / div_y).to(dtype).to(out_dtype)
        gy, gx = torch.meshgrid(cy, cx, indexing="ij")
        centres = torch.stack((gx.reshape(-1), gy.reshape(-1)), dim=1)[:, None, :].expand(-1, wh.shape[0], 2)
        half = 0.5 * wh.to(out_dtype)[None].expand_as(centres)
        scale = torch.tensor([image_w, image_h], dtype=out_dtype)
        boxes = torch.cat(((centres - half) * scale, (centres + half) * scale), dim=-1)
        levels.append(boxes.reshape(-1, 4))
    return torch.cat(levels).to(device)


def yolo_grid_priors(feature_sizes, strides, anchor_sizes=None, *, offset=0.5, fmt="cxcywh", dtype=torch.float32,
                     device="cpu"):
    """YOLO-style priors: cell centres ((x + offset) * stride) and per-level (w, h) sizes (stride-sized points when
    anchor_sizes is None), formed in float64 and rounded once (through float32 for float16/bfloat16)."""
    levels = []
    for i, ((h, w), stride) in enumerate(zip(feature_sizes, strides)):
        sy, sx = _stride_pair(stride)
        sizes = [(sx, sy)] if anchor_sizes is None else anchor_sizes[i]
        wh = torch.tensor(sizes, dtype=torch.float64).reshape(-1, 2)
        cx, cy = _level_grid(h, w, (sy, sx), offset, torch.float64)
        centres = torch.stack((cx, cy), dim=1)[:, None, :].expand(-1, wh.shape[0], 2)
        wh = wh[None].expand_as(centres)
        if fmt == "xyxy":
            boxes = torch.cat((centres - 0.5 * wh, centres + 0.5 * wh), dim=-1)
        else:
            boxes = torch.cat((centres, wh), dim=-1)
        levels.append(boxes.reshape(-1, 4))
    return _round(torch.cat(levels), dtype).to(device)
