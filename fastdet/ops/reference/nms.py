"""Reference non-maximum suppression: the definition of fastdet's NMS semantics, down to the last tie-break.

Greedy NMS, as every function here uses it:

1. **Visit order.** Candidates are visited in the order of ``torch.sort(scores, descending=True, stable=True)``:
   higher score first, equal scores by ascending index, NaN scores first (where ``torch.sort`` puts them).
2. **Suppression.** A visited candidate that has not been suppressed is kept, and suppresses every later candidate
   ``j`` (of the same category, for the batched variants) with ``IoU(kept, j) > iou_threshold``: strictly greater,
   so an IoU exactly at the threshold survives.
3. **IoU.** ``w = max(0, min(x2_i, x2_j) - max(x1_i, x1_j))``, ``h`` likewise, ``inter = w * h``,
   ``IoU = inter / (area_i + area_j - inter)`` with unclamped areas ``(x2 - x1) * (y2 - y1)``, evaluated left to right
   in float32 for float16/bfloat16/float32 boxes and in float64 for float64 boxes. A NaN IoU (any NaN coordinate
   makes the area NaN, so the IoU too) is never greater than the threshold, so it never suppresses.
4. **Threshold comparisons are exact.** The float32/float64 IoU (and, in :func:`multiclass_nms`, the score) is
   compared with the Python float threshold in float64, as a C++ kernel comparing ``float`` with ``double`` does. A
   comparison in the tensor's own dtype would round the threshold first (0.3 in float16 is 0.30005) and could flip
   a decision.
5. **Output order.** Kept indices come back in visit order.

The implementations loop in Python and favour clarity over speed; use them on test-sized inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batched_nms", "multiclass_nms", "nms", "nms_fixed"]


def _compute_dtype(boxes: Tensor) -> torch.dtype:
    return torch.float64 if boxes.dtype == torch.float64 else torch.float32


def _check_boxes_scores(boxes: Tensor, scores: Tensor) -> None:
    if not isinstance(boxes, Tensor) or not boxes.is_floating_point():
        raise TypeError(f"boxes must be a floating-point tensor, got {getattr(boxes, 'dtype', type(boxes))}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"scores must have shape [N] = [{boxes.shape[0]}], got {tuple(getattr(scores, 'shape', ()))}")
    if boxes.device != scores.device:
        raise ValueError(f"boxes and scores must be on the same device, got {boxes.device} and {scores.device}")


def _check_count(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def _visit_order(scores: Tensor) -> list[int]:
    return torch.sort(scores, descending=True, stable=True).indices.tolist()


def _greedy(boxes: Tensor, scores: Tensor, categories: list, iou_threshold: float) -> list[int]:
    """Greedy NMS over all candidates; a kept box suppresses only later boxes with the same category value."""
    corners = boxes.to(_compute_dtype(boxes))
    x1, y1, x2, y2 = corners.unbind(-1)
    areas = (x2 - x1) * (y2 - y1)
    order = _visit_order(scores)
    suppressed = [False] * boxes.shape[0]
    keep = []
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        later = [j for j in order[position + 1 :] if categories[j] == categories[i]]
        if not later:
            continue
        js = torch.tensor(later, device=boxes.device)
        # Elementwise tensor ops round every step to the compute dtype, exactly like scalar C++ code would.
        w = (torch.minimum(x2[i], x2[js]) - torch.maximum(x1[i], x1[js])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[js]) - torch.maximum(y1[i], y1[js])).clamp(min=0)
        inter = w * h
        ious = inter / (areas[i] + areas[js] - inter)
        # .tolist() widens each value exactly to a Python float, so the comparison below happens in float64.
        for j, iou in zip(later, ious.tolist()):
            if iou > iou_threshold:
                suppressed[j] = True
    return keep


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS of ``boxes (Tensor[N, 4])`` (xyxy) scored by ``scores (Tensor[N])``.

    Returns ``Tensor[K]`` (int64): the kept indices in visit order (see the module docstring for every rule).
    """
    _check_boxes_scores(boxes, scores)
    keep = _greedy(boxes, scores, [0] * boxes.shape[0], float(iou_threshold))
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS where a box suppresses only boxes of its own category ``idxs (Tensor[N])``.

    This is genuine per-category NMS (no coordinate-offset trick, whose shifted coordinates change the rounding of
    the IoU). The result lists the kept indices of all categories together in the global visit order.
    """
    _check_boxes_scores(boxes, scores)
    if not isinstance(idxs, Tensor) or idxs.shape != scores.shape:
        raise ValueError(f"idxs must have shape [N] = [{boxes.shape[0]}], got {tuple(getattr(idxs, 'shape', ()))}")
    keep = _greedy(boxes, scores, idxs.tolist(), float(iou_threshold))
    return torch.tensor(keep, dtype=torch.int64, device=boxes.device)


def nms_fixed(
    boxes: Tensor, scores: Tensor, idxs: Tensor | None, iou_threshold: float, max_output: int
) -> tuple[Tensor, Tensor]:
    """Fixed-size (batched) NMS for export and static-shape pipelines.

    Args:
        boxes (Tensor[N, 4] or Tensor[B, N, 4]): xyxy boxes, one set per image when batched.
        scores (Tensor[N] or Tensor[B, N]): scores.
        idxs (Tensor[N] or Tensor[B, N], or None): categories; ``None`` puts every box in one category.
        iou_threshold (float): suppression threshold (strict ``>``).
        max_output (int): length of the output per image.

    Returns:
        keep (Tensor[max_output] or Tensor[B, max_output], int64): per image, the :func:`batched_nms` result truncated
        to ``max_output`` and padded with ``-1``.
        num_kept (Tensor[] or Tensor[B], int64): number of real (non-padding) entries in each row of ``keep``.
    """
    _check_count(max_output, "max_output")
    if not isinstance(boxes, Tensor) or boxes.dim() not in (2, 3):
        raise ValueError(f"boxes must have shape [N, 4] or [B, N, 4], got {tuple(getattr(boxes, 'shape', ()))}")
    batched = boxes.dim() == 3
    if not batched:
        boxes, scores = boxes.unsqueeze(0), scores.unsqueeze(0)
        idxs = None if idxs is None else idxs.unsqueeze(0)
    if scores.shape != boxes.shape[:2]:
        raise ValueError(f"scores must have shape {tuple(boxes.shape[:2])}, got {tuple(scores.shape)}")
    if idxs is not None and idxs.shape != scores.shape:
        raise ValueError(f"idxs must have the shape of scores {tuple(scores.shape)}, got {tuple(idxs.shape)}")
    num_images = boxes.shape[0]
    keep = torch.full((num_images, max_output), -1, dtype=torch.int64, device=boxes.device)
    num_kept = torch.zeros(num_images, dtype=torch.int64, device=boxes.device)
    for b in range(num_images):
        categories = torch.zeros_like(scores[b], dtype=torch.int64) if idxs is None else idxs[b]
        kept = batched_nms(boxes[b], scores[b], categories, iou_threshold)[:max_output]
        keep[b, : kept.numel()] = kept
        num_kept[b] = kept.numel()
    if not batched:
        return keep[0], num_kept[0]
    return keep, num_kept


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    score_threshold: float,
    iou_threshold: float,
    max_detections: int,
    pre_nms_top_k: int,
    class_agnostic: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Score filtering, top-k and per-class NMS for a batch of images, with fixed-size outputs.

    Args:
        boxes (Tensor[B, N, 4] or Tensor[B, N, C, 4]): xyxy boxes, shared by all classes or one per class.
        scores (Tensor[B, N, C]): class scores.
        score_threshold (float): a candidate ``(n, c)`` needs ``scores[b, n, c] > score_threshold`` (strict, compared
            in float64); NaN scores never pass.
        iou_threshold (float): NMS threshold (strict ``>``).
        max_detections (int): K, the number of output slots per image.
        pre_nms_top_k (int): only the first ``pre_nms_top_k`` candidates (in candidate order) enter NMS.
        class_agnostic (bool): if True, candidates of all classes suppress each other.

    Candidate order is score descending, ties broken by the flat index ``n * C + c`` ascending. NMS keeps that order,
    and the first ``max_detections`` survivors are returned.

    Returns:
        det_boxes (Tensor[B, K, 4], boxes' dtype), det_scores (Tensor[B, K], scores' dtype),
        det_labels (Tensor[B, K], int64), num_detections (Tensor[B], int64). Unused slots hold boxes 0, scores 0 and
        labels -1.
    """
    _check_count(max_detections, "max_detections")
    _check_count(pre_nms_top_k, "pre_nms_top_k")
    if not isinstance(scores, Tensor) or scores.dim() != 3:
        raise ValueError(f"scores must have shape [B, N, C], got {tuple(getattr(scores, 'shape', ()))}")
    num_images, num_boxes, num_classes = scores.shape
    shared = boxes.dim() == 3
    expected = (num_images, num_boxes, 4) if shared else (num_images, num_boxes, num_classes, 4)
    if tuple(boxes.shape) != expected:
        raise ValueError(
            f"boxes must have shape [B, N, 4] or [B, N, C, 4] = {(num_images, num_boxes, num_classes, 4)}, "
            f"got {tuple(boxes.shape)}"
        )
    if not boxes.is_floating_point():
        raise TypeError(f"boxes must be a floating-point tensor, got {boxes.dtype}")

    k = max_detections
    det_boxes = boxes.new_zeros((num_images, k, 4))
    det_scores = scores.new_zeros((num_images, k))
    det_labels = torch.full((num_images, k), -1, dtype=torch.int64, device=scores.device)
    num_detections = torch.zeros(num_images, dtype=torch.int64, device=scores.device)

    for b in range(num_images):
        flat_scores = scores[b].reshape(-1)  # position n * C + c
        passing = torch.nonzero(flat_scores.double() > score_threshold).flatten()  # ascending flat index
        # stable sort of an index-ascending list: equal scores keep ascending flat index
        order = torch.sort(flat_scores[passing], descending=True, stable=True).indices
        candidates = passing[order][:pre_nms_top_k]
        box_index = candidates // num_classes
        labels = candidates % num_classes
        cand_boxes = boxes[b, box_index] if shared else boxes[b, box_index, labels]
        cand_scores = flat_scores[candidates]
        categories = torch.zeros_like(labels) if class_agnostic else labels
        # Scores are already in visit order (non-increasing, no NaN), so batched_nms's stable sort keeps this order.
        kept = batched_nms(cand_boxes, cand_scores, categories, iou_threshold)[:k]
        n = kept.numel()
        det_boxes[b, :n] = cand_boxes[kept]
        det_scores[b, :n] = cand_scores[kept]
        det_labels[b, :n] = labels[kept]
        num_detections[b] = n
    return det_boxes, det_scores, det_labels, num_detections
