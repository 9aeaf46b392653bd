"""Matrix NMS (SOLOv2, Wang et al., 2020) for boxes: every candidate's score is decayed in parallel by how much the
higher-scoring candidates of its category overlap it, compensated by how much those are themselves suppressed.

With candidates in visit order (decreasing score; ties by index, NaN first as ``torch.sort`` puts them), IoU as
:func:`fastdet.ops.box_iou`, ``c_i`` the largest IoU of candidate i with a higher-scoring one of its category (0 if
none), the decay of j is ``min(1, min_i f(IoU(i, j)) / f(c_i))`` over the higher-scoring i of j's category, with
``f(x) = 1 - x`` (``kernel="linear"``) or ``exp(-sigma * x^2)`` (``"gaussian"``; mmdetection's parameterisation,
``sigma=2.0`` its default). This is mmdetection's dense ``mask_matrix_nms`` formulation applied to boxes, except that
only candidates of the same category enter j's minimum (the dense form also takes ``1 / f(c_i)`` of every other
candidate, which is >= 1 and changes nothing unless it is NaN). NaN IoUs propagate into the decay (the candidate is
dropped). A candidate is kept when ``score * decay > score_threshold``.

The kernels never form the N x N matrices: O(N^2) work, O(N) memory, fully parallel, no host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdet.ops._registry import native, register_fake
from fastdet.ops.nms import _check_same_device, _check_tensor
from fastdet.ops.soft_nms import _check_score_threshold, _check_sigma

__all__ = ["matrix_nms"]

_KERNELS = {"linear": 1, "gaussian": 2}


def matrix_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor | None,
    max_output: int,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    score_threshold: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Batched, category-aware Matrix NMS with fixed-size outputs.

    Args:
        boxes (Tensor[N, 4] or Tensor[B, N, 4]): ``(x1, y1, x2, y2)`` boxes; a leading B runs B images at once.
        scores (Tensor[N] or Tensor[B, N]): a score per box.
        idxs (Tensor[N] or Tensor[B, N], optional): integer categories; None = one category.
        max_output (int): output length per image.
        kernel (str): ``"gaussian"`` or ``"linear"``.
        sigma (float): the gaussian kernel's ``sigma`` (unused by the linear one).
        score_threshold (float): candidates need a decayed score > score_threshold.

    Returns:
        keep (Tensor[max_output] or Tensor[B, max_output] int64): kept indices by decreasing decayed score (ties:
        visit order), padded with -1.
        scores (same shape, scores' dtype): the decayed scores, padded with 0.
        num_kept (Tensor[] or Tensor[B] int64): the number of real entries.
    """
    _check_tensor(boxes, "boxes")
    _check_tensor(scores, "scores")
    if idxs is not None:
        _check_tensor(idxs, "idxs")
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be 'linear' or 'gaussian', got {kernel!r}")
    if isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 0:
        raise ValueError(f"max_output must be a non-negative int, got {max_output!r}")
    _check_same_device(boxes=boxes, scores=scores, idxs=idxs)
    return native("matrix_nms")(
        boxes, scores, idxs, _KERNELS[kernel], _check_sigma(sigma), _check_score_threshold(score_threshold), max_output
    )


@register_fake("matrix_nms")
def _matrix_nms_fake(boxes, scores, idxs, kernel, sigma, score_threshold, max_output):
    lead = tuple(boxes.shape[:-2])
    return (
        boxes.new_empty((*lead, max_output), dtype=torch.int64),
        scores.new_empty((*lead, max_output)),
        boxes.new_empty(lead, dtype=torch.int64),
    )


@register_fake("_matrix_nms_kernel")
def _matrix_nms_kernel_fake(boxes, categories, kernel, sigma):
    return boxes.new_empty(boxes.shape[:-1])
