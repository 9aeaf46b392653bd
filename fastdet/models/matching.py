"""Matching and sampling for training targets, batched over images with fixed shapes and masks: one IoU matcher
(torchvision's ``Matcher`` rules, used by the RPN, the RoI heads, RetinaNet and SSD) and the fg/bg sampler.

Nothing here loops over images or boxes in Python or reads a tensor value back to the host, so a training step's
target assignment costs the same number of kernel launches whatever the batch holds. Ground truth comes padded
(:class:`fastdet.models.targets.PaddedTargets`). Match results use torchvision's codes: a gt index ``>= 0``,
:data:`BELOW_LOW_THRESHOLD` (-1, background) and :data:`BETWEEN_THRESHOLDS` (-2, ignored).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdet.ops import box_iou

__all__ = [
    "BELOW_LOW_THRESHOLD",
    "BETWEEN_THRESHOLDS",
    "BalancedPositiveNegativeSampler",
    "Matcher",
    "match_anchors",
    "match_iou",
]

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class Matcher:
    """Assign each prediction (anchor or proposal) to its best ground-truth box by IoU, torchvision's ``Matcher``
    semantics, for a batch at once.

    Args:
        high_threshold (float): IoU >= high is a match (foreground).
        low_threshold (float): IoU < low is background (:data:`BELOW_LOW_THRESHOLD`); in between is ignored
            (:data:`BETWEEN_THRESHOLDS`).
        allow_low_quality_matches (bool): also match, for every ground-truth box, the predictions that reach its
            highest IoU (all of them when several tie), even below ``high``, to that prediction's best box. As in
            torchvision, a ground-truth box that overlaps nothing has highest IoU 0, which then revives every
            prediction whose best IoU is 0 (torchvision's behaviour, kept for identical targets).

    ``matcher(iou [B, G, N], gt_valid [B, G]) -> matches [B, N] int64``. Padding rows (``gt_valid`` False) never match
    and never trigger low-quality matches; an image with no valid box gets :data:`BELOW_LOW_THRESHOLD` everywhere.
    Ties between ground-truth boxes go to the lowest index (``argmax``'s first maximum, as ``max`` in torchvision).
    """

    def __init__(self, high_threshold: float, low_threshold: float, allow_low_quality_matches: bool = False):
        if not low_threshold <= high_threshold:
            raise ValueError(f"low_threshold ({low_threshold}) must not exceed high_threshold ({high_threshold})")
        self.high_threshold = float(high_threshold)
        self.low_threshold = float(low_threshold)
        self.allow_low_quality_matches = bool(allow_low_quality_matches)

    def __call__(self, iou: Tensor, gt_valid: Tensor, prediction_valid: Tensor | None = None) -> Tensor:
        if iou.dim() != 3 or tuple(gt_valid.shape) != tuple(iou.shape[:2]):
            raise ValueError(f"iou must be [B, G, N] and gt_valid [B, G], got {tuple(iou.shape)} and "
                             f"{tuple(gt_valid.shape)}")
        usable = gt_valid[:, :, None]
        if prediction_valid is not None:
            usable = usable & prediction_valid[:, None, :]
        # -1 lies below every IoU and every threshold: padding never wins and never passes.
        iou = torch.where(usable, iou, -1.0)
        best_iou, best_gt = iou.max(dim=1)  # [B, N]
        matches = torch.where(best_iou < self.low_threshold, BELOW_LOW_THRESHOLD,
                              torch.where(best_iou < self.high_threshold, BETWEEN_THRESHOLDS, best_gt))
        if self.allow_low_quality_matches:
            best_per_gt = iou.amax(dim=2, keepdim=True)  # [B, G, 1]
            reaches_best = (iou == best_per_gt) & usable
            revive = reaches_best.any(dim=1)  # [B, N]
            matches = torch.where(revive, best_gt, matches)
        # An image without valid ground truth: every IoU is -1, which the rule above already maps to background.
        return matches


def match_anchors(gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor, high_threshold: float, low_threshold: float,
                  allow_low_quality_matches: bool) -> Tensor:
    """:class:`Matcher` on the IoU of padded ground truth against anchors shared by the batch (RetinaNet's use).

    Args:
        gt_boxes (Tensor[B, G, 4]), gt_valid (Tensor[B, G] bool): padded ground truth.
        anchors (Tensor[A, 4]): anchors shared by the batch; the IoU is computed in their dtype.
        high_threshold, low_threshold, allow_low_quality_matches: as :class:`Matcher`.

    Returns:
        Tensor[B, A] int64: the matched ground-truth index, or -1 (background) / -2 (between thresholds). Images
        without boxes (or ``G == 0``) get -1 everywhere.
    """
    batch, num_gt = gt_boxes.shape[:2]
    if num_gt == 0:
        return torch.full((batch, anchors.shape[0]), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=anchors.device)
    iou = box_iou(gt_boxes.to(anchors.dtype), anchors)  # [B, G, A]
    return Matcher(high_threshold, low_threshold, allow_low_quality_matches)(iou, gt_valid)


def match_iou(gt_boxes: Tensor, predictions: Tensor) -> Tensor:
    """IoU ``[B, G, N]`` of ``gt_boxes [B, G, 4]`` against ``predictions [N, 4]`` (shared) or ``[B, N, 4]``; one
    kernel launch for the batch."""
    if predictions.dim() == 2:
        predictions = predictions.unsqueeze(0)
    return box_iou(gt_boxes, predictions.to(gt_boxes.dtype))


class BalancedPositiveNegativeSampler:
    """Draw up to ``batch_size_per_image`` examples per image, at most ``positive_fraction`` of them positive, the
    rest negative (torchvision's ``BalancedPositiveNegativeSampler`` rule), for a whole batch with masks.

    ``sampler(labels [B, N]) -> (positive [B, N] bool, negative [B, N] bool)`` where ``labels >= 1`` is positive,
    ``0`` negative and ``-1`` ignored. Per image: ``num_pos = min(#positives, int(batch_size * fraction))`` and
    ``num_neg = min(#negatives, batch_size - num_pos)``, each a uniformly random subset. The subset is drawn by giving
    every candidate a uniform random key and keeping the largest keys (a random permutation's prefix), with one
    ``topk`` per kind instead of a ``randperm`` per image; which elements are drawn differs from torchvision's for the
    same seed, the distribution does not.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        if batch_size_per_image <= 0 or not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"batch_size_per_image must be > 0 and positive_fraction in [0, 1], got "
                             f"{batch_size_per_image} and {positive_fraction}")
        self.batch_size_per_image = int(batch_size_per_image)
        self.positive_fraction = float(positive_fraction)

    def __call__(self, labels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        B, N = labels.shape
        max_positive = int(self.batch_size_per_image * self.positive_fraction)
        keys = torch.rand((B, N), device=labels.device, generator=generator)
        positive = _random_subset(labels >= 1, keys, max_positive, None)
        wanted_negative = self.batch_size_per_image - positive.sum(dim=1, keepdim=True)
        negative = _random_subset(labels == 0, keys, self.batch_size_per_image, wanted_negative)
        return positive, negative


def _random_subset(candidates: Tensor, keys: Tensor, k_max: int, k_per_row: Tensor | None) -> Tensor:
    """Mask of the ``min(k, #candidates)`` candidates with the largest keys per row; ``k`` is ``k_max`` or the
    per-row ``k_per_row [B, 1]`` (<= k_max)."""
    B, N = candidates.shape
    take = min(k_max, N)
    if take == 0:
        return torch.zeros_like(candidates)
    ranked_keys = torch.where(candidates, keys, -1.0)  # keys are in [0, 1): non-candidates rank last
    top_keys, top_index = ranked_keys.topk(take, dim=1)
    chosen = top_keys >= 0
    if k_per_row is not None:
        chosen = chosen & (torch.arange(take, device=keys.device)[None, :] < k_per_row)
    return torch.zeros_like(candidates).scatter_(1, top_index, chosen)
