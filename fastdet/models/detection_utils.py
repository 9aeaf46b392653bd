"""Training-target machinery shared by the detectors, batched over images with fixed shapes and masks.

Nothing here loops over images or boxes in Python or reads a tensor value back to the host, so a training step's
target assignment costs the same number of kernel launches whatever the batch holds.

Conventions:

* Ground truth of a batch is padded to ``G = max(1, most boxes in any image)`` slots: ``boxes [B, G, 4]``,
  ``labels [B, G]`` and ``valid [B, G]`` (:class:`PaddedTargets`). Padding slots hold zero boxes and label 0 and are
  ignored everywhere through ``valid``; an image without objects is an all-padding row, so it trains as pure
  background.
* Match results use torchvision's codes: a gt index ``>= 0``, :data:`BELOW_LOW_THRESHOLD` (-1, background) and
  :data:`BETWEEN_THRESHOLDS` (-2, ignored).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from fastdet.ops import box_iou

__all__ = [
    "BELOW_LOW_THRESHOLD",
    "BETWEEN_THRESHOLDS",
    "BalancedPositiveNegativeSampler",
    "Matcher",
    "PaddedTargets",
    "clip_boxes_to_images",
    "compact_mask",
    "gather_rows",
    "match_iou",
    "pad_targets",
]

BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


class PaddedTargets(NamedTuple):
    """Ground truth of a batch padded to G slots per image (see the module docstring)."""

    boxes: Tensor  # [B, G, 4] float, xyxy
    labels: Tensor  # [B, G] int64
    valid: Tensor  # [B, G] bool
    masks: list[Tensor] | None = None  # per image [G_i, H_i, W_i] instance masks, when every target has them


def pad_targets(targets: list[dict[str, Tensor]], device: torch.device | None = None,
                dtype: torch.dtype = torch.float32, with_masks: bool = False) -> PaddedTargets:
    """Stack per-image ``{"boxes", "labels"}`` dicts into :class:`PaddedTargets` (G >= 1 so shapes never collapse)."""
    if len(targets) == 0:
        raise ValueError("targets must hold one dict per image, got an empty list")
    if device is None:
        device = targets[0]["boxes"].device
    # One sentinel row per image guarantees G >= 1 even when every image is empty; it is dropped again below only
    # if some image has boxes (then the longest image defines G).
    boxes = [t["boxes"].to(device=device, dtype=dtype) for t in targets]
    labels = [t["labels"].to(device=device, dtype=torch.int64) for t in targets]
    counts = torch.tensor([b.shape[0] for b in boxes], device=device)
    padded_boxes = pad_sequence(boxes + [boxes[0].new_zeros(1, 4)], batch_first=True)[:-1]
    padded_labels = pad_sequence(labels + [labels[0].new_zeros(1)], batch_first=True)[:-1]
    slots = padded_boxes.shape[1]
    valid = torch.arange(slots, device=device)[None, :] < counts[:, None]
    masks = [t["masks"].to(device) for t in targets] if with_masks and all("masks" in t for t in targets) else None
    return PaddedTargets(padded_boxes, padded_labels, valid, masks)


def gather_rows(values: Tensor, index: Tensor) -> Tensor:
    """``values [B, N, *rest]`` gathered along dim 1 by ``index [B, K]`` -> ``[B, K, *rest]``."""
    expanded = index.reshape(*index.shape, *([1] * (values.dim() - 2))).expand(*index.shape, *values.shape[2:])
    return values.gather(1, expanded)


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


def compact_mask(mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Indices ``[B, k]`` of the set entries of ``mask [B, N]`` in increasing order, then unset entries (also in
    increasing order) as filler, and ``valid [B, k]`` telling which slots are set entries. ``k <= N``."""
    B, N = mask.shape
    positions = torch.arange(N, device=mask.device)
    # Unique integer keys: set entries above unset ones, lower index first within each group.
    keys = torch.where(mask, 2 * N - positions, N - positions)
    top = keys.topk(k, dim=1).values
    index = torch.where(top > N, 2 * N - top, N - top)
    return index, top > N


def clip_boxes_to_images(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clamp xyxy ``boxes [B, ..., 4]`` to ``[0, width] x [0, height]`` of their image (``image_sizes [B, 2]``)."""
    shape = (boxes.shape[0],) + (1,) * (boxes.dim() - 2)
    heights = image_sizes[:, 0].reshape(shape).to(boxes.dtype)
    widths = image_sizes[:, 1].reshape(shape).to(boxes.dtype)
    x1, y1, x2, y2 = boxes.unbind(-1)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    # clamp(min=0) then clamp(max=size): torchvision's clip_boxes_to_image, with a per-image upper bound
    clipped = (torch.minimum(torch.maximum(x1, zero), widths), torch.minimum(torch.maximum(y1, zero), heights),
               torch.minimum(torch.maximum(x2, zero), widths), torch.minimum(torch.maximum(y2, zero), heights))
    return torch.stack(clipped, dim=-1)
