"""Region proposal network (Ren et al. 2015) with torchvision's semantics and fixed-size, synchronisation-free
proposal selection.

Proposal selection for a batch (:func:`select_proposals`), equivalent to torchvision's ``filter_proposals``:

1. per pyramid level, the ``pre_nms_top_n`` anchors with the highest objectness logits (ties: lower anchor index
   first), decoded and clipped to their image (``fastdet.ops.decode_and_select``, one call per level);
2. a candidate survives if its clipped width and height are ``>= min_size`` and ``sigmoid(logit) >= score_thresh``
   (``>=``, as torchvision); failing candidates get score ``-inf`` instead of being removed;
3. NMS with the pyramid level as the category (``fastdet.ops.nms_fixed``) keeps the first ``post_nms_top_n``.

The result is padded: ``boxes [B, P, 4]``, ``scores [B, P]`` and ``valid [B, P]``, valid slots first, ordered by
score as torchvision's list. Padding slots hold zero boxes and score 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet.models.matching import BELOW_LOW_THRESHOLD, BalancedPositiveNegativeSampler, Matcher, match_iou
from fastdet.models.postprocess import flatten_level_outputs, gather_rows, image_sizes_tensor
from fastdet.models.targets import PaddedTargets
from fastdet.ops import box_encode, decode_and_select, nms_fixed, smooth_l1_loss

__all__ = ["Proposals", "RPNHead", "RegionProposalNetwork", "flatten_level_outputs", "select_proposals"]


class Proposals(NamedTuple):
    boxes: Tensor  # [B, P, 4] xyxy in resized-image pixels
    scores: Tensor  # [B, P] objectness probability
    valid: Tensor  # [B, P] bool; valid slots form a prefix of each row


class RPNHead(nn.Module):
    """Shared 3x3 conv(s) + ReLU, then 1x1 convs for ``A`` objectness logits and ``4A`` box deltas per location.

    State-dict names match torchvision's ``RPNHead``: ``conv.{i}.0``, ``cls_logits``, ``bbox_pred``. Weights are
    N(0, 0.01), biases 0.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1):
        super().__init__()
        self.conv = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True))
            for _ in range(conv_depth)
        ])
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.constant_(layer.bias, 0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in features:  # one conv stack per pyramid level (different spatial sizes)
            hidden = self.conv(feature)
            logits.append(self.cls_logits(hidden))
            deltas.append(self.bbox_pred(hidden))
        return logits, deltas


def select_proposals(objectness: Tensor, deltas: Tensor, anchors: Tensor, num_anchors_per_level: Sequence[int],
                     image_sizes: Tensor, pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float,
                     score_thresh: float = 0.0, min_size: float = 1e-3) -> Proposals:
    """Turn dense RPN outputs into padded proposals for the whole batch (see the module docstring).

    Args:
        objectness (Tensor[B, N]): logits. deltas (Tensor[B, N, 4]). anchors (Tensor[N, 4]): shared by the batch.
        num_anchors_per_level (list of int): split of N by pyramid level.
        image_sizes (Tensor[B, 2]): ``(height, width)`` to clip to.
    Returns:
        :class:`Proposals` with ``P = post_nms_top_n``.

    Tensor code only, with shapes fixed by the arguments: no host synchronisation, compiles with
    ``torch.compile(fullgraph=True)``.
    """
    B = objectness.shape[0]
    objectness = objectness.detach().float()
    deltas = deltas.detach().float()  # decode in float32 even under autocast: bf16 corners would be ~1 px coarse
    boxes, logits, levels = [], [], []
    start = 0
    for level, count in enumerate(num_anchors_per_level):
        stop = start + count
        take = min(pre_nms_top_n, count)
        level_boxes, level_logits, _, _ = decode_and_select(
            deltas[:, start:stop], anchors[start:stop], objectness[:, start:stop], float("-inf"), take, image_sizes)
        boxes.append(level_boxes)
        logits.append(level_logits[..., 0])
        levels.append(torch.full((take,), level, dtype=torch.int64, device=objectness.device))
        start = stop
    boxes = torch.cat(boxes, dim=1)
    logits = torch.cat(logits, dim=1)  # -inf in slots decode_and_select left empty
    levels = torch.cat(levels).expand(B, -1)
    probs = torch.sigmoid(logits)
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    passing = (logits > float("-inf")) & (widths >= min_size) & (heights >= min_size) & (probs >= score_thresh)
    # Failing candidates sort after every passing one (even a passing score of exactly 0) and so cannot suppress one;
    # they may fill keep slots after the passing ones, which the validity mask below discards.
    ranked = torch.where(passing, probs, float("-inf"))
    keep, _ = nms_fixed(boxes, ranked, levels, nms_thresh, post_nms_top_n)
    safe = keep.clamp(min=0)
    valid = (keep >= 0) & passing.gather(1, safe)
    out_boxes = torch.where(valid[..., None], gather_rows(boxes, safe), 0.0)
    out_scores = torch.where(valid, probs.gather(1, safe), 0.0)
    return Proposals(out_boxes, out_scores, valid)


class RegionProposalNetwork(nn.Module):
    """RPN: anchors, head, proposal selection and (in training) the objectness and box-regression losses.

    Args are torchvision's: ``anchor_generator`` (e.g. ``fastdet.ops.AnchorGenerator``), ``head``,
    ``fg_iou_thresh``/``bg_iou_thresh`` (anchor matching, with low-quality matches), ``batch_size_per_image`` and
    ``positive_fraction`` (anchor sampling), ``pre_nms_top_n``/``post_nms_top_n`` (dicts with ``"training"`` and
    ``"testing"``), ``nms_thresh``, ``score_thresh`` and ``min_size`` (1e-3, torchvision's fixed value).

    ``forward(images, features, targets=None) -> (Proposals, losses)``; ``targets`` is :class:`PaddedTargets`.
    Losses: ``loss_objectness`` (BCE over the sampled anchors) and ``loss_rpn_box_reg`` (smooth L1, beta 1/9, over
    positive anchors, divided by the number of sampled anchors).
    """

    def __init__(self, anchor_generator: nn.Module, head: nn.Module, fg_iou_thresh: float, bg_iou_thresh: float,
                 batch_size_per_image: int, positive_fraction: float, pre_nms_top_n: dict[str, int],
                 post_nms_top_n: dict[str, int], nms_thresh: float, score_thresh: float = 0.0,
                 min_size: float = 1e-3):
        super().__init__()
        for name, value in (("pre_nms_top_n", pre_nms_top_n), ("post_nms_top_n", post_nms_top_n)):
            if not isinstance(value, dict) or set(value) != {"training", "testing"}:
                raise ValueError(f"{name} must be a dict with keys 'training' and 'testing', got {value!r}")
        self.anchor_generator = anchor_generator
        self.head = head
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self._pre_nms_top_n = dict(pre_nms_top_n)
        self._post_nms_top_n = dict(post_nms_top_n)
        self.nms_thresh = float(nms_thresh)
        self.score_thresh = float(score_thresh)
        self.min_size = float(min_size)

    def pre_nms_top_n(self) -> int:
        return self._pre_nms_top_n["training" if self.training else "testing"]

    def post_nms_top_n(self) -> int:
        return self._post_nms_top_n["training" if self.training else "testing"]

    def forward(self, images, features: dict[str, Tensor], targets: PaddedTargets | None = None
                ) -> tuple[Proposals, dict[str, Tensor]]:
        feature_list = list(features.values())
        logits, deltas = self.head(feature_list)
        # Anchors in float32 even under autocast (the generator follows the features' dtype, and bf16 corners would be
        # rounded to ~1 px); zero-size stand-ins carry the grid sizes without copying the features.
        grids = [f.new_empty((0, 0, *f.shape[-2:]), dtype=torch.float32) for f in feature_list]
        anchors = self.anchor_generator(images, grids)[0]  # one tensor shared by every image
        num_anchors_per_level = [int(l.shape[1] * l.shape[2] * l.shape[3]) for l in logits]
        objectness = flatten_level_outputs(logits, 1)[..., 0]
        box_deltas = flatten_level_outputs(deltas, 4)
        sizes = image_sizes_tensor(images.image_sizes, objectness.device)
        proposals = select_proposals(objectness, box_deltas, anchors, num_anchors_per_level, sizes,
                                     self.pre_nms_top_n(), self.post_nms_top_n(), self.nms_thresh, self.score_thresh,
                                     self.min_size)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets must be given in training mode")
            losses = self.compute_loss(objectness, box_deltas, anchors, targets)
        return proposals, losses

    def compute_loss(self, objectness: Tensor, deltas: Tensor, anchors: Tensor, targets: PaddedTargets
                     ) -> dict[str, Tensor]:
        B, N = objectness.shape
        anchors = anchors.float()
        matches = self.proposal_matcher(match_iou(targets.boxes, anchors), targets.valid)
        labels = torch.where(matches >= 0, 1, torch.where(matches == BELOW_LOW_THRESHOLD, 0, -1))
        positive, negative = self.fg_bg_sampler(labels)
        sampled = positive | negative
        num_sampled = sampled.sum().clamp(min=1).float()
        # Non-positive anchors regress towards themselves, so that no padding box (zeros) enters log(0); their targets
        # are then forced to 0 (a NaN target would turn the masked loss term's zero gradient into NaN).
        matched_boxes = gather_rows(targets.boxes, matches.clamp(min=0))
        anchors_b = anchors.expand(B, N, 4)
        matched_boxes = torch.where(positive[..., None], matched_boxes, anchors_b)
        regression_targets = box_encode(matched_boxes.reshape(-1, 4), anchors_b.reshape(-1, 4)).reshape(B, N, 4)
        regression_targets = torch.where(positive[..., None], regression_targets, 0.0)
        box_loss = smooth_l1_loss(deltas.float(), regression_targets, beta=1 / 9).sum(dim=-1)
        box_loss = torch.where(positive, box_loss, 0.0).sum() / num_sampled
        bce = F.binary_cross_entropy_with_logits(objectness.float(), positive.float(), reduction="none")
        objectness_loss = torch.where(sampled, bce, 0.0).sum() / num_sampled
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}

