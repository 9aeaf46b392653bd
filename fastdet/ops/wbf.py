"""Weighted boxes fusion (Solovyev et al., 2021): merge the detections of several models (or of test-time
augmentations) by averaging overlapping boxes instead of discarding all but one, with the semantics and results of
ensemble-boxes' ``weighted_boxes_fusion`` (https://github.com/ZFTurbo/Weighted-Boxes-Fusion), natively.

Boxes are ``(x1, y1, x2, y2)`` normalised to [0, 1] (corners are swapped into order and clipped, zero-area boxes are
dropped, as ensemble-boxes does). The algorithm is written out in ``csrc/ops/cpu/wbf.cpp``. Differences from
ensemble-boxes: boxes or scores with NaN are skipped (ensemble-boxes lets NaN propagate); exactly tied scores are
ordered as a *stable* argsort reversed (the later box first) where ensemble-boxes' numpy argsort leaves the order
unspecified; labels come back as int64 (ensemble-boxes returns float64); the skip threshold is compared exactly (numpy
compares a float32 score with the threshold rounded to float32); weight sums are sequential (numpy sums 8 or more
weights pairwise); and at most 64 models are fused. Results are float64, as ensemble-boxes'.

The CPU kernel runs images in parallel; the CUDA kernel runs one thread block per image (the clustering is sequential
within a label; each box is matched against the label's clusters by the whole block) and gives the same results.
A box whose weighted score is NaN (an infinite score of a model weighted 0) is skipped like a NaN score.

``non_maximum_weighted`` (NMW; Zhou et al., 2017, "CAD: Scale Invariant Framework for Real-Time Object Detection") is
ensemble-boxes' ``non_maximum_weighted`` on the same kernel: model weights are divided by the largest one; a box joins
the cluster whose *first* (highest-scoring) box overlaps it most with IoU > iou_threshold; a cluster's box is the mean
of its members weighted by score x IoU with that first box, and its score is the first box's. Results are float32, as
ensemble-boxes stores them, with the same differences as above (NaN skipped, stable tie order, exact threshold).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdet.ops._registry import native, register_fake

__all__ = [
    "weighted_boxes_fusion",
    "weighted_boxes_fusion_batched",
    "non_maximum_weighted",
    "non_maximum_weighted_batched",
]

CONF_TYPES = {"avg": 0, "max": 1, "box_and_model_avg": 2, "absent_model_aware_avg": 3}


def _conf_type(conf_type) -> int:
    if conf_type not in CONF_TYPES:
        raise ValueError(f"conf_type must be one of {sorted(CONF_TYPES)}, got {conf_type!r}")
    return CONF_TYPES[conf_type]


def _weights(weights, num_models: int, device) -> Tensor:
    if weights is None:
        return torch.ones(num_models, dtype=torch.float64, device=device)
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1).cpu()  # checked on the host: a few numbers
    if w.numel() != num_models:
        raise ValueError(f"weights must have one entry per model ({num_models}), got {w.numel()}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {w.tolist()}")
    return w.to(device)


def _pad_models(boxes_list, scores_list, labels_list) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One image's ragged per-model lists as the batched ops' padded [1, M, N, ...] tensors and counts [1, M]."""
    num_models = len(boxes_list)
    if len(scores_list) != num_models or len(labels_list) != num_models:
        raise ValueError(
            f"boxes_list, scores_list and labels_list must have one entry per model, got {num_models}, "
            f"{len(scores_list)} and {len(labels_list)}"
        )
    boxes = [torch.as_tensor(b).reshape(-1, 4) for b in boxes_list]
    scores = [torch.as_tensor(s).reshape(-1) for s in scores_list]
    labels = [torch.as_tensor(lab).reshape(-1) for lab in labels_list]
    for m, (b, s, lab) in enumerate(zip(boxes, scores, labels)):
        if not (b.shape[0] == s.shape[0] == lab.shape[0]):
            raise ValueError(f"model {m}: {b.shape[0]} boxes, {s.shape[0]} scores and {lab.shape[0]} labels differ")
    device = boxes[0].device if boxes else torch.device("cpu")
    n = max((b.shape[0] for b in boxes), default=0)
    padded_boxes = torch.zeros(1, num_models, n, 4, dtype=torch.float64, device=device)
    padded_scores = torch.zeros(1, num_models, n, dtype=torch.float64, device=device)
    padded_labels = torch.zeros(1, num_models, n, dtype=torch.int64, device=device)
    counts = torch.tensor([[b.shape[0] for b in boxes]], dtype=torch.int64, device=device)
    for m in range(num_models):  # a loop over models (not boxes) to pad the ragged lists
        k = boxes[m].shape[0]
        padded_boxes[0, m, :k] = boxes[m]
        padded_scores[0, m, :k] = scores[m]
        padded_labels[0, m, :k] = labels[m].to(torch.int64)
    return padded_boxes, padded_scores, padded_labels, counts


def _one_image(batched, boxes_list, scores_list, labels_list, *options) -> tuple[Tensor, Tensor, Tensor]:
    """A batched fusion op on one image's per-model lists: its fused boxes, scores and labels, cut to their number."""
    padded_boxes, padded_scores, padded_labels, counts = _pad_models(boxes_list, scores_list, labels_list)
    out_boxes, out_scores, out_labels, num = batched(padded_boxes, padded_scores, padded_labels, counts, *options)
    k = int(num[0])
    return out_boxes[0, :k], out_scores[0, :k], out_labels[0, :k]


def _batched_args(boxes, scores, labels, counts) -> Tensor:
    """Checks the batched ops' tensor arguments; returns counts (all N when None)."""
    for name, t in (("boxes", boxes), ("scores", scores), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if boxes.dim() != 4:
        raise ValueError(f"boxes must have shape [B, M, N, 4], got {tuple(boxes.shape)}")
    B, M, N = boxes.shape[:3]
    if counts is None:
        counts = torch.full((B, M), N, dtype=torch.int64, device=boxes.device)
    return counts


def weighted_boxes_fusion(
    boxes_list,
    scores_list,
    labels_list,
    weights=None,
    iou_threshold: float = 0.55,
    skip_box_threshold: float = 0.0,
    conf_type: str = "avg",
    allows_overflow: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fuse one image's detections from several models (ensemble-boxes' ``weighted_boxes_fusion``).

    Args:
        boxes_list: per model, ``[N_m, 4]`` normalised ``(x1, y1, x2, y2)`` boxes (tensors or array-likes).
        scores_list: per model, ``[N_m]`` scores.
        labels_list: per model, ``[N_m]`` integer labels; only boxes of one label are fused together.
        weights: per-model weights (default 1 each).
        iou_threshold (float): a box joins a cluster whose fused box overlaps it with IoU > iou_threshold.
        skip_box_threshold (float): boxes with score < skip_box_threshold are ignored.
        conf_type (str): ``"avg"``, ``"max"``, ``"box_and_model_avg"`` or ``"absent_model_aware_avg"``.
        allows_overflow (bool): with ``"avg"``, let the fused score exceed 1 when a cluster has more boxes than
            there are models.

    Returns:
        boxes (Tensor[K, 4] float64), scores (Tensor[K] float64), labels (Tensor[K] int64), by decreasing score.
    """
    return _one_image(weighted_boxes_fusion_batched, boxes_list, scores_list, labels_list, weights, iou_threshold,
                      skip_box_threshold, conf_type, allows_overflow)


def weighted_boxes_fusion_batched(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    counts: Tensor | None = None,
    weights=None,
    iou_threshold: float = 0.55,
    skip_box_threshold: float = 0.0,
    conf_type: str = "avg",
    allows_overflow: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`weighted_boxes_fusion` of B images at once, with fixed-size outputs.

    Args:
        boxes (Tensor[B, M, N, 4]): per image and model, N boxes (padded).
        scores (Tensor[B, M, N]), labels (Tensor[B, M, N] integer).
        counts (Tensor[B, M] integer, optional): real boxes per image and model (the rest is padding); None = all N.
        weights, iou_threshold, skip_box_threshold, conf_type, allows_overflow: as :func:`weighted_boxes_fusion`.

    Returns:
        boxes (Tensor[B, M * N, 4] float64), scores (Tensor[B, M * N] float64), labels (Tensor[B, M * N] int64, -1 in
        padding) by decreasing score, and num_fused (Tensor[B] int64).
    """
    counts = _batched_args(boxes, scores, labels, counts)
    return native("weighted_boxes_fusion")(
        boxes, scores, labels, counts, _weights(weights, boxes.shape[1], boxes.device), float(iou_threshold),
        float(skip_box_threshold), _conf_type(conf_type), bool(allows_overflow),
    )


def non_maximum_weighted(
    boxes_list,
    scores_list,
    labels_list,
    weights=None,
    iou_threshold: float = 0.55,
    skip_box_threshold: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Non-maximum weighted fusion of one image's detections from several models (ensemble-boxes'
    ``non_maximum_weighted``; see the module docstring).

    Args:
        boxes_list, scores_list, labels_list, weights, skip_box_threshold: as :func:`weighted_boxes_fusion`.
        iou_threshold (float): a box joins a cluster whose first box overlaps it with IoU > iou_threshold.

    Returns:
        boxes (Tensor[K, 4] float32), scores (Tensor[K] float32), labels (Tensor[K] int64), by decreasing score.
    """
    return _one_image(non_maximum_weighted_batched, boxes_list, scores_list, labels_list, weights, iou_threshold,
                      skip_box_threshold)


def non_maximum_weighted_batched(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    counts: Tensor | None = None,
    weights=None,
    iou_threshold: float = 0.55,
    skip_box_threshold: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`non_maximum_weighted` of B images at once, with fixed-size outputs (arguments as
    :func:`weighted_boxes_fusion_batched`).

    Returns:
        boxes (Tensor[B, M * N, 4] float32), scores (Tensor[B, M * N] float32), labels (Tensor[B, M * N] int64, -1 in
        padding) by decreasing score, and num_fused (Tensor[B] int64).
    """
    counts = _batched_args(boxes, scores, labels, counts)
    return native("non_maximum_weighted")(
        boxes, scores, labels, counts, _weights(weights, boxes.shape[1], boxes.device), float(iou_threshold),
        float(skip_box_threshold),
    )


def _wbf_fake(boxes, scores, labels, counts, weights, iou_threshold, skip_box_threshold, conf_type, allows_overflow):
    B, M, N = boxes.shape[:3]
    return (
        boxes.new_empty((B, M * N, 4), dtype=torch.float64),
        boxes.new_empty((B, M * N), dtype=torch.float64),
        boxes.new_empty((B, M * N), dtype=torch.int64),
        boxes.new_empty((B,), dtype=torch.int64),
    )


@register_fake("non_maximum_weighted")
def _nmw_fake(boxes, scores, labels, counts, weights, iou_threshold, skip_box_threshold):
    out_boxes, out_scores, out_labels, num = _wbf_fake(boxes, scores, labels, counts, weights, iou_threshold,
                                                       skip_box_threshold, 0, False)
    return out_boxes.to(torch.float32), out_scores.to(torch.float32), out_labels, num


@register_fake("_weighted_boxes_fusion_kernel")
def _wbf_kernel_fake(boxes, scores, labels, counts, weights, iou_threshold, skip_box_threshold, conf_type,
                     allows_overflow, method):
    return _wbf_fake(boxes, scores, labels, counts, weights, iou_threshold, skip_box_threshold, conf_type,
                     allows_overflow)


register_fake("weighted_boxes_fusion")(_wbf_fake)
