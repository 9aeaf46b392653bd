"""Shared shape handling of the pairwise box ops (the IoU family and rotated IoU): ``[..., N, k] x [..., M, k]``
with broadcast leading dims becomes one batched ``[B, N, k] x [B, M, k]`` kernel call."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def call_pairwise(op, boxes1: Tensor, boxes2: Tensor, *args) -> Tensor:
    """``op(b1 [B, N, k], b2 [B, M, k], *args) -> [B, N, M]`` (or the 2-D form) applied over broadcast leading dims.

    Checks that both sets are on one device and promotes their dtypes as torchvision does (e.g. float32 with float64).
    """
    if boxes1.device != boxes2.device:
        raise ValueError(f"boxes1 and boxes2 must be on the same device, got {boxes1.device} and {boxes2.device}")
    if boxes1.dtype != boxes2.dtype:
        dtype = torch.promote_types(boxes1.dtype, boxes2.dtype)
        boxes1, boxes2 = boxes1.to(dtype), boxes2.to(dtype)
    if boxes1.dim() == 2 and boxes2.dim() == 2:
        return op(boxes1, boxes2, *args)
    lead1, lead2 = boxes1.shape[:-2], boxes2.shape[:-2]
    try:
        lead = torch.broadcast_shapes(lead1, lead2)
    except RuntimeError:
        raise ValueError(
            f"leading (batch) dimensions of boxes1 {tuple(lead1)} and boxes2 {tuple(lead2)} do not broadcast"
        ) from None
    n, m, k = boxes1.shape[-2], boxes2.shape[-2], boxes1.shape[-1]
    batch = math.prod(lead)  # not reshape(-1, ...): with N or M == 0 the -1 would be ambiguous and raise
    b1 = boxes1.expand(*lead, n, k).reshape(batch, n, k)
    b2 = boxes2.expand(*lead, m, k).reshape(batch, m, k)
    return op(b1, b2, *args).reshape(*lead, n, m)
