"""Reference box coding and candidate pre-selection in plain PyTorch (differentiable through autograd).

The formulas are torchvision's BoxCoder, evaluated in float32 for float16/bfloat16 inputs (fastdet's choice: one
rounding at the end) and in the input dtype otherwise. Candidate order in :func:`decode_and_select` is defined by a
full stable sort: best class score descending, ties by increasing anchor index.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["box_decode", "box_encode", "decode_and_select"]


def _acc(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def box_decode(rel_codes: Tensor, boxes: Tensor, weights=(1.0, 1.0, 1.0, 1.0),
               bbox_xform_clip: float = math.log(1000.0 / 16)) -> Tensor:
    """rel_codes [R, 4C] against boxes [R_b, 4] (row r uses box r % R_b) -> [R, 4C] xyxy."""
    out_dtype = rel_codes.dtype
    rel = _acc(rel_codes)
    R = rel.shape[0]
    boxes = _acc(boxes.to(out_dtype)).to(rel.dtype)
    if boxes.shape[0] > 0:
        boxes = boxes.repeat(R // boxes.shape[0], 1)
    wx, wy, ww, wh = weights
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    dx = rel[:, 0::4] / wx
    dy = rel[:, 1::4] / wy
    dw = (rel[:, 2::4] / ww).clamp(max=bbox_xform_clip)
    dh = (rel[:, 3::4] / wh).clamp(max=bbox_xform_clip)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    half_w = 0.5 * (torch.exp(dw) * widths[:, None])
    half_h = 0.5 * (torch.exp(dh) * heights[:, None])
    out = torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h, pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2)
    return out.flatten(1).to(out_dtype)


def box_encode(reference_boxes: Tensor, proposals: Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Deltas [N, 4] of reference_boxes [N, 4] relative to proposals [N, 4]."""
    dtype = torch.promote_types(reference_boxes.dtype, proposals.dtype)
    g, e = _acc(reference_boxes.to(dtype)), _acc(proposals.to(dtype))
    wx, wy, ww, wh = (torch.tensor(w, dtype=g.dtype) for w in weights)
    ew, eh = e[:, 2] - e[:, 0], e[:, 3] - e[:, 1]
    ecx, ecy = e[:, 0] + 0.5 * ew, e[:, 1] + 0.5 * eh
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    gcx, gcy = g[:, 0] + 0.5 * gw, g[:, 1] + 0.5 * gh
    out = torch.stack((wx * (gcx - ecx) / ew, wy * (gcy - ecy) / eh, ww * torch.log(gw / ew),
                       wh * torch.log(gh / eh)), dim=1)
    return out.to(dtype)


def decode_and_select(rel_codes, anchors, scores, score_threshold, top_k, image_sizes=None,
                      weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip=math.log(1000.0 / 16)):
    """Per image: candidates = anchors whose best class score > score_threshold (exactly, in float64), stably sorted by
    best score descending; the first top_k are decoded, clipped and returned padded (index -1, zero box, -inf
    scores). Returns (boxes [B, K, 4], scores [B, K, C], indices [B, K], num_candidates [B])."""
    if scores.dim() == 2:
        scores = scores.unsqueeze(-1)
    B, N, _ = rel_codes.shape
    C = scores.shape[2]
    if anchors.dim() == 2:
        anchors = anchors.unsqueeze(0)
    out_boxes = rel_codes.new_zeros((B, top_k, 4))
    out_scores = scores.new_full((B, top_k, C), float("-inf"))
    out_index = torch.full((B, top_k), -1, dtype=torch.int64, device=rel_codes.device)
    counts = torch.zeros(B, dtype=torch.int64, device=rel_codes.device)
    for b in range(B):
        best = scores[b].amax(dim=-1).double()
        passing = best > score_threshold  # NaN fails
        order = torch.sort(torch.where(passing, best, float("-inf")), descending=True, stable=True).indices
        chosen = order[passing[order]][:top_k]
        k = chosen.numel()
        anc = anchors[b if anchors.shape[0] > 1 else 0]
        boxes = box_decode(rel_codes[b, chosen], anc[chosen], weights, bbox_xform_clip)
        if image_sizes is not None:
            h, w = (float(v) for v in image_sizes[b])
            boxes = torch.stack((boxes[:, 0].clamp(min=0, max=w), boxes[:, 1].clamp(min=0, max=h),
                                 boxes[:, 2].clamp(min=0, max=w), boxes[:, 3].clamp(min=0, max=h)), dim=1)
        out_boxes[b, :k] = boxes
        out_scores[b, :k] = scores[b, chosen]
        out_index[b, :k] = chosen
        counts[b] = k
    return out_boxes, out_scores, out_index, counts
