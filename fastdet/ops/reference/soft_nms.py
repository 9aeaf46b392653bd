"""Reference soft-NMS: ensemble-boxes' sequential algorithm written out with torch tensors (see
:mod:`fastdet.ops.soft_nms` for the rules). Python loops, for test-sized inputs."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["soft_nms", "soft_nms_fixed"]


def _run(boxes: Tensor, scores: Tensor, iou_threshold: float, sigma: float, score_threshold: float, method: str):
    """(original index, final score, kept) per slot, one category."""
    if method not in ("linear", "gaussian"):
        raise ValueError(f"method must be 'linear' or 'gaussian', got {method!r}")
    score_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    b = boxes.detach().to(torch.float64).cpu().tolist()
    s = scores.detach().to(score_dtype).cpu()
    n = len(b)
    slots = [(x1, y1, x2, y2, (x2 - x1) * (y2 - y1), i) for i, (x1, y1, x2, y2) in enumerate(b)]
    sc = s.clone()

    def rank_key(j):  # numpy's argmax order: first NaN, else first largest
        v = sc[j].item()
        return (0, j) if math.isnan(v) else (1, -v, j)

    for i in range(n):
        if i < n - 1:
            best = min(range(i + 1, n), key=rank_key)
            if sc[i].item() < sc[best].item():
                slots[i], slots[best] = slots[best], slots[i]
                sc[[i, best]] = sc[[best, i]]
        a = slots[i]
        for j in range(i + 1, n):
            c = slots[j]
            w = max(0.0, min(a[3], c[3]) - max(a[1], c[1])) if not any(map(math.isnan, (a[1], a[3], c[1], c[3]))) \
                else math.nan
            h = max(0.0, min(a[2], c[2]) - max(a[0], c[0])) if not any(map(math.isnan, (a[0], a[2], c[0], c[2]))) \
                else math.nan
            inter = w * h
            union = a[4] + c[4] - inter
            ovr = inter / union if union != 0 else (math.nan if inter == 0 or math.isnan(inter) else
                                                     math.copysign(math.inf, inter) * math.copysign(1.0, union))
            if method == "linear":
                weight = 1.0 - ovr if ovr > iou_threshold else 1.0
            else:
                weight = math.exp(-(ovr * ovr) / sigma) if not math.isnan(ovr) else math.nan
            # weight (float64) times the score, rounded to the score dtype as numpy's assignment does
            sc[j] = torch.tensor(weight * sc[j].item(), dtype=torch.float64).to(score_dtype)
    index = [slot[5] for slot in slots]
    kept = [v > score_threshold for v in sc.tolist()]
    return index, sc, kept


def soft_nms(boxes: Tensor, scores: Tensor, iou_threshold: float = 0.3, sigma: float = 0.5,
             score_threshold: float = 0.001, method: str = "gaussian") -> tuple[Tensor, Tensor]:
    """Kept indices (visit order) and their decayed scores."""
    index, sc, kept = _run(boxes, scores, float(iou_threshold), float(sigma), float(score_threshold), method)
    keep = [i for i, k in zip(index, kept) if k]
    values = sc[torch.tensor(kept, dtype=torch.bool)] if kept else sc[:0]
    return (torch.tensor(keep, dtype=torch.int64, device=boxes.device),
            values.to(scores.dtype).to(scores.device))


def soft_nms_fixed(boxes: Tensor, scores: Tensor, idxs: Tensor | None, max_output: int, iou_threshold: float = 0.3,
                   sigma: float = 0.5, score_threshold: float = 0.001, method: str = "gaussian"):
    """Per image and category soft-NMS, merged by decreasing decayed score (ties: category, then visit order)."""
    batched = boxes.dim() == 3
    boxes3 = boxes if batched else boxes[None]
    scores2 = scores if batched else scores[None]
    idxs2 = None if idxs is None else (idxs if batched else idxs[None])
    B = boxes3.shape[0]
    keep = torch.full((B, max_output), -1, dtype=torch.int64)
    out = torch.zeros((B, max_output), dtype=scores.dtype)
    num = torch.zeros((B,), dtype=torch.int64)
    for b in range(B):
        cats = [0] * boxes3.shape[1] if idxs2 is None else idxs2[b].tolist()
        entries = []
        for c in sorted(set(cats)):
            members = [i for i, v in enumerate(cats) if v == c]
            index, sc, kept = _run(boxes3[b, members], scores2[b, members], float(iou_threshold), float(sigma),
                                   float(score_threshold), method)
            entries += [(sc[p].item(), c, p, members[index[p]]) for p in range(len(index)) if kept[p]]
        entries.sort(key=lambda e: (-e[0], e[1], e[2]))
        entries = entries[:max_output]
        num[b] = len(entries)
        for k, (value, _, _, i) in enumerate(entries):
            keep[b, k] = i
            out[b, k] = value
    if not batched:
        keep, out, num = keep[0], out[0], num[0]
    return keep.to(boxes.device), out.to(scores.device), num.to(boxes.device)
