"""Reference rotated-box IoU and rotated NMS, in plain PyTorch: the test oracle of :mod:`fastdet.ops.rotated`.

Boxes are ``(cx, cy, w, h, angle)`` (torchvision's ``'cxcywhr'``: degrees, counter-clockwise in the image plane, y
down). The intersection of two rotated rectangles is built the textbook way, independently of the native kernels'
half-plane clipping: its vertices are the corners of each box lying inside the other plus the crossing points of
their edges; ordered by angle around their mean, they form the convex intersection polygon, whose area is given by
the shoelace formula. Everything is computed in float64; IoU is returned in float32 (torchvision's result dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batched_nms_rotated", "box_iou_rotated", "nms_rotated"]

# Points within this distance (relative to the boxes' size) of an edge count as on it; duplicates of a vertex this
# creates add nothing to the area.
_REL_TOL = 1e-9


def _check_rotated(boxes: Tensor, name: str) -> None:
    if not isinstance(boxes, Tensor) or not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(boxes, 'dtype', type(boxes))}")
    if boxes.dim() != 2 or boxes.shape[-1] != 5:
        raise ValueError(f"{name} must have shape [N, 5] (cx, cy, w, h, angle), got {tuple(boxes.shape)}")


def corners(boxes: Tensor) -> Tensor:
    """``[..., 5]`` cxcywhr boxes -> ``[..., 4, 2]`` corners: top-left, top-right, bottom-right, bottom-left."""
    cx, cy, w, h, angle = boxes.double().unbind(-1)
    theta = torch.deg2rad(angle)
    cos, sin = torch.cos(theta), torch.sin(theta)
    dx = torch.stack((-w / 2, w / 2, w / 2, -w / 2), dim=-1)
    dy = torch.stack((-h / 2, -h / 2, h / 2, h / 2), dim=-1)
    x = cx[..., None] + dx * cos[..., None] + dy * sin[..., None]
    y = cy[..., None] - dx * sin[..., None] + dy * cos[..., None]
    return torch.stack((x, y), dim=-1)


def _inside(points: Tensor, rect: Tensor, tol: Tensor) -> Tensor:
    """points [P, K, 2] inside (or on) the rectangles rect [P, 4, 2] -> [P, K] bool."""
    origin = rect[:, 0:1]  # [P, 1, 2]
    u = rect[:, 1:2] - origin  # one side
    v = rect[:, 3:4] - origin  # the adjacent side
    d = points - origin
    pu = (d * u).sum(-1) / (u * u).sum(-1)
    pv = (d * v).sum(-1) / (v * v).sum(-1)
    t = tol[:, None]
    return (pu >= -t) & (pu <= 1 + t) & (pv >= -t) & (pv <= 1 + t)


def _edge_crossings(a: Tensor, b: Tensor, tol: Tensor) -> tuple[Tensor, Tensor]:
    """Crossing points of every edge of a [P, 4, 2] with every edge of b: ([P, 16, 2] points, [P, 16] valid)."""
    p, r = a, a.roll(-1, dims=1) - a  # edges p + t r
    q, s = b, b.roll(-1, dims=1) - b  # edges q + u s
    p, r = p[:, :, None], r[:, :, None]  # [P, 4, 1, 2]
    q, s = q[:, None], s[:, None]  # [P, 1, 4, 2]

    def cross(m, n):
        return m[..., 0] * n[..., 1] - m[..., 1] * n[..., 0]

    denom = cross(r, s)
    qp = q - p
    parallel = denom == 0
    safe = torch.where(parallel, torch.ones_like(denom), denom)
    t = cross(qp, s) / safe
    u = cross(qp, r) / safe
    tt = tol[:, None, None]
    valid = ~parallel & (t >= -tt) & (t <= 1 + tt) & (u >= -tt) & (u <= 1 + tt)
    points = p + t[..., None] * r
    return points.reshape(a.shape[0], 16, 2), valid.reshape(a.shape[0], 16)


def _intersection_area(a: Tensor, b: Tensor) -> Tensor:
    """Area of the intersection of the convex quadrilaterals a, b [P, 4, 2] (float64) -> [P]."""
    if a.shape[0] == 0:
        return a.new_zeros(0)
    tol = torch.full((a.shape[0],), _REL_TOL, dtype=a.dtype, device=a.device)
    crossings, crossing_valid = _edge_crossings(a, b, tol)
    points = torch.cat((a, b, crossings), dim=1)  # [P, 24, 2]
    valid = torch.cat((_inside(a, b, tol), _inside(b, a, tol), crossing_valid), dim=1)
    count = valid.sum(1)
    weights = valid.double()
    centre = (points * weights[..., None]).sum(1) / count.clamp(min=1)[:, None]
    rel = points - centre[:, None]
    angle = torch.atan2(rel[..., 1], rel[..., 0])
    angle = torch.where(valid, angle, torch.full_like(angle, float("inf")))  # invalid points sort last
    order = angle.argsort(dim=1)
    rel = rel.gather(1, order[..., None].expand(-1, -1, 2))
    # Invalid entries (after the valid ones) become copies of the first point: they add zero-length edges only.
    position = torch.arange(points.shape[1], device=a.device)
    rel = torch.where((position[None] < count[:, None])[..., None], rel, rel[:, :1])
    following = rel.roll(-1, dims=1)
    twice = (rel[..., 0] * following[..., 1] - rel[..., 1] * following[..., 0]).sum(1)
    return torch.where(count >= 3, twice.abs() / 2, torch.zeros_like(twice))


def _iou_float64(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    n, m = boxes1.shape[0], boxes2.shape[0]
    b1, b2 = boxes1.double(), boxes2.double()
    c1 = corners(b1)[:, None].expand(n, m, 4, 2).reshape(n * m, 4, 2)
    c2 = corners(b2)[None].expand(n, m, 4, 2).reshape(n * m, 4, 2)
    # In chunks of pairs, to bound the memory of the [pairs, 24, 2] candidate vertices.
    chunk = 1 << 16
    parts = [_intersection_area(c1[i : i + chunk], c2[i : i + chunk]) for i in range(0, n * m, chunk)]
    inter = (torch.cat(parts) if parts else c1.new_zeros(0)).reshape(n, m)
    area1 = (b1[:, 2] * b1[:, 3])[:, None]
    area2 = (b2[:, 2] * b2[:, 3])[None]
    iou = inter / (area1 + area2 - inter)
    return torch.where((area1 < 1e-14) | (area2 < 1e-14), torch.zeros_like(iou), iou)


def box_iou_rotated(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of every pair of rotated boxes ``[N, 5] x [M, 5] -> [N, M]`` float32; boxes of area below 1e-14 have IoU
    0 with everything (torchvision's rule)."""
    _check_rotated(boxes1, "boxes1")
    _check_rotated(boxes2, "boxes2")
    return _iou_float64(boxes1, boxes2).float()


def _greedy(boxes: Tensor, scores: Tensor, categories: list, iou_threshold: float) -> list[int]:
    order = torch.sort(scores, descending=True, stable=True).indices.tolist()
    kept_by_category: dict = {}
    keep: list[int] = []
    for i in order:
        kept = kept_by_category.setdefault(categories[i], [])
        # Kept before i, same category, IoU > threshold (NaN never suppresses); IoU evaluated as (kept, candidate).
        suppressed = False
        if kept:
            ious = _iou_float64(boxes[kept], boxes[i : i + 1])
            suppressed = bool((ious > iou_threshold).any())
        if not suppressed:
            kept.append(i)
            keep.append(i)
    return keep


def nms_rotated(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS of rotated ``boxes (Tensor[N, 5])``: visit by score descending (ties by index), keep a box unless a
    kept box overlaps it with IoU > iou_threshold. Returns kept indices (int64) in visit order."""
    _check_rotated(boxes, "boxes")
    keep = _greedy(boxes, scores, [0] * boxes.shape[0], float(iou_threshold))
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def batched_nms_rotated(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """:func:`nms_rotated` where a box suppresses only boxes of its own category ``idxs (Tensor[N])``."""
    _check_rotated(boxes, "boxes")
    keep = _greedy(boxes, scores, idxs.tolist(), float(iou_threshold))
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)
