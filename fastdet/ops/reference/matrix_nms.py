"""Reference Matrix NMS: the dense tensor formulation (N x N IoU, compensation and decay matrices), as mmdetection's
``mask_matrix_nms`` computes it, applied to boxes and restricted to same-category pairs (see
:mod:`fastdet.ops.matrix_nms`). A Python loop over images only."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["matrix_nms"]


def _box_iou(a: Tensor, b: Tensor) -> Tensor:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def matrix_nms(boxes: Tensor, scores: Tensor, idxs: Tensor | None, max_output: int, kernel: str = "gaussian",
               sigma: float = 2.0, score_threshold: float = 0.0):
    if kernel not in ("linear", "gaussian"):
        raise ValueError(f"kernel must be 'linear' or 'gaussian', got {kernel!r}")
    batched = boxes.dim() == 3
    boxes3 = boxes if batched else boxes[None]
    scores2 = scores if batched else scores[None]
    idxs2 = None if idxs is None else (idxs if batched else idxs[None])
    acc = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    score_acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    B, N = scores2.shape
    keep = torch.full((B, max_output), -1, dtype=torch.int64)
    out = torch.zeros((B, max_output), dtype=scores.dtype)
    num = torch.zeros((B,), dtype=torch.int64)
    for b in range(B):
        order = torch.sort(scores2[b], descending=True, stable=True).indices
        bx = boxes3[b][order].to(acc)
        same = torch.ones(N, N, dtype=torch.bool) if idxs2 is None else idxs2[b][order][:, None] == idxs2[b][order][None]
        upper = torch.ones(N, N, dtype=torch.bool).triu(diagonal=1) & same  # [i, j]: i before j, same category
        iou = torch.where(upper, _box_iou(bx, bx), torch.zeros((), dtype=acc))
        comp = torch.where(upper, iou, torch.full((), -1.0, dtype=acc)).amax(0).clamp(min=0) if N else iou.sum(0)
        comp = torch.where(torch.isnan(iou).any(0) if N else comp != comp, torch.nan, comp)  # NaN propagates
        if kernel == "linear":
            ratio = (1 - iou) / (1 - comp[:, None])
        else:
            ratio = torch.exp(-sigma * iou ** 2) / torch.exp(-sigma * comp[:, None] ** 2)
        ratio = torch.where(upper, ratio, torch.ones((), dtype=acc))
        nan = torch.isnan(ratio).any(0)
        decay = torch.where(nan, torch.nan, ratio.amin(0).clamp(max=1)) if N else ratio.sum(0)
        decayed = scores2[b][order].to(score_acc) * decay.to(score_acc)
        kept = decayed.double() > score_threshold
        ranked = torch.where(kept, decayed, float("-inf"))
        top = torch.sort(ranked, descending=True, stable=True).indices[:max_output]
        top = top[kept[top]]
        keep[b, : len(top)] = order[top]
        out[b, : len(top)] = decayed[top].to(scores.dtype)
        num[b] = len(top)
    if not batched:
        keep, out, num = keep[0], out[0], num[0]
    return keep.to(boxes.device), out.to(scores.device), num.to(boxes.device)
