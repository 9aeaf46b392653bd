"""Soft-NMS (Bodla et al., 2017): instead of discarding the boxes a kept box overlaps, decay their scores.

``soft_nms`` gives the results of ensemble-boxes' ``soft_nms`` (its ``cpu_soft_nms_float``) on the same single-model
input, natively on the CPU and CUDA; ``soft_nms_fixed`` is the batched, category-aware, fixed-size and
synchronisation-free form detectors use (``multiclass_nms(..., method="soft")``).

The algorithm, step for step as ensemble-boxes runs it (its ties included):

* Slots start in index order. Step i takes the largest score among slots i..N-1 (numpy's argmax: the first NaN, else
  the first largest in the current slot order) and swaps it into slot i when slot i's score is strictly smaller.
* Every later slot's score is multiplied by a weight of its IoU with slot i: ``"linear"`` (ensemble-boxes' method 1)
  ``1 - IoU`` when ``IoU > iou_threshold``, else 1; ``"gaussian"`` (method 2) ``exp(-IoU^2 / sigma)`` for any IoU
  (``iou_threshold`` is then unused, as in ensemble-boxes).
* A box is kept when its final score is ``> score_threshold``; kept boxes are listed in slot (visit) order.
* Coordinates, areas, IoU and weights are float64 (ensemble-boxes promotes every box to float64); scores stay in
  their dtype (float32 for float16/bfloat16, whose results are rounded back at the end), each decay rounded to it.

Differences from ensemble-boxes' public ``soft_nms(boxes_list, scores_list, labels_list, ...)``: it clips boxes to
[0, 1], reorders swapped corners and drops zero-area boxes first (here boxes are used as given, in any units), groups
by label in label order, and returns the *original* scores of the kept boxes; here the decayed scores are returned.
The final threshold test is exact (as if in float64); numpy compares float32 scores with the threshold rounded to
float32, which differs only for a decayed score between the two. ``exp`` is SLEEF's 1-ulp vector exp on CPUs with
AVX2 (the one libtorch ships; ``FASTDET_SOFT_NMS_SCALAR=1`` forces libm's), libm's elsewhere and CUDA's on the GPU,
where numpy may use its own SIMD version, so gaussian scores can differ from ensemble-boxes' in the last bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdet.ops._registry import native, register_fake
from fastdet.ops.nms import _check_same_device, _check_tensor, _check_threshold, _kept_count

__all__ = ["soft_nms", "soft_nms_fixed"]

_METHODS = {"linear": 1, "gaussian": 2}


def _method_code(method) -> int:
    if method not in _METHODS:
        raise ValueError(f"method must be 'linear' or 'gaussian', got {method!r}")
    return _METHODS[method]


def _check_sigma(sigma) -> float:
    sigma = float(sigma)
    if not (0.0 < sigma < float("inf")):
        raise ValueError(f"sigma must be a positive finite number, got {sigma}")
    return sigma


def _check_score_threshold(value) -> float:
    value = float(value)
    if value != value:
        raise ValueError("score_threshold must not be NaN")
    return value


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    method: str = "gaussian",
) -> tuple[Tensor, Tensor]:
    """Soft-NMS of one set of boxes (ensemble-boxes' ``soft_nms`` semantics; see the module docstring).

    Args:
        boxes (Tensor[N, 4]): ``(x1, y1, x2, y2)`` boxes, any floating dtype and units.
        scores (Tensor[N]): a score per box.
        iou_threshold (float): linear method only: overlaps above it decay the score by ``1 - IoU``.
        sigma (float): gaussian method only: the decay is ``exp(-IoU^2 / sigma)``.
        score_threshold (float): boxes whose final score is ``> score_threshold`` are kept.
        method (str): ``"gaussian"`` (ensemble-boxes' method 2) or ``"linear"`` (method 1).

    Returns:
        keep (Tensor[K] int64): kept indices in visit order; scores (Tensor[K]): their decayed scores (scores' dtype).

    The number of kept boxes depends on the data, so on CUDA this synchronises once to size the output;
    :func:`soft_nms_fixed` never does. Work is O(N^2) in the worst case, as soft-NMS itself.
    """
    _check_tensor(boxes, "boxes")
    _check_tensor(scores, "scores")
    _check_same_device(boxes=boxes, scores=scores)
    return native("soft_nms")(
        boxes,
        scores,
        _check_threshold(iou_threshold, "iou_threshold"),
        _check_sigma(sigma),
        _check_score_threshold(score_threshold),
        _method_code(method),
    )


def soft_nms_fixed(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor | None,
    max_output: int,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    method: str = "gaussian",
) -> tuple[Tensor, Tensor, Tensor]:
    """Batched, category-aware soft-NMS with fixed-size outputs and no host synchronisation.

    Args:
        boxes (Tensor[N, 4] or Tensor[B, N, 4]): ``(x1, y1, x2, y2)`` boxes; a leading B runs B images at once.
        scores (Tensor[N] or Tensor[B, N]): a score per box.
        idxs (Tensor[N] or Tensor[B, N], optional): integer categories; boxes of different categories never decay
            each other (each category runs :func:`soft_nms` on its boxes in index order). None = one category.
        max_output (int): output length per image.
        iou_threshold, sigma, score_threshold, method: as :func:`soft_nms`.

    Returns:
        keep (Tensor[max_output] or Tensor[B, max_output] int64): kept indices of all categories by decreasing decayed
        score (ties: lower category, then visit order), padded with -1.
        scores (same shape, scores' dtype): their decayed scores, padded with 0.
        num_kept (Tensor[] or Tensor[B] int64): the number of real entries.
    """
    _check_tensor(boxes, "boxes")
    _check_tensor(scores, "scores")
    if idxs is not None:
        _check_tensor(idxs, "idxs")
    if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 0:
        raise ValueError(f"max_output must be a non-negative int, got {max_output!r}")
    _check_same_device(boxes=boxes, scores=scores, idxs=idxs)
    return native("soft_nms_fixed")(
        boxes,
        scores,
        idxs,
        _check_threshold(iou_threshold, "iou_threshold"),
        _check_sigma(sigma),
        _check_score_threshold(score_threshold),
        _method_code(method),
        max_output,
    )


@register_fake("soft_nms")
def _soft_nms_fake(boxes, scores, iou_threshold, sigma, score_threshold, method):
    torch._check(boxes.dim() == 2 and boxes.shape[-1] == 4)
    k = _kept_count(boxes)
    return boxes.new_empty((k,), dtype=torch.int64), scores.new_empty((k,))


@register_fake("soft_nms_fixed")
def _soft_nms_fixed_fake(boxes, scores, idxs, iou_threshold, sigma, score_threshold, method, max_output):
    lead = tuple(boxes.shape[:-2])
    return (
        boxes.new_empty((*lead, max_output), dtype=torch.int64),
        scores.new_empty((*lead, max_output)),
        boxes.new_empty(lead, dtype=torch.int64),
    )


@register_fake("_soft_nms_kernel")
def _soft_nms_kernel_fake(boxes, scores, categories, iou_threshold, sigma, score_threshold, method):
    shape = boxes.shape[:-1]
    return boxes.new_empty(shape, dtype=torch.int64), scores.new_empty(shape), boxes.new_empty(shape, dtype=torch.bool)
