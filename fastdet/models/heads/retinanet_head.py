"""RetinaNet's dense head (classification and box-regression subnets with torchvision's module names, version-1
checkpoint key upgrade), its batched losses (sigmoid focal loss; l1 / smooth-l1 / IoU-family box losses) and its
batched, fixed-size detection selection. See :mod:`fastdet.models.retinanet` for the detector."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet import ops
from fastdet.models.layers import conv_norm_activation
from fastdet.models.matching import BETWEEN_THRESHOLDS
from fastdet.models.postprocess import flatten_level, order_by_anchor_index, stable_top_k_mask
from fastdet.models.targets import PaddedTargets

__all__ = [
    "BOX_LOSS_TYPES",
    "RetinaNetClassificationHead",
    "RetinaNetHead",
    "RetinaNetRegressionHead",
    "retinanet_box_loss",
    "retinanet_classification_loss",
    "retinanet_select_detections",
]

_IGNORE_LABEL = -100  # sigmoid_focal_loss_with_labels' ignore_index


BOX_LOSS_TYPES = ("l1", "smooth_l1", "giou", "diou", "ciou")


def _conv_tower(channels: int, norm_layer: Callable[..., nn.Module] | None) -> nn.Sequential:
    """Four 3x3 conv (+ norm) + ReLU blocks, laid out as torchvision's ``Conv2dNormActivation`` (``conv.{i}.0`` is
    the convolution, ``conv.{i}.1`` the norm layer when there is one), so state-dict keys match."""
    tower = nn.Sequential(*[conv_norm_activation(channels, channels, 3, norm_layer=norm_layer) for _ in range(4)])
    for layer in tower.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=0.01)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    return tower


def _upgrade_v1_tower_keys(state_dict: dict, prefix: str) -> None:
    # Version-1 checkpoints (torchvision's original RetinaNet weights) name the tower convolutions conv.0, conv.2,
    # conv.4, conv.6 (a flat Sequential with ReLUs in between); version 2 nests them as conv.{i}.0.
    for i in range(4):
        for kind in ("weight", "bias"):
            old_key = f"{prefix}conv.{2 * i}.{kind}"
            if old_key in state_dict:
                state_dict[f"{prefix}conv.{i}.0.{kind}"] = state_dict.pop(old_key)


class _TowerHead(nn.Module):
    """Base of the two heads: state dicts saved before torchvision's version 2 (plain conv towers) load too."""

    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            _upgrade_v1_tower_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class RetinaNetClassificationHead(_TowerHead):
    """Classification subnet: four 3x3 conv blocks and a 3x3 conv to ``num_anchors * num_classes`` logits, shared by
    all pyramid levels. The logit bias starts at ``-log((1 - p) / p)`` so every anchor starts with probability
    ``prior_probability`` (the focal-loss paper's initialisation).

    ``forward(features)`` maps a list of ``[B, in_channels, H_l, W_l]`` maps to ``Tensor[B, sum_l H_l W_l A,
    num_classes]``.
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, prior_probability: float = 0.01,
                 norm_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        if not 0.0 < prior_probability < 1.0:
            raise ValueError(f"prior_probability must be in (0, 1), got {prior_probability}")
        self.conv = _conv_tower(in_channels, norm_layer)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))
        self.num_classes = num_classes
        self.num_anchors = num_anchors

    def forward(self, features: list[Tensor]) -> Tensor:
        return torch.cat([flatten_level(self.cls_logits(self.conv(f)), self.num_classes) for f in features], dim=1)


class RetinaNetRegressionHead(_TowerHead):
    """Box regression subnet: four 3x3 conv blocks and a 3x3 conv to ``num_anchors * 4`` deltas (weights
    ``(1, 1, 1, 1)``). ``forward(features)`` returns ``Tensor[B, sum_l H_l W_l A, 4]``."""

    def __init__(self, in_channels: int, num_anchors: int, norm_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        self.conv = _conv_tower(in_channels, norm_layer)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        nn.init.normal_(self.bbox_reg.weight, std=0.01)
        nn.init.zeros_(self.bbox_reg.bias)
        self.box_coder = ops.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self._loss_type = "l1"  # torchvision's attribute name; RetinaNet(bbox_loss_type=...) sets it

    def forward(self, features: list[Tensor]) -> Tensor:
        return torch.cat([flatten_level(self.bbox_reg(self.conv(f)), 4) for f in features], dim=1)


class RetinaNetHead(nn.Module):
    """Classification and regression subnets. ``forward(features)`` returns ``{"cls_logits": [B, A_total, K],
    "bbox_regression": [B, A_total, 4]}``; :meth:`compute_loss` turns them and matched anchors into losses."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int,
                 norm_layer: Callable[..., nn.Module] | None = None):
        super().__init__()
        self.classification_head = RetinaNetClassificationHead(in_channels, num_anchors, num_classes,
                                                               norm_layer=norm_layer)
        self.regression_head = RetinaNetRegressionHead(in_channels, num_anchors, norm_layer=norm_layer)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return {"cls_logits": self.classification_head(features),
                "bbox_regression": self.regression_head(features)}

    def compute_loss(self, padded_targets: PaddedTargets, head_outputs: dict[str, Tensor], anchors: Tensor,
                     matched_idxs: Tensor) -> dict[str, Tensor]:
        """Losses of a batch: ``anchors (Tensor[A, 4])`` shared by the batch, ``matched_idxs (Tensor[B, A])`` from
        :func:`match_anchors` (ground-truth index, or -1 background, -2 ignored)."""
        return {
            "classification": retinanet_classification_loss(head_outputs["cls_logits"], padded_targets.labels,
                                                            matched_idxs),
            "bbox_regression": retinanet_box_loss(head_outputs["bbox_regression"], padded_targets.boxes, anchors,
                                                  matched_idxs, self.regression_head._loss_type,
                                                  self.regression_head.box_coder.weights),
        }


def _per_image_foreground(matched_idxs: Tensor) -> tuple[Tensor, Tensor]:
    foreground = matched_idxs >= 0
    return foreground, foreground.sum(dim=1).clamp(min=1)


def retinanet_classification_loss(cls_logits: Tensor, gt_labels: Tensor, matched_idxs: Tensor) -> Tensor:
    """torchvision's RetinaNet classification loss for a batch: per image, the sigmoid focal loss (alpha 0.25,
    gamma 2) summed over all non-ignored anchors and divided by max(1, foreground anchors); then the mean over images.

    Args:
        cls_logits (Tensor[B, A, K]), gt_labels (Tensor[B, G] int64, padded), matched_idxs (Tensor[B, A]).
    """
    foreground, num_foreground = _per_image_foreground(matched_idxs)
    labels = gt_labels.gather(1, matched_idxs.clamp(min=0))
    labels = torch.where(foreground, labels, torch.where(matched_idxs == BETWEEN_THRESHOLDS, _IGNORE_LABEL, -1))
    # The integer-label form never builds the [B, A, K] one-hot targets; ignored anchors contribute nothing.
    loss = ops.sigmoid_focal_loss_with_labels(cls_logits, labels, reduction="none", ignore_index=_IGNORE_LABEL)
    per_image = loss.sum(dim=(1, 2), dtype=torch.float32) / num_foreground
    return per_image.sum() / cls_logits.shape[0]


def retinanet_box_loss(bbox_regression: Tensor, gt_boxes: Tensor, anchors: Tensor, matched_idxs: Tensor,
                       loss_type: str = "l1", weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """torchvision's RetinaNet box loss for a batch: per image, the loss summed over foreground anchors and divided by
    max(1, foreground anchors); then the sum over images divided by max(1, B).

    ``loss_type`` is ``'l1'`` or ``'smooth_l1'`` (beta 1) on encoded deltas, or ``'giou'``, ``'diou'``, ``'ciou'``
    (eps 1e-7) on decoded boxes, as torchvision's ``_box_loss``. All anchors are evaluated and the background ones
    masked out, so shapes never depend on the data; a background anchor is paired with itself (zero delta), which
    keeps every masked term finite.
    """
    if loss_type not in BOX_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {BOX_LOSS_TYPES}, got {loss_type!r}")
    batch, num_anchors = matched_idxs.shape
    foreground, num_foreground = _per_image_foreground(matched_idxs)
    anchors_b = anchors.to(gt_boxes.dtype).expand(batch, num_anchors, 4)
    matched_boxes = gt_boxes.gather(1, matched_idxs.clamp(min=0)[:, :, None].expand(batch, num_anchors, 4))
    matched_boxes = torch.where(foreground[:, :, None], matched_boxes, anchors_b)
    # Low-precision predictions (autocast) are widened: the loss terms are formed and summed in float32.
    flat_pred = bbox_regression.reshape(-1, 4)
    flat_pred = flat_pred if flat_pred.dtype == torch.float64 else flat_pred.float()
    if loss_type in ("l1", "smooth_l1"):
        target = ops.box_encode(matched_boxes.reshape(-1, 4), anchors_b.reshape(-1, 4), weights).to(flat_pred.dtype)
        if loss_type == "l1":
            terms = F.l1_loss(flat_pred, target, reduction="none")
        else:
            terms = ops.smooth_l1_loss(flat_pred, target, beta=1.0)
        terms = terms.sum(dim=1)
    else:
        decoded = ops.box_decode(flat_pred, anchors.to(flat_pred.dtype), weights)
        loss_fn = {"giou": ops.generalized_box_iou_loss, "diou": ops.distance_box_iou_loss,
                   "ciou": ops.complete_box_iou_loss}[loss_type]
        terms = loss_fn(decoded, matched_boxes.reshape(-1, 4).to(decoded.dtype), eps=1e-7)
    terms = terms.reshape(batch, num_anchors)
    per_image = torch.where(foreground, terms, 0).sum(dim=1, dtype=torch.float32) / num_foreground
    return per_image.sum() / max(1, batch)


def retinanet_select_detections(
    cls_logits: Sequence[Tensor],
    bbox_regression: Sequence[Tensor],
    anchors: Sequence[Tensor],
    image_sizes: Tensor,
    score_thresh: float = 0.05,
    topk_candidates: int = 1000,
    nms_thresh: float = 0.5,
    detections_per_img: int = 300,
    nms_method: str = "hard",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """RetinaNet's detection selection for a whole batch, with torchvision's rules and fixed-size outputs.

    Args:
        cls_logits (list of Tensor[B, A_l, K]): per-level class logits.
        bbox_regression (list of Tensor[B, A_l, 4]): per-level box deltas (weights 1, 1, 1, 1).
        anchors (list of Tensor[A_l, 4]): per-level anchors (xyxy), shared by the batch.
        image_sizes (Tensor[B, 2]): ``(height, width)`` of each image before padding; boxes are clipped to it.
        score_thresh, topk_candidates, nms_thresh, detections_per_img: as torchvision's ``RetinaNet``.
        nms_method: ``"hard"``, ``"soft"`` or ``"soft_linear"`` (see :func:`fastdet.ops.multiclass_nms`).

    Returns:
        boxes (Tensor[B, D, 4] float32), scores (Tensor[B, D]), labels (Tensor[B, D] int64), num_detections
        (Tensor[B] int64), with ``D = detections_per_img``; slots past ``num_detections`` hold zeros and label -1.

    Rules (torchvision's, per image): on each level the (anchor, class) pairs with sigmoid score > ``score_thresh``
    are ranked and the best ``topk_candidates`` kept (ties: lower ``anchor * K + class`` first); their boxes are
    decoded and clipped; all levels' pairs then go through class-wise NMS in level order, and the best
    ``detections_per_img`` survivors are returned by decreasing score (ties: earlier level, anchor, class first).

    Per level, ``decode_and_select`` first takes the ``topk_candidates`` anchors with the best top class score: the
    best pairs can only come from those anchors (an anchor outside them has ``topk_candidates`` better-ranked
    anchors, each of which owns a better-ranked pair), so nothing is lost, and only those boxes are decoded.
    Scores are computed in float32 whatever the head's dtype (e.g. under bfloat16 autocast). The threshold is
    compared exactly; torchvision rounds it to float32 first, which differs only for a score equal to that rounding.
    """
    levels = len(cls_logits)
    if not (levels == len(bbox_regression) == len(anchors)) or levels == 0:
        raise ValueError(f"cls_logits, bbox_regression and anchors must hold the same number (>= 1) of levels, got "
                         f"{len(cls_logits)}, {len(bbox_regression)} and {len(anchors)}")
    all_boxes, all_scores = [], []
    for logits_l, deltas_l, anchors_l in zip(cls_logits, bbox_regression, anchors):
        batch, _, num_classes = logits_l.shape
        scores_l = logits_l.float().sigmoid()
        boxes, scores, index, _ = ops.decode_and_select(deltas_l.float(), anchors_l.float(), scores_l, score_thresh,
                                                        topk_candidates, image_sizes)
        boxes, scores, index = order_by_anchor_index(boxes, scores, index)
        # Best topk_candidates (anchor, class) pairs of the level; with slots in anchor order, the flat position
        # slot * K + class orders ties as torchvision's flattened scores do. Failing pairs hold -inf already.
        flat = scores.reshape(batch, -1)
        keep = stable_top_k_mask(flat, topk_candidates) & (flat > float("-inf"))
        all_scores.append(torch.where(keep, flat, float("-inf")).reshape(batch, -1, num_classes))
        all_boxes.append(boxes)
    boxes = torch.cat(all_boxes, dim=1)
    scores = torch.cat(all_scores, dim=1)
    return ops.multiclass_nms(boxes, scores, score_thresh, nms_thresh, detections_per_img,
                              pre_nms_top_k=levels * topk_candidates, method=nms_method)
