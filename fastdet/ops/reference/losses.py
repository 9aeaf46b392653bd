"""Reference detection losses in plain PyTorch: the test oracle for :mod:`fastdet.ops.losses`.

Readable composites differentiated by ordinary autograd. They compute in float32 (float64 for float64 inputs) and
round the result once to the caller's dtype, which is what fastdet's kernels promise; torchvision instead rounds every
intermediate of the focal loss to float16/bfloat16 (its box losses upcast, as here).

Semantics shared with fastdet (see its docstrings for the details):

* ``sigmoid_focal_loss``: torchvision's formula; ``'mean'`` divides by the number of elements; ``alpha < 0`` disables
  the alpha weighting; an optional ``normalizer`` divides the result. Written with ``sigmoid(-x)`` for ``1 - p`` and
  with 0 * inf taken as 0 where a coefficient is exactly zero, so that infinite logits give the limits fastdet
  documents instead of NaN (while the gradient with respect to a target of exactly 0 or 1 stays the true one).
* ``sigmoid_focal_loss_with_labels``: the one-hot form; ``-1`` and ``C`` are background rows, ``ignore_index`` rows
  are dropped, ``'mean'`` divides by (kept rows * C) and is 0 when no row is kept.
* box losses: torchvision's formulas (including CIoU's fixed inner eps of 1e-7); ``'mean'`` of no pairs is 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "complete_box_iou_loss",
    "distance_box_iou_loss",
    "generalized_box_iou_loss",
    "sigmoid_focal_loss",
    "sigmoid_focal_loss_with_labels",
    "smooth_l1_loss",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _acc(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _LOW_PRECISION else t


def _softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)), accurate everywhere (F.softplus returns x itself beyond its threshold of 20, off by ~1e-10
    relative in float64) and with finite gradients at +-inf: each branch of the where() only ever sees inputs of its
    own sign, so the unused branch cannot produce inf * 0 in the backward."""
    positive = x > 0
    xp = torch.where(positive, x, torch.zeros_like(x))
    xn = torch.where(positive, torch.zeros_like(x), x)
    return torch.where(positive, xp + torch.log1p(torch.exp(-xp)), torch.log1p(torch.exp(xn)))


def _focal_terms(x: Tensor, t: Tensor, alpha: float, gamma: float) -> Tensor:
    p, pm = torch.sigmoid(x), torch.sigmoid(-x)
    # BCE with logits = t * softplus(-x) + (1 - t) * softplus(x). Where a coefficient is exactly zero and its softplus
    # is infinite (an infinite logit), the softplus is replaced by 0 so that 0 * inf does not turn the limit into NaN.
    # The coefficient itself stays in the product: the gradient with respect to a target of exactly 0 or 1 is the
    # softplus it multiplies (dropping the whole term would make it 0).
    ce = t * _zero_inf_where(t == 0, _softplus(-x)) + (1 - t) * _zero_inf_where(t == 1, _softplus(x))
    q = p * (1 - t) + pm * t  # 1 - p_t
    loss = ce * q**gamma if gamma != 0 else ce
    if alpha >= 0:
        # alpha 0 or 1 gives one side a zero weight: its loss is 0 even where the unweighted loss is infinite.
        a_t = alpha * t + (1 - alpha) * (1 - t)
        loss = a_t * _zero_inf_where(a_t == 0, loss)
    return loss


def _zero_inf_where(zero_coefficient: Tensor, v: Tensor) -> Tensor:
    """v, with 0 where its coefficient is exactly zero and v is infinite (0 * inf -> the limit 0, not NaN)."""
    return torch.where(zero_coefficient & torch.isinf(v), torch.zeros_like(v), v)


def _reduce(loss: Tensor, reduction: str, count, normalizer) -> Tensor:
    if reduction == "mean":
        loss = loss.sum() / count
    elif reduction == "sum":
        loss = loss.sum()
    elif reduction != "none":
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")
    if normalizer is not None:
        loss = loss / torch.as_tensor(normalizer, device=loss.device).to(loss.dtype).detach().reshape(())
    return loss


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none", normalizer=None) -> Tensor:
    x, t = _acc(inputs), targets.to(inputs.dtype).to(_acc(inputs).dtype)
    loss = _focal_terms(x, t, alpha, gamma)
    return _reduce(loss, reduction, loss.numel(), normalizer).to(inputs.dtype)


def sigmoid_focal_loss_with_labels(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                                   reduction: str = "none", normalizer=None, ignore_index: int = -100) -> Tensor:
    x = _acc(logits)
    num_classes = logits.shape[-1]
    keep = labels != ignore_index
    bad = keep & ((labels < -1) | (labels > num_classes))
    if bool(bad.any()):
        raise ValueError(f"labels must be in [-1, {num_classes}] or ignore_index={ignore_index}")
    positive = keep & (labels >= 0) & (labels < num_classes)
    onehot = torch.zeros_like(x)
    onehot[positive] = F.one_hot(labels[positive], num_classes).to(x.dtype)
    loss = _focal_terms(x, onehot, alpha, gamma) * keep.unsqueeze(-1).to(x.dtype)
    count = keep.sum() * num_classes
    if reduction == "mean":
        loss = torch.where(count > 0, loss.sum() / count.clamp(min=1), loss.sum() * 0)
        reduction = "none"  # already reduced
    return _reduce(loss, reduction, count, normalizer).to(logits.dtype)


def smooth_l1_loss(input: Tensor, target: Tensor, beta: float = 1.0, reduction: str = "none") -> Tensor:
    d = (input - target).abs()
    loss = d - 0.5 * beta if beta == 0 else torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta)
    return _reduce(loss, reduction, loss.numel(), None)


def _inter_union(b1: Tensor, b2: Tensor):
    x1, y1, x2, y2 = b1.unbind(-1)
    x1g, y1g, x2g, y2g = b2.unbind(-1)
    xk1, yk1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xk2, yk2 = torch.min(x2, x2g), torch.min(y2, y2g)
    overlap = (yk2 > yk1) & (xk2 > xk1)
    inter = torch.where(overlap, (xk2 - xk1) * (yk2 - yk1), torch.zeros_like(x1))
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    return inter, union


def _enclosure(b1: Tensor, b2: Tensor):
    x1, y1, x2, y2 = b1.unbind(-1)
    x1g, y1g, x2g, y2g = b2.unbind(-1)
    return torch.min(x1, x1g), torch.min(y1, y1g), torch.max(x2, x2g), torch.max(y2, y2g)


def _box_reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean() if loss.numel() > 0 else 0.0 * loss.sum()
    return _reduce(loss, reduction, None, None)


def _diou(b1: Tensor, b2: Tensor, eps: float):
    inter, union = _inter_union(b1, b2)
    iou = inter / (union + eps)
    xc1, yc1, xc2, yc2 = _enclosure(b1, b2)
    diag = (xc2 - xc1) ** 2 + (yc2 - yc1) ** 2 + eps
    x1, y1, x2, y2 = b1.unbind(-1)
    x1g, y1g, x2g, y2g = b2.unbind(-1)
    centres = ((x2 + x1) / 2 - (x1g + x2g) / 2) ** 2 + ((y2 + y1) / 2 - (y1g + y2g) / 2) ** 2
    return 1 - iou + centres / diag, iou


def generalized_box_iou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    b1, b2 = _acc(boxes1), _acc(boxes2)
    inter, union = _inter_union(b1, b2)
    iou = inter / (union + eps)
    xc1, yc1, xc2, yc2 = _enclosure(b1, b2)
    area_c = (xc2 - xc1) * (yc2 - yc1)
    return _box_reduce(1 - (iou - (area_c - union) / (area_c + eps)), reduction)


def distance_box_iou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    return _box_reduce(_diou(_acc(boxes1), _acc(boxes2), eps)[0], reduction)


def complete_box_iou_loss(boxes1: Tensor, boxes2: Tensor, reduction: str = "none", eps: float = 1e-7) -> Tensor:
    b1, b2 = _acc(boxes1), _acc(boxes2)
    diou, iou = _diou(b1, b2, 1e-7)  # torchvision's inner eps is fixed
    w1, h1 = b1[..., 2] - b1[..., 0], b1[..., 3] - b1[..., 1]
    w2, h2 = b2[..., 2] - b2[..., 0], b2[..., 3] - b2[..., 1]
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return _box_reduce(diou + alpha * v, reduction)
