"""Box coding: torchvision's ``BoxCoder`` (R-CNN deltas) as kernels, and ``decode_and_select``, the fused
post-processing front end that turns a batch of dense predictions into the fixed-size candidate set that
:func:`fastdet.ops.multiclass_nms` consumes.

Delta convention (torchvision / Detectron / mmdetection's ``DeltaXYWHBBoxCoder`` without means and stds): for a
reference box of size ``(w, h)`` and centre ``(cx, cy)`` (``cx = x1 + 0.5 * w``), deltas ``(dx, dy, dw, dh)`` weighted
by ``(wx, wy, ww, wh)`` decode to centre ``(dx / wx * w + cx, dy / wy * h + cy)`` and size
``(exp(min(dw / ww, clip)) * w, exp(min(dh / wh, clip)) * h)``. Weights are ``(1, 1, 1, 1)`` for RPN and RetinaNet,
``(10, 10, 5, 5)`` for the Fast R-CNN box head; ``clip = log(1000 / 16)`` stops ``exp`` from overflowing.

Numerics: float32 and float64 follow torchvision operation by operation (same order, each step rounded). On the CPU,
``box_decode``/``box_encode`` evaluate ``exp``/``log`` with torch's own kernels over arrays laid out like
torchvision's intermediate tensors, so their results are torchvision's bit for bit (same thread count). On CUDA,
and in ``decode_and_select``'s gather-decode, exp/log are ``expf``/``logf`` of the math library (within an ulp or two
of torch's), so a decoded corner can differ from torchvision's by that much times the box size. float16/bfloat16 are
computed in float32 and rounded once (torchvision rounds every intermediate to the low-precision dtype, so it is less
accurate there). Degenerate or NaN boxes give what the formulas give (NaN in, NaN
out; a zero-width reference box encodes to inf/NaN), as in torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from fastdet.ops._registry import native, register_autograd, register_fake
from fastdet.ops.nms import _strictly_above

__all__ = ["BoxCoder", "box_decode", "box_encode", "decode_and_select"]

DEFAULT_BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_weights(weights) -> list[float]:
    try:
        weights = [float(w) for w in weights]
    except TypeError:
        raise TypeError(f"weights must be 4 numbers (wx, wy, ww, wh), got {weights!r}") from None
    if len(weights) != 4 or not all(-math.inf < w < math.inf and w != 0 for w in weights):
        raise ValueError(f"weights must be 4 finite non-zero numbers (wx, wy, ww, wh), got {weights!r}")
    return weights


def _check_clip(clip) -> float:
    clip = float(clip)
    if clip != clip:  # NaN (no math.isnan: symbolic floats trace through a comparison)
        raise ValueError("bbox_xform_clip must not be NaN")
    return clip


def _check_boxes(boxes: Tensor, name: str) -> None:
    _check_tensor(boxes, name)
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")


def box_decode(rel_codes: Tensor, boxes: Tensor, weights=(1.0, 1.0, 1.0, 1.0),
               bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP) -> Tensor:
    """Decode deltas against reference boxes (torchvision ``BoxCoder.decode_single``).

    Args:
        rel_codes (Tensor[R, 4 * C]): C sets of ``(dx, dy, dw, dh)`` per row (C = 1 for class-agnostic regression,
            the number of classes for the R-CNN box head).
        boxes (Tensor[R_b, 4]): reference boxes (anchors or proposals), xyxy; ``R`` must be a multiple of ``R_b`` and
            row ``r`` uses box ``r % R_b``, so a batch ``[B * N, 4]`` decodes against one set of N anchors without
            repeating them. Converted to ``rel_codes.dtype`` first, as torchvision does.
        weights (4 floats): ``(wx, wy, ww, wh)``.
        bbox_xform_clip (float): upper clamp of ``dw / ww`` and ``dh / wh``.

    Returns:
        Tensor[R, 4 * C]: decoded xyxy boxes in ``rel_codes.dtype``. Differentiable with respect to both inputs
        (box losses such as GIoU on decoded boxes need it); the clamp passes no gradient at or above the clip,
        as torch.clamp does.
    """
    _check_tensor(rel_codes, "rel_codes")
    _check_boxes(boxes, "boxes")
    if rel_codes.device != boxes.device:
        raise ValueError(f"rel_codes and boxes must be on the same device, got {rel_codes.device} and {boxes.device}")
    if rel_codes.dim() != 2 or rel_codes.shape[1] % 4 != 0:
        raise ValueError(f"rel_codes must have shape [R, 4 * C], got {tuple(rel_codes.shape)}")
    R, Rb = rel_codes.shape[0], boxes.shape[0]
    if not ((R == 0 and Rb == 0) or (Rb > 0 and R % Rb == 0)):
        raise ValueError(f"rel_codes has {R} rows, which must be a multiple of the number of boxes ({Rb})")
    boxes = boxes.to(rel_codes.dtype)
    return native("box_decode")(rel_codes, boxes, _check_weights(weights), _check_clip(bbox_xform_clip))


def box_encode(reference_boxes: Tensor, proposals: Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Encode ``reference_boxes`` (the targets, e.g. matched ground truth) relative to ``proposals`` (anchors), as
    torchvision's ``BoxCoder.encode_single`` / ``encode_boxes``.

    Args:
        reference_boxes (Tensor[N, 4]), proposals (Tensor[N, 4]): xyxy boxes, paired row by row; mixed dtypes are
            promoted.
        weights (4 floats): ``(wx, wy, ww, wh)``.

    Returns:
        Tensor[N, 4]: ``(dx, dy, dw, dh)``. Regression targets are normally constants; if an input requires grad, the
        result is differentiable (the backward is formed from ATen operations).
    """
    _check_boxes(reference_boxes, "reference_boxes")
    _check_boxes(proposals, "proposals")
    if reference_boxes.device != proposals.device:
        raise ValueError(
            f"reference_boxes and proposals must be on the same device, got {reference_boxes.device} and "
            f"{proposals.device}"
        )
    if reference_boxes.shape[0] != proposals.shape[0]:
        raise ValueError(
            f"reference_boxes and proposals must have the same number of boxes, got {reference_boxes.shape[0]} and "
            f"{proposals.shape[0]}"
        )
    dtype = torch.promote_types(reference_boxes.dtype, proposals.dtype)
    return native("box_encode")(reference_boxes.to(dtype), proposals.to(dtype), _check_weights(weights))


class BoxCoder:
    """Drop-in replacement for ``torchvision.models.detection._utils.BoxCoder``.

    Args:
        weights (4 floats): ``(wx, wy, ww, wh)``.
        bbox_xform_clip (float): upper clamp of the size deltas, default ``log(1000 / 16)``.
    """

    def __init__(self, weights: tuple[float, float, float, float],
                 bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP) -> None:
        self.weights = tuple(_check_weights(weights))
        self.bbox_xform_clip = _check_clip(bbox_xform_clip)

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> list[Tensor]:
        """Per-image lists in, per-image ``Tensor[N_i, 4]`` deltas out (one kernel launch for the whole list)."""
        boxes_per_image = [len(b) for b in reference_boxes]
        targets = self.encode_single(torch.cat(reference_boxes, dim=0), torch.cat(proposals, dim=0))
        return targets.split(boxes_per_image, 0)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        return box_encode(reference_boxes, proposals, self.weights)

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        """``rel_codes (Tensor[sum N_i, 4 * C])`` against per-image boxes ``[Tensor[N_i, 4]]`` -> ``Tensor[sum N_i, C,
        4]``, as torchvision."""
        if not isinstance(boxes, (list, tuple)):
            raise TypeError("boxes must be a list or tuple of Tensor[N_i, 4]")
        if not isinstance(rel_codes, Tensor):
            raise TypeError("rel_codes must be a Tensor")
        box_sum = sum(b.size(0) for b in boxes)
        if len(boxes) > 1 and all(b is boxes[0] for b in boxes):
            # Every image uses the same anchors tensor (fastdet's generators return one shared tensor per batch):
            # decode row r against anchor r % N instead of concatenating B copies. Same values, no copy.
            concat_boxes = boxes[0]
        else:
            concat_boxes = torch.cat(list(boxes), dim=0)
        if box_sum > 0:
            rel_codes = rel_codes.reshape(box_sum, -1)
        pred_boxes = self.decode_single(rel_codes, concat_boxes)
        if box_sum > 0:
            pred_boxes = pred_boxes.reshape(box_sum, -1, 4)
        return pred_boxes

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        return box_decode(rel_codes, boxes, self.weights, self.bbox_xform_clip)


def decode_and_select(
    rel_codes: Tensor,
    anchors: Tensor,
    scores: Tensor,
    score_threshold: float,
    top_k: int,
    image_sizes: Tensor | Sequence[tuple[int, int]] | None = None,
    weights=(1.0, 1.0, 1.0, 1.0),
    bbox_xform_clip: float = DEFAULT_BBOX_XFORM_CLIP,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-image pre-selection of a dense detector's output for a whole batch: score threshold, top-k, decode of the
    selected boxes only and clipping to the image, with fixed-size outputs and no host synchronisation.

    Args:
        rel_codes (Tensor[B, N, 4]): class-agnostic box deltas (RetinaNet, RPN, anchor-based YOLO after reshaping).
        anchors (Tensor[N, 4] or Tensor[B, N, 4]): reference boxes, xyxy, shared by the batch or per image.
        scores (Tensor[B, N, C] or Tensor[B, N]): activated class scores (sigmoid/softmax); ``[B, N]`` = one class.
        score_threshold (float): an anchor is a candidate if its best class score is > score_threshold (compared
            exactly, as :func:`fastdet.ops.multiclass_nms` does; NaN never passes).
        top_k (int): K, the number of candidate slots per image.
        image_sizes (Tensor[B, 2] or list of (height, width), optional): clip each image's boxes to
            ``[0, width] x [0, height]``; None = no clipping. A list is checked (non-negative) and copied to the
            device with a pinned, non-blocking copy; a tensor is used as is (its values are not checked, since that
            would synchronise).
        weights, bbox_xform_clip: as :class:`BoxCoder`.

    Returns:
        boxes (Tensor[B, K, 4]): decoded (and clipped) xyxy boxes of the candidates, in ``rel_codes.dtype``.
        scores (Tensor[B, K, C]): all class scores of each candidate (``[B, K, 1]`` for ``[B, N]`` input).
        indices (Tensor[B, K] int64): the candidate's anchor index in ``[0, N)``.
        num_candidates (Tensor[B] int64): how many slots are real.
        Slots past ``num_candidates`` hold index -1, a zero box and scores ``-inf`` (so they never pass any
        threshold downstream). Pass ``boxes, scores`` straight to ``multiclass_nms``.

    Order, defined exactly: candidates are the anchors whose best score passes, ordered by best score descending, ties
    by increasing anchor index (a stable sort); the first K form the output. The selection uses ``topk`` plus an exact
    tie resolution at the K-th value rather than a full sort, so it is linear in N, and its result is identical to
    the stable-sort definition on every backend. Inference only: the outputs carry no gradient.
    """
    _check_tensor(rel_codes, "rel_codes")
    _check_tensor(anchors, "anchors")
    _check_tensor(scores, "scores")
    if rel_codes.dim() != 3 or rel_codes.shape[-1] != 4:
        raise ValueError(f"rel_codes must have shape [B, N, 4], got {tuple(rel_codes.shape)}")
    B, N, _ = rel_codes.shape
    if scores.dim() == 2:
        scores = scores.unsqueeze(-1)
    if scores.dim() != 3 or tuple(scores.shape[:2]) != (B, N) or scores.shape[2] < 1:
        raise ValueError(f"scores must have shape [B, N, C] or [B, N] with (B, N) = {(B, N)} and C >= 1, got "
                         f"{tuple(scores.shape)}")
    if anchors.dim() == 2:
        anchors = anchors.unsqueeze(0)
    if anchors.dim() != 3 or anchors.shape[0] not in (1, B) or tuple(anchors.shape[1:]) != (N, 4):
        raise ValueError(f"anchors must have shape [N, 4] or [B, N, 4] with (B, N) = {(B, N)}, got "
                         f"{tuple(anchors.shape)}")
    for name, t in (("anchors", anchors), ("scores", scores)):
        if t.device != rel_codes.device:
            raise ValueError(f"rel_codes and {name} must be on the same device, got {rel_codes.device} and {t.device}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative int, got {top_k!r}")
    score_threshold = float(score_threshold)
    if score_threshold != score_threshold:  # NaN
        raise ValueError("score_threshold must not be NaN")
    sizes = _image_sizes_tensor(image_sizes, B, rel_codes.device)
    weights, clip = _check_weights(weights), _check_clip(bbox_xform_clip)
    rel_codes, anchors, scores = rel_codes.detach(), anchors.detach().to(rel_codes.dtype), scores.detach()

    index, valid = _select_top_k(scores, score_threshold, top_k)
    boxes = native("_decode_select_boxes")(rel_codes, anchors, index, sizes, weights, clip)
    C = scores.shape[2]
    if N == 0:  # nothing to gather from: every slot is padding
        cand_scores = scores.new_full((B, top_k, C), float("-inf"))
    else:
        safe = index.clamp(min=0)
        cand_scores = scores.gather(1, safe.unsqueeze(-1).expand(B, top_k, C))
        cand_scores = cand_scores.masked_fill(~valid.unsqueeze(-1), float("-inf"))
    return boxes, cand_scores, index, valid.sum(dim=1)


def _image_sizes_tensor(image_sizes, batch: int, device) -> Tensor | None:
    if image_sizes is None:
        return None
    if isinstance(image_sizes, Tensor):
        sizes = image_sizes  # values are not inspected: that would synchronise with the device
    else:
        pairs = [(float(h), float(w)) for h, w in image_sizes]
        if not all(h >= 0 and w >= 0 for h, w in pairs):  # checked on the Python numbers; also rejects NaN
            raise ValueError(f"image_sizes must be non-negative, got {image_sizes!r}")
        sizes = torch.tensor(pairs, dtype=torch.float64).reshape(-1, 2)
        if torch.device(device).type == "cuda" and not torch.compiler.is_compiling():
            # A pageable host-to-device copy would block the host until the stream drains; a pinned, non-blocking
            # one is queued on the stream like a kernel (the caching host allocator keeps the buffer alive).
            sizes = sizes.pin_memory().to(device, non_blocking=True)
    if tuple(sizes.shape) != (batch, 2):
        raise ValueError(f"image_sizes must have shape [B, 2] (height, width) with B = {batch}, got "
                         f"{tuple(sizes.shape)}")
    return sizes.to(device=device)


def _select_top_k(scores: Tensor, threshold: float, top_k: int) -> tuple[Tensor, Tensor]:
    """Anchor indices [B, K] (-1 padded) and validity [B, K] of the exact stable-sort top-K by best class score."""
    B, N, _ = scores.shape
    best = scores.amax(dim=-1)  # NaN propagates, and NaN never passes the threshold below
    passing = _strictly_above(best, threshold)
    key = torch.where(passing, best.float() if best.dtype != torch.float64 else best, float("-inf"))
    long_opts = dict(dtype=torch.int64, device=scores.device)
    if top_k == 0:
        index = torch.full((B, 0), -1, **long_opts)
        return index, torch.zeros((B, 0), dtype=torch.bool, device=scores.device)
    # top_k columns of -inf after the N real ones: every row then has at least top_k entries whatever N is, so the
    # selection below never branches on N (torch.export with a dynamic N needs no bound relating N and top_k), and
    # padding entries rank after every real one (ties at -inf go to lower indices), so they only fill invalid slots.
    key = torch.cat([key, key.new_full((B, top_k), float("-inf"))], dim=1)
    n = N + top_k
    # The K-th largest value is exact whatever topk does with ties; the members are then chosen by the definition:
    # everything above it, plus the lowest-indexed anchors equal to it until K are taken.
    kth = key.topk(top_k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = key > kth
    equal = key == kth
    need = top_k - above.sum(dim=1, keepdim=True)
    take = above | (equal & (equal.cumsum(dim=1) <= need))
    # Compact the taken entries in index order without a host synchronisation: exactly top_k per row, so the j-th
    # taken entry goes to slot j and every other entry to a slot of its own past the end.
    slot = torch.where(take, take.cumsum(dim=1) - 1, torch.arange(n, **long_opts).add_(top_k))
    members = torch.empty((B, top_k + n), **long_opts).scatter_(
        1, slot, torch.arange(n, **long_opts).expand(B, n))[:, :top_k]
    # Members are in increasing index order, so a stable descending sort yields (score desc, index asc).
    member_keys = key.gather(1, members)
    sorted_keys, perm = member_keys.sort(dim=1, descending=True, stable=True)
    index = members.gather(1, perm)
    valid = sorted_keys > float("-inf")  # false for every padding entry
    index = torch.where(valid, index, -1)
    return index, valid


# --------------------------------------------------------------------------------------------------------------------
# fake kernels and autograd
# --------------------------------------------------------------------------------------------------------------------


# Fake kernels: every output shape follows from the input shapes, so torch.compile traces through without data.
@register_fake("box_decode")
def _box_decode_fake(rel_codes, boxes, weights, bbox_xform_clip):
    return torch.empty_like(rel_codes)


@register_fake("_box_decode_backward")
def _box_decode_backward_fake(grad, rel_codes, boxes, weights, bbox_xform_clip):
    return torch.empty_like(rel_codes), torch.empty_like(boxes)


@register_fake("box_encode")
def _box_encode_fake(reference_boxes, proposals, weights):
    return torch.empty_like(reference_boxes)


@register_fake("_decode_select_boxes")
def _decode_select_boxes_fake(rel_codes, anchors, index, image_sizes, weights, bbox_xform_clip):
    return rel_codes.new_empty((rel_codes.shape[0], index.shape[1], 4))


def _decode_setup_context(ctx, inputs, output):
    rel_codes, boxes, weights, clip = inputs
    ctx.save_for_backward(rel_codes, boxes)
    ctx.weights, ctx.clip = weights, clip


def _decode_backward(ctx, grad):
    rel_codes, boxes = ctx.saved_tensors
    g_rel, g_boxes = torch.ops.fastdet._box_decode_backward(grad, rel_codes, boxes, ctx.weights, ctx.clip)
    return g_rel, g_boxes, None, None


# Decode's backward is a registered op, so compiled graphs and export see it as one op too.
register_autograd("box_decode", _decode_backward, _decode_setup_context)


def _encode_setup_context(ctx, inputs, output):
    reference_boxes, proposals, weights = inputs
    ctx.save_for_backward(reference_boxes, proposals)
    ctx.weights = weights


def _encode_backward(ctx, grad):
    # Targets rarely need gradients, so encode's backward is plain ATen arithmetic (traceable by torch.compile)
    # rather than a kernel. With g = ground truth, e = proposal:
    #   dx = wx (gcx - ecx) / ew, dw = ww log(gw / ew), cx = x1 + w / 2.
    g, e = ctx.saved_tensors
    wx, wy, ww, wh = ctx.weights
    acc = torch.float64 if g.dtype == torch.float64 else torch.float32
    g, e, grad = g.to(acc), e.to(acc), grad.to(acc)
    ew, eh = e[:, 2] - e[:, 0], e[:, 3] - e[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    ecx, ecy = e[:, 0] + 0.5 * ew, e[:, 1] + 0.5 * eh
    gcx, gcy = g[:, 0] + 0.5 * gw, g[:, 1] + 0.5 * gh
    t0, t1, t2, t3 = grad.unbind(1)
    d_gcx, d_gcy = t0 * wx / ew, t1 * wy / eh
    d_gw, d_gh = t2 * ww / gw, t3 * wh / gh
    d_ecx, d_ecy = -d_gcx, -d_gcy
    d_ew = -t0 * wx * (gcx - ecx) / (ew * ew) - t2 * ww / ew
    d_eh = -t1 * wy * (gcy - ecy) / (eh * eh) - t3 * wh / eh

    def corners(d_cx, d_cy, d_w, d_h):
        # cx = x1 + w / 2 with w = x2 - x1: d/dx1 = d_cx / 2 - d_w, d/dx2 = d_cx / 2 + d_w
        return torch.stack((0.5 * d_cx - d_w, 0.5 * d_cy - d_h, 0.5 * d_cx + d_w, 0.5 * d_cy + d_h), dim=1)

    grad_g = corners(d_gcx, d_gcy, d_gw, d_gh).to(ctx.saved_tensors[0].dtype)
    grad_e = corners(d_ecx, d_ecy, d_ew, d_eh).to(ctx.saved_tensors[1].dtype)
    return grad_g, grad_e, None


register_autograd("box_encode", _encode_backward, _encode_setup_context)
