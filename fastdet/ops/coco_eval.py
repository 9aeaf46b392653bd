"""The native COCO evaluation primitives behind :class:`fastdet.eval.COCOeval` (CPU only, by design).

Two ops reproduce pycocotools' ``COCOeval.evaluate()`` and ``accumulate()`` for ``iouType`` ``"bbox"`` and
``"segm"``; :mod:`fastdet.eval.cocoeval` groups annotations into their flat (CSR) inputs. Their reference is
pycocotools itself (``tests/test_eval_cocoeval.py`` compares every array with it), so there is no PyTorch reference
in ``fastdet.ops.reference``. There is no CUDA kernel: the inputs are host-side annotations and the work is branchy
per (image, category) matching; CUDA tensors are refused with an error.

Layout: annotations are grouped by (category, image), groups ordered category-major then by image; group ``s`` owns
ground truth ``gt_offsets[s]:gt_offsets[s + 1]`` and detections ``dt_offsets[s]:dt_offsets[s + 1]`` in dataset order.
Boxes are COCO ``(x, y, w, h)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdet.ops._registry import native, register_fake

__all__ = ["coco_accumulate", "coco_evaluate"]


def coco_evaluate(
    gt_boxes: Tensor,
    gt_areas: Tensor,
    gt_crowd: Tensor,
    gt_ids: Tensor,
    gt_offsets: Tensor,
    dt_boxes: Tensor,
    dt_areas: Tensor,
    dt_scores: Tensor,
    dt_ids: Tensor,
    dt_offsets: Tensor,
    iou_thresholds: Tensor,
    area_ranges: Tensor,
    max_dets: int,
    gt_rle: tuple[Tensor, Tensor] | None = None,
    dt_rle: tuple[Tensor, Tensor] | None = None,
    return_matches: bool = False,
) -> tuple[Tensor, ...]:
    """Per-(image, category) matching of pycocotools' ``evaluateImg`` for every group and area range at once.

    Args:
        gt_boxes (Tensor[G, 4] float64), gt_areas (Tensor[G] float64), gt_crowd (Tensor[G] uint8), gt_ids
            (Tensor[G] float64): ground truth, grouped; ``gt_offsets`` (Tensor[S + 1] int64) delimits the groups.
        dt_boxes (Tensor[D, 4] float64), dt_areas, dt_scores, dt_ids (Tensor[D] float64): detections, grouped;
            ``dt_offsets`` (Tensor[S + 1] int64).
        iou_thresholds (Tensor[T] float64), area_ranges (Tensor[A, 2] float64): pycocotools' ``iouThrs`` and
            ``areaRng``.
        max_dets: detections kept per group (the largest of pycocotools' ``maxDets``).
        gt_rle, dt_rle: for ``segm``, ``(bytes (Tensor[B] uint8), index (Tensor[N, 4] int64))``: the compressed RLE
            strings concatenated, and per annotation (byte begin, byte end, height, width). IoU is then mask IoU
            computed on the run lengths (no decoding to pixels), as pycocotools' ``rleIou``.
        return_matches: also return ``matched_gt`` (below).

    Returns:
        ``dt_order`` (Tensor[D] int64): per group, the input indices of its detections in score order (stable,
        descending). ``codes`` (Tensor[A, T, D] uint8) at those positions: bit 0 matched, bit 1 ignored, bit 2
        evaluated (rank below ``max_dets``). ``gt_valid`` (Tensor[A, S] int64): non-ignored ground truth per group.
        With ``return_matches``, a fourth output ``matched_gt`` (Tensor[A, T, D] int64) at the same positions: the
        ground-truth row (index into ``gt_boxes``) each detection was matched to, -1 if none or beyond ``max_dets``.
        pycocotools' ``dtMatches`` holds that row's id (``gt_ids[matched_gt]``, 0 where -1); a ground truth whose
        id is 0 reads as unmatched there (and in bit 0 of ``codes``) but is reported here.
    """
    grb, gri = gt_rle if gt_rle is not None else (None, None)
    drb, dri = dt_rle if dt_rle is not None else (None, None)
    outputs = native("coco_evaluate")(
        gt_boxes, gt_areas, gt_crowd, gt_ids, gt_offsets, dt_boxes, dt_areas, dt_scores, dt_ids, dt_offsets,
        iou_thresholds, area_ranges, int(max_dets), grb, gri, drb, dri, bool(return_matches),
    )
    return outputs if return_matches else outputs[:3]


def coco_accumulate(
    dt_scores: Tensor,
    dt_order: Tensor,
    codes: Tensor,
    dt_offsets: Tensor,
    category_offsets: Tensor,
    gt_valid: Tensor,
    max_dets: Tensor,
    recall_thresholds: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """pycocotools' ``accumulate``: precision/recall/score arrays from :func:`coco_evaluate`'s output.

    ``category_offsets`` (Tensor[K + 1] int64) delimits each category's groups; ``max_dets`` (Tensor[M] int64,
    ascending) and ``recall_thresholds`` (Tensor[R] float64) are pycocotools' ``maxDets`` and ``recThrs``.
    Returns ``precision`` (Tensor[T, R, K, A, M]), ``recall`` (Tensor[T, K, A, M]) and ``scores`` (Tensor[T, R, K, A,
    M]), float64, -1 where a category has no ground truth in the area range.
    """
    return native("coco_accumulate")(
        dt_scores, dt_order, codes, dt_offsets, category_offsets, gt_valid, max_dets, recall_thresholds
    )


# Fake kernels: every output size follows from the input shapes.
def _evaluate_fake(gt_boxes, gt_areas, gt_crowd, gt_ids, gt_offsets, dt_boxes, dt_areas, dt_scores, dt_ids,
                   dt_offsets, iou_thresholds, area_ranges, max_dets, gt_rle_bytes=None, gt_rle_index=None,
                   dt_rle_bytes=None, dt_rle_index=None, return_matches=False):
    d = dt_boxes.shape[0]
    a, t, s = area_ranges.shape[0], iou_thresholds.shape[0], gt_offsets.shape[0] - 1
    return (
        dt_boxes.new_empty((d,), dtype=torch.int64),
        dt_boxes.new_empty((a, t, d), dtype=torch.uint8),
        dt_boxes.new_empty((a, s), dtype=torch.int64),
        dt_boxes.new_empty((a, t, d) if return_matches else (0,), dtype=torch.int64),
    )


def _accumulate_fake(dt_scores, dt_order, codes, dt_offsets, category_offsets, gt_valid, max_dets, recall_thresholds):
    a, t = codes.shape[0], codes.shape[1]
    k, m, r = category_offsets.shape[0] - 1, max_dets.shape[0], recall_thresholds.shape[0]
    return (
        dt_scores.new_empty((t, r, k, a, m)),
        dt_scores.new_empty((t, k, a, m)),
        dt_scores.new_empty((t, r, k, a, m)),
    )


for _name, _fake in (("coco_evaluate", _evaluate_fake), ("_coco_evaluate_kernel", _evaluate_fake),
                     ("coco_accumulate", _accumulate_fake), ("_coco_accumulate_kernel", _accumulate_fake)):
    register_fake(_name)(_fake)
