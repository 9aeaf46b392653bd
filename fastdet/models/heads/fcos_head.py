"""FCOS's dense head (classification, box-regression and centre-ness branches with torchvision's flat tower
layout), its point-to-box linear box coding, its batched centre-sampling target assignment and its batched,
fixed-size detection selection. See :mod:`fastdet.models.fcos` for the detector."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet import ops
from fastdet.models.postprocess import clip_boxes_to_images, flatten_level, stable_top_k_mask

__all__ = [
    "FCOSClassificationHead",
    "FCOSHead",
    "FCOSRegressionHead",
    "fcos_assign_targets",
    "fcos_select_detections",
    "linear_box_decode",
    "linear_box_encode",
]


# --------------------------------------------------------------------------------------------------------------------
# box coding: distances from the point to the box sides, in units of the point's square (its stride)
# --------------------------------------------------------------------------------------------------------------------


def linear_box_decode(rel_codes: Tensor, anchors: Tensor) -> Tensor:
    """``(l, t, r, b)`` in anchor-size units -> xyxy boxes around the anchors' centres (torchvision's
    ``BoxLinearCoder(normalize_by_size=True).decode``, same float operations). Shapes broadcast: ``[..., 4]``."""
    anchors = anchors.to(rel_codes.dtype)
    ctr_x = 0.5 * (anchors[..., 0] + anchors[..., 2])
    ctr_y = 0.5 * (anchors[..., 1] + anchors[..., 3])
    width = anchors[..., 2] - anchors[..., 0]
    height = anchors[..., 3] - anchors[..., 1]
    rel = rel_codes * torch.stack([width, height, width, height], dim=-1)
    return torch.stack([ctr_x - rel[..., 0], ctr_y - rel[..., 1], ctr_x + rel[..., 2], ctr_y + rel[..., 3]], dim=-1)


def linear_box_encode(anchors: Tensor, boxes: Tensor) -> Tensor:
    """Inverse of :func:`linear_box_decode`: xyxy ``boxes`` -> ``(l, t, r, b)`` from the anchors' centres, divided by
    the anchors' sizes (torchvision's ``BoxLinearCoder.encode(reference_boxes=anchors, proposals=boxes)``)."""
    ctr_x = 0.5 * (anchors[..., 0] + anchors[..., 2])
    ctr_y = 0.5 * (anchors[..., 1] + anchors[..., 3])
    targets = torch.stack([ctr_x - boxes[..., 0], ctr_y - boxes[..., 1], boxes[..., 2] - ctr_x,
                           boxes[..., 3] - ctr_y], dim=-1)
    width = anchors[..., 2] - anchors[..., 0]
    height = anchors[..., 3] - anchors[..., 1]
    return targets / torch.stack([width, height, width, height], dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# heads (torchvision's flat tower layout: conv.{3i} conv, conv.{3i+1} norm, conv.{3i+2} ReLU)
# --------------------------------------------------------------------------------------------------------------------


def _tower(channels: int, num_convs: int, norm_layer) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), norm_layer(channels), nn.ReLU()]
    tower = nn.Sequential(*layers)
    for layer in tower.children():
        if isinstance(layer, nn.Conv2d):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
    return tower


class FCOSClassificationHead(nn.Module):
    """``num_convs`` conv + norm (default GroupNorm(32)) + ReLU blocks, then 3x3 ``cls_logits`` with the focal-loss
    prior bias. ``forward(features)`` -> ``Tensor[B, sum_l H_l W_l A, num_classes]``."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 prior_probability: float = 0.01, norm_layer=None):
        super().__init__()
        if not 0.0 < prior_probability < 1.0:
            raise ValueError(f"prior_probability must be in (0, 1), got {prior_probability}")
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.prior_probability = prior_probability
        self.conv = _tower(in_channels, num_convs, norm_layer or partial(nn.GroupNorm, 32))
        self.cls_logits = self._logits_layer(in_channels, num_classes)

    def _logits_layer(self, in_channels: int, num_classes: int) -> nn.Conv2d:
        layer = nn.Conv2d(in_channels, self.num_anchors * num_classes, 3, padding=1)
        nn.init.normal_(layer.weight, std=0.01)
        nn.init.constant_(layer.bias, -math.log((1 - self.prior_probability) / self.prior_probability))
        return layer

    def forward(self, features: list[Tensor]) -> Tensor:
        return torch.cat([flatten_level(self.cls_logits(self.conv(f)), self.num_classes) for f in features], dim=1)


class FCOSRegressionHead(nn.Module):
    """Shared tower, then ``bbox_reg`` (ReLU'd side distances, 4 per point) and ``bbox_ctrness`` (1 logit per point).
    ``forward(features)`` -> ``(Tensor[B, N, 4], Tensor[B, N, 1])``."""

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 4, norm_layer=None):
        super().__init__()
        self.conv = _tower(in_channels, num_convs, norm_layer or partial(nn.GroupNorm, 32))
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        self.bbox_ctrness = nn.Conv2d(in_channels, num_anchors, 3, padding=1)
        for layer in (self.bbox_reg, self.bbox_ctrness):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        regression, centerness = [], []
        for feature in features:
            tower = self.conv(feature)
            regression.append(flatten_level(F.relu(self.bbox_reg(tower)), 4))
            centerness.append(flatten_level(self.bbox_ctrness(tower), 1))
        return torch.cat(regression, dim=1), torch.cat(centerness, dim=1)


class FCOSHead(nn.Module):
    """``forward(features)`` -> ``{"cls_logits": [B, N, K], "bbox_regression": [B, N, 4], "bbox_ctrness": [B, N, 1]}``;
    :meth:`compute_loss` turns them and assigned points into torchvision's three losses."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4):
        super().__init__()
        self.classification_head = FCOSClassificationHead(in_channels, num_anchors, num_classes, num_convs)
        self.regression_head = FCOSRegressionHead(in_channels, num_anchors, num_convs)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        regression, centerness = self.regression_head(features)
        return {"cls_logits": self.classification_head(features), "bbox_regression": regression,
                "bbox_ctrness": centerness}

    def compute_loss(self, gt_boxes: Tensor, gt_labels: Tensor, head_outputs: dict[str, Tensor], anchors: Tensor,
                     matched_idxs: Tensor) -> dict[str, Tensor]:
        """Losses of a batch: ``gt_boxes [B, G, 4]``, ``gt_labels [B, G]`` (padded), ``anchors [N, 4]`` shared by the
        batch, ``matched_idxs [B, N]`` from :func:`fcos_assign_targets` (-1 = background)."""
        cls_logits = head_outputs["cls_logits"]
        regression = head_outputs["bbox_regression"]
        centerness = head_outputs["bbox_ctrness"].squeeze(-1)
        batch, num_points = matched_idxs.shape
        foreground = matched_idxs >= 0
        normaliser = foreground.sum().clamp(min=1).to(torch.float32)
        index = matched_idxs.clamp(min=0)
        labels = torch.where(foreground, gt_labels.gather(1, index), -1)
        loss_cls = ops.sigmoid_focal_loss_with_labels(cls_logits, labels, reduction="sum")
        anchors_b = anchors.to(regression.dtype).expand(batch, num_points, 4)
        # Background points are paired with their own square: a finite, masked-out term and no NaN in the gradient.
        matched_boxes = gt_boxes.to(regression.dtype).gather(1, index[:, :, None].expand(batch, num_points, 4))
        matched_boxes = torch.where(foreground[:, :, None], matched_boxes, anchors_b)
        predicted = linear_box_decode(regression, anchors_b)
        giou = ops.generalized_box_iou_loss(predicted.reshape(-1, 4), matched_boxes.reshape(-1, 4), eps=1e-7)
        loss_box = torch.where(foreground.reshape(-1), giou, 0).sum()
        sides = linear_box_encode(anchors_b, matched_boxes)
        left_right, top_bottom = sides[..., 0::2], sides[..., 1::2]
        target = torch.sqrt((left_right.amin(-1) / left_right.amax(-1)) * (top_bottom.amin(-1) / top_bottom.amax(-1)))
        target = torch.where(foreground, target, 0.0)
        bce = F.binary_cross_entropy_with_logits(centerness, target.to(centerness.dtype), reduction="none")
        loss_ctr = torch.where(foreground, bce, 0).sum()
        return {"classification": loss_cls / normaliser, "bbox_regression": loss_box / normaliser,
                "bbox_ctrness": loss_ctr / normaliser}


# --------------------------------------------------------------------------------------------------------------------
# training targets (centre sampling), batched
# --------------------------------------------------------------------------------------------------------------------


def fcos_assign_targets(gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor, points_per_level: Sequence[int],
                        center_sampling_radius: float) -> Tensor:
    """torchvision's FCOS point assignment for a whole batch (see the module docstring).

    Args:
        gt_boxes (Tensor[B, G, 4]), gt_valid (Tensor[B, G] bool): padded ground truth.
        anchors (Tensor[N, 4]): every level's point squares, finest level first, shared by the batch.
        points_per_level (list of int): how many of the N belong to each level.
        center_sampling_radius (float): in strides.

    Returns:
        Tensor[B, N] int64: the assigned box index, or -1 (background).
    """
    gt_boxes = gt_boxes.to(anchors.dtype)
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2  # [N, 2]
    sizes = anchors[:, 2] - anchors[:, 0]  # [N]
    gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # [B, G, 2]
    match = (centers[None, :, None, :] - gt_centers[:, None, :, :]).abs().amax(dim=3) \
        < center_sampling_radius * sizes[None, :, None]  # [B, N, G]
    x, y = centers[None, :, None, 0], centers[None, :, None, 1]
    x0, y0, x1, y1 = (gt_boxes[:, None, :, k] for k in range(4))
    distances = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=3)  # [B, N, G, 4]
    match &= distances.amin(dim=3) > 0
    level_first = torch.zeros_like(sizes, dtype=torch.bool)
    level_first[: points_per_level[0]] = True
    level_last = torch.zeros_like(sizes, dtype=torch.bool)
    level_last[sizes.shape[0] - points_per_level[-1]:] = True
    lower = torch.where(level_first, 0.0, sizes * 4)
    upper = torch.where(level_last, float("inf"), sizes * 8)
    largest = distances.amax(dim=3)
    match &= (largest > lower[None, :, None]) & (largest < upper[None, :, None])
    match &= gt_valid[:, None, :]
    areas = (gt_boxes[..., 2] - gt_boxes[..., 0]) * (gt_boxes[..., 3] - gt_boxes[..., 1])  # [B, G]
    # The smallest matching box wins (torchvision's 1e8 - area ranking, same float32 rounding and tie order).
    ranking = match.to(torch.float32) * (1e8 - areas[:, None, :])
    best, matched = ranking.max(dim=2)
    return torch.where(best < 1e-5, -1, matched)


# --------------------------------------------------------------------------------------------------------------------
# detection selection (batched, fixed-size, no host synchronisation)
# --------------------------------------------------------------------------------------------------------------------


def fcos_select_detections(cls_logits: Tensor, bbox_regression: Tensor, bbox_ctrness: Tensor, anchors: Tensor,
                           points_per_level: Sequence[int], image_sizes: Tensor, score_thresh: float = 0.2,
                           topk_candidates: int = 1000, nms_thresh: float = 0.6,
                           detections_per_img: int = 100, nms_method: str = "hard"
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FCOS's detection selection for a whole batch with torchvision's rules (see the module docstring).

    Args:
        cls_logits (Tensor[B, N, K]), bbox_regression (Tensor[B, N, 4]), bbox_ctrness (Tensor[B, N, 1]): the head's
            outputs over all levels; anchors (Tensor[N, 4]): the point squares; points_per_level: how many of the N
            belong to each level (finest first).
        image_sizes (Tensor[B, 2]): ``(height, width)`` before padding; boxes are clipped to it.

    Returns:
        boxes (Tensor[B, D, 4] float32), scores (Tensor[B, D]), labels (Tensor[B, D] int64, class columns),
        num_detections (Tensor[B] int64), ``D = detections_per_img``; padding slots hold zeros and label -1.
    """
    batch, points, num_classes = cls_logits.shape
    if not (bbox_regression.shape[:2] == bbox_ctrness.shape[:2] == (batch, points) and anchors.shape[0] == points
            and sum(points_per_level) == points and len(points_per_level) > 0):
        raise ValueError("cls_logits, bbox_regression, bbox_ctrness and anchors must describe the same points, and "
                         "points_per_level must add up to their number")
    scores = torch.sqrt(torch.sigmoid(cls_logits.float()) * torch.sigmoid(bbox_ctrness.float()))
    scores = torch.where(scores > score_thresh, scores, float("-inf"))
    # The best topk_candidates (point, class) pairs of each level (ties: lower flat index, i.e. point then class).
    keep = torch.cat([stable_top_k_mask(level.reshape(batch, -1), topk_candidates).reshape(level.shape)
                      for level in scores.split(list(points_per_level), dim=1)], dim=1)
    scores = torch.where(keep, scores, float("-inf"))
    # Decoding every point is a few elementwise operations: cheaper than gathering the candidates first.
    boxes = clip_boxes_to_images(linear_box_decode(bbox_regression.float(), anchors.float()[None]), image_sizes)
    return ops.multiclass_nms(boxes, scores, score_thresh, nms_thresh, detections_per_img,
                              pre_nms_top_k=len(points_per_level) * topk_candidates, method=nms_method)
