"""SSD's and SSDlite's dense heads (torchvision's module names), SSD's batched matching (torchvision's
``SSDMatcher`` on the shared :class:`~fastdet.models.matching.Matcher`), its loss with hard negative mining and its
batched, fixed-size detection selection. See :mod:`fastdet.models.ssd` for the detector."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet import ops
from fastdet.models.layers import conv_norm_activation, normal_init, xavier_init
from fastdet.models.matching import BELOW_LOW_THRESHOLD, Matcher
from fastdet.models.postprocess import order_by_anchor_index, stable_top_k_mask
from fastdet.models.targets import PaddedTargets

__all__ = [
    "SSDClassificationHead",
    "SSDHead",
    "SSDLiteClassificationHead",
    "SSDLiteHead",
    "SSDLiteRegressionHead",
    "SSDRegressionHead",
    "SSD_BOX_WEIGHTS",
    "match_default_boxes",
    "ssd_loss",
    "ssd_select_detections",
]

SSD_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


class _SSDScoringHead(nn.Module):
    """One 3x3 conv per feature map (``module_list.{level}``); outputs are flattened to ``[B, sum_l H_l W_l A_l,
    columns]`` in the default boxes' order (row, column, box shape)."""

    def __init__(self, module_list: nn.ModuleList, num_columns: int):
        super().__init__()
        self.module_list = module_list
        self.num_columns = num_columns

    def forward(self, features: list[Tensor]) -> Tensor:
        if len(features) != len(self.module_list):
            raise ValueError(f"the head was built for {len(self.module_list)} feature maps, got {len(features)}")
        outputs = []
        for conv, feature in zip(self.module_list, features):
            result = conv(feature)
            batch, _, height, width = result.shape
            result = result.view(batch, -1, self.num_columns, height, width).permute(0, 3, 4, 1, 2)
            outputs.append(result.reshape(batch, -1, self.num_columns))
        return torch.cat(outputs, dim=1)


class SSDClassificationHead(_SSDScoringHead):
    """Class logits (``num_classes`` including background 0) for every default box."""

    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int):
        convs = nn.ModuleList(nn.Conv2d(c, num_classes * a, kernel_size=3, padding=1)
                              for c, a in zip(in_channels, num_anchors))
        xavier_init(convs)
        super().__init__(convs, num_classes)


class SSDRegressionHead(_SSDScoringHead):
    """Box deltas (weights ``(10, 10, 5, 5)``) for every default box."""

    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int]):
        convs = nn.ModuleList(nn.Conv2d(c, 4 * a, kernel_size=3, padding=1) for c, a in zip(in_channels, num_anchors))
        xavier_init(convs)
        super().__init__(convs, 4)


class SSDHead(nn.Module):
    """``forward(features)`` -> ``{"bbox_regression": [B, N, 4], "cls_logits": [B, N, num_classes]}``."""

    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int):
        super().__init__()
        if len(in_channels) != len(num_anchors):
            raise ValueError(f"in_channels ({len(in_channels)}) and num_anchors ({len(num_anchors)}) must describe "
                             "the same feature maps")
        self.classification_head = SSDClassificationHead(in_channels, num_anchors, num_classes)
        self.regression_head = SSDRegressionHead(in_channels, num_anchors)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return {"bbox_regression": self.regression_head(features),
                "cls_logits": self.classification_head(features)}


def match_default_boxes(gt_boxes: Tensor, gt_valid: Tensor, default_boxes: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's ``SSDMatcher`` for a whole batch.

    A default box is matched to its highest-IoU ground-truth box when that IoU is >= ``iou_threshold``; in addition
    every ground-truth box claims its own highest-IoU default box (when two boxes claim the same default box, the
    later box wins, as torchvision's in-order assignment does).

    Args:
        gt_boxes (Tensor[B, G, 4]), gt_valid (Tensor[B, G] bool): padded ground truth.
        default_boxes (Tensor[N, 4]): shared by the batch.

    Returns:
        Tensor[B, N] int64: the matched ground-truth index or -1.
    """
    batch, num_gt = gt_boxes.shape[:2]
    num_boxes = default_boxes.shape[0]
    if num_gt == 0:
        return torch.full((batch, num_boxes), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=default_boxes.device)
    iou = ops.box_iou(gt_boxes.to(default_boxes.dtype), default_boxes)  # [B, G, N]
    # The threshold rule is the Matcher's with low == high: IoU >= threshold matches, anything below is background.
    matches = Matcher(iou_threshold, iou_threshold)(iou, gt_valid)
    # Claims: the largest claiming index wins; padding rows claim an extra, discarded column.
    claimed_box = torch.where(gt_valid, iou.argmax(dim=2), num_boxes)  # [B, G]
    claimant = torch.arange(num_gt, device=iou.device).expand(batch, num_gt)
    claims = torch.full((batch, num_boxes + 1), -1, dtype=torch.int64, device=iou.device)
    claims = claims.scatter_reduce(1, claimed_box, claimant, reduce="amax")[:, :num_boxes]
    return torch.where(claims >= 0, claims, matches)


def ssd_loss(cls_logits: Tensor, bbox_regression: Tensor, padded_targets: PaddedTargets, default_boxes: Tensor,
             matched_idxs: Tensor, neg_to_pos_ratio: float) -> dict[str, Tensor]:
    """torchvision's SSD losses for a batch (see the module docstring); returns ``{"bbox_regression",
    "classification"}``, both divided by max(1, number of positives in the batch)."""
    batch, num_boxes = matched_idxs.shape
    foreground_match = matched_idxs >= 0
    safe = matched_idxs.clamp(min=0)
    boxes_b = default_boxes.to(padded_targets.boxes.dtype).expand(batch, num_boxes, 4)
    matched_boxes = padded_targets.boxes.gather(1, safe[:, :, None].expand(batch, num_boxes, 4))
    matched_boxes = torch.where(foreground_match[:, :, None], matched_boxes, boxes_b)  # background: zero delta
    target_deltas = ops.box_encode(matched_boxes.reshape(-1, 4), boxes_b.reshape(-1, 4), SSD_BOX_WEIGHTS)
    pred = bbox_regression.reshape(-1, 4)
    pred = pred if pred.dtype == torch.float64 else pred.float()
    box_terms = ops.smooth_l1_loss(pred, target_deltas.to(pred.dtype), beta=1.0).sum(dim=1).reshape(batch, num_boxes)
    box_loss = torch.where(foreground_match, box_terms, 0).sum()

    cls_targets = torch.where(foreground_match, padded_targets.labels.gather(1, safe), 0)
    logits = cls_logits if cls_logits.dtype == torch.float64 else cls_logits.float()
    cls_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), cls_targets.reshape(-1), reduction="none")
    cls_loss = cls_loss.reshape(batch, num_boxes)
    # Hard negative mining, as torchvision: a box counts as positive when its target class is not background; each
    # image keeps the neg_to_pos_ratio * positives highest-loss boxes of its ranking, with positives ranked last.
    positive = cls_targets > 0
    num_positive = positive.sum(dim=1, keepdim=True)
    negative_loss = cls_loss.detach().masked_fill(positive, float("-inf"))
    rank = negative_loss.argsort(dim=1, descending=True).argsort(dim=1)
    hard_negative = rank < neg_to_pos_ratio * num_positive
    cls_total = torch.where(positive, cls_loss, 0).sum() + torch.where(hard_negative, cls_loss, 0).sum()
    normaliser = foreground_match.sum().clamp(min=1)
    return {"bbox_regression": box_loss / normaliser, "classification": cls_total / normaliser}


def ssd_select_detections(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    default_boxes: Tensor,
    image_sizes: Tensor,
    score_thresh: float = 0.01,
    topk_candidates: int = 400,
    nms_thresh: float = 0.45,
    detections_per_img: int = 200,
    nms_method: str = "hard",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SSD's detection selection for a whole batch, with torchvision's rules and fixed-size outputs.

    Args:
        cls_logits (Tensor[B, N, K]): logits, class 0 = background.
        bbox_regression (Tensor[B, N, 4]): deltas with weights ``(10, 10, 5, 5)``.
        default_boxes (Tensor[N, 4]): xyxy, shared by the batch.
        image_sizes (Tensor[B, 2]): ``(height, width)``; boxes are clipped to it.
        score_thresh, topk_candidates, nms_thresh, detections_per_img: as torchvision's ``SSD``.

    Returns:
        boxes (Tensor[B, D, 4] float32), scores (Tensor[B, D]), labels (Tensor[B, D] int64, in ``[1, K)``),
        num_detections (Tensor[B] int64), ``D = detections_per_img``; padding slots hold zeros and label -1.

    Rules (torchvision's, per image): softmax over classes; for every foreground class, the default boxes with
    probability > ``score_thresh``, best ``topk_candidates`` of them (ties: lower box index); their decoded, clipped
    boxes go through class-wise NMS and the best ``detections_per_img`` survivors are returned by decreasing score.
    Ties in the final order: same class, lower box index first; different classes at the same box, lower class
    first; different boxes and classes, lower box index first (torchvision concatenates the classes before a sort
    whose tie order it does not define on large inputs). Scores are float32 whatever the head's dtype.
    """
    batch, num_boxes, num_classes = cls_logits.shape
    foreground = F.softmax(cls_logits.float(), dim=-1)[:, :, 1:]  # [B, N, K - 1]
    # Per-class candidates: the best topk_candidates passing boxes of each (image, class) row.
    per_class = foreground.transpose(1, 2).reshape(batch * (num_classes - 1), num_boxes)
    ranked = torch.where(per_class > score_thresh, per_class, float("-inf"))
    chosen = stable_top_k_mask(ranked, topk_candidates) & (ranked > float("-inf"))
    chosen = chosen.reshape(batch, num_classes - 1, num_boxes).transpose(1, 2)
    candidate_scores = torch.where(chosen, foreground, float("-inf"))
    # Every box with a chosen class is a candidate (at most min(N, topk * (K - 1))); only those are decoded.
    max_candidates = min(num_boxes, topk_candidates * (num_classes - 1))
    boxes, scores, index, _ = ops.decode_and_select(bbox_regression.float(), default_boxes.float(), candidate_scores,
                                                    score_thresh, max_candidates, image_sizes, weights=SSD_BOX_WEIGHTS)
    boxes, scores, _ = order_by_anchor_index(boxes, scores, index)
    # At most min(N, topk) boxes per class pass, so this pre-NMS cap never drops a candidate.
    det_boxes, det_scores, det_labels, num = ops.multiclass_nms(
        boxes, scores, score_thresh, nms_thresh, detections_per_img,
        pre_nms_top_k=min(num_boxes, topk_candidates) * (num_classes - 1), method=nms_method)
    # Class columns start at 1 (background removed); padding labels stay -1.
    return det_boxes, det_scores, torch.where(det_labels >= 0, det_labels + 1, -1), num


def _prediction_block(in_channels: int, out_channels: int, norm_layer: Callable[[int], nn.Module]) -> nn.Sequential:
    # Depthwise 3x3 + norm + ReLU6, then a 1x1 convolution to the outputs (keys {level}.0.*, {level}.1.*).
    return nn.Sequential(
        conv_norm_activation(in_channels, in_channels, 3, groups=in_channels, norm_layer=norm_layer,
                             activation_layer=nn.ReLU6),
        nn.Conv2d(in_channels, out_channels, 1))


class SSDLiteClassificationHead(_SSDScoringHead):
    """Class logits (background 0 included) of every default box through separable prediction blocks."""

    init_logits = staticmethod(normal_init)  # how SSD.replace_class_heads initialises a fresh logits layer

    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int,
                 norm_layer: Callable[[int], nn.Module]):
        blocks = nn.ModuleList(_prediction_block(c, num_classes * a, norm_layer) for c, a in zip(in_channels,
                                                                                                 num_anchors))
        normal_init(blocks)
        super().__init__(blocks, num_classes)


class SSDLiteRegressionHead(_SSDScoringHead):
    """Box deltas (weights ``(10, 10, 5, 5)``) of every default box through separable prediction blocks."""

    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], norm_layer: Callable[[int], nn.Module]):
        blocks = nn.ModuleList(_prediction_block(c, 4 * a, norm_layer) for c, a in zip(in_channels, num_anchors))
        normal_init(blocks)
        super().__init__(blocks, 4)


class SSDLiteHead(nn.Module):
    """``forward(features)`` -> ``{"bbox_regression": [B, N, 4], "cls_logits": [B, N, num_classes]}``."""

    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int,
                 norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.classification_head = SSDLiteClassificationHead(in_channels, num_anchors, num_classes, norm_layer)
        self.regression_head = SSDLiteRegressionHead(in_channels, num_anchors, norm_layer)

    def forward(self, features):
        return {"bbox_regression": self.regression_head(features), "cls_logits": self.classification_head(features)}
