"""YOLOv5's dense head: per-level 1x1 prediction convs, box decoding, batched target assignment to the grid priors
(with the cell-relative box pairs its CIoU loss uses) and batched detection selection. See
:mod:`fastdet.models.yolo` for the parameterisation and the loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastdet.ops import multiclass_nms

__all__ = ["STRIDES", "YOLOHead", "YOLOTargets", "assign_yolo_targets", "cell_relative_pairs", "decode_yolo_boxes",
           "yolo_select"]


STRIDES = (8, 16, 32)


# Offsets (dx, dy) of the cells a ground truth may be assigned to: its own cell, then left, up, right, down.
_CELL_OFFSETS = ((0, 0), (-1, 0), (0, -1), (1, 0), (0, 1))


class YOLOHead(nn.Module):
    """One 1x1 conv per level; returns all levels' raw predictions as ``Tensor[B, N, 5 + C]`` in the prior order of
    ``yolo_grid_priors`` (level, then row, column, then anchor)."""

    def __init__(self, in_channels: Sequence[int], num_anchors: int, num_outputs: int):
        super().__init__()
        self.num_anchors = num_anchors
        self.num_outputs = num_outputs
        self.convs = nn.ModuleList(nn.Conv2d(c, num_anchors * num_outputs, 1) for c in in_channels)

    def initialise_biases(self, image_size: int, num_classes: int) -> None:
        """YOLOv5's prior on the output biases: about 8 objects per ``image_size``-pixel image at every level, and a
        class probability of about 0.6 / C, so the first steps are not dominated by the many background priors."""
        for conv, stride in zip(self.convs, STRIDES):
            bias = conv.bias.detach().view(self.num_anchors, self.num_outputs)
            bias[:, 4] += math.log(8 / (image_size / stride) ** 2)
            bias[:, 5:] += math.log(0.6 / max(num_classes - 0.99, 1e-2))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        outputs = []
        for conv, feature in zip(self.convs, features):
            y = conv(feature)
            b, _, h, w = y.shape
            # [B, A * (5 + C), H, W] -> [B, H, W, A, 5 + C] -> [B, H * W * A, 5 + C]
            y = y.view(b, self.num_anchors, self.num_outputs, h, w).permute(0, 3, 4, 1, 2)
            outputs.append(y.reshape(b, h * w * self.num_anchors, self.num_outputs))
        return torch.cat(outputs, dim=1)


def decode_yolo_boxes(box_logits: Tensor, priors: Tensor, prior_strides: Tensor) -> Tensor:
    """Decode YOLOv5 box logits into ``(x1, y1, x2, y2)`` pixels.

    Args:
        box_logits (Tensor[..., 4]): ``(tx, ty, tw, th)`` logits.
        priors (Tensor[..., 4]): ``(cx, cy, w, h)`` priors (broadcast against ``box_logits``), centred in their cells.
        prior_strides (Tensor[...]): the stride of each prior's level in pixels.

    Returns:
        Tensor[..., 4] of the logits' dtype promoted with the priors'.
    """
    t = box_logits.sigmoid() * 2
    centre = priors[..., :2] + (t[..., :2] - 1) * prior_strides.unsqueeze(-1)
    size = t[..., 2:].square() * priors[..., 2:]
    return torch.cat((centre - size / 2, centre + size / 2), dim=-1)


@dataclass
class YOLOTargets:
    """Assignment of padded ground truth to priors: one candidate per (image, box, level, anchor, cell offset),
    flattened to ``M = G_max * L * A * 5`` per image.

    Attributes:
        prior_index (Tensor[B, M] int64): index of the candidate's prior in the flat prior list.
        valid (Tensor[B, M] bool): whether the candidate is a real match (real box, shape ratio within the threshold,
            an allowed neighbour cell).
        boxes (Tensor[B, M, 4]): the ground-truth box (xyxy pixels) of each candidate.
        labels (Tensor[B, M] int64): the ground-truth class output index of each candidate.
    """

    prior_index: Tensor
    valid: Tensor
    boxes: Tensor
    labels: Tensor


def assign_yolo_targets(gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor, grid_sizes: Sequence[tuple[int, int]],
                        strides: Sequence[float], anchors: Tensor, anchor_threshold: float = 4.0) -> YOLOTargets:
    """YOLOv5's target assignment for a whole batch at once.

    A ground-truth box with centre ``(gx, gy)`` in grid units of level ``l`` is matched to anchor ``a`` of that level
    when ``max(w / a_w, a_w / w, h / a_h, a_h / h) < anchor_threshold``, at the cell containing its centre and at
    the horizontal and the vertical neighbour nearest to the centre (left if ``gx mod 1 < 0.5`` and ``gx > 1``,
    right if ``(W - gx) mod 1 < 0.5`` and ``W - gx > 1``; the same for up/down), so up to 3 cells per anchor.

    Args:
        gt_boxes (Tensor[B, G, 4]): ground truth, xyxy pixels of the network input.
        gt_labels (Tensor[B, G]): class output index of each box.
        gt_mask (Tensor[B, G] bool): which entries are real.
        grid_sizes (list of (H_l, W_l)): feature-grid sizes of the levels.
        strides (list of float): stride of each level.
        anchors (Tensor[L, A, 2]): anchor (w, h) in pixels per level.
        anchor_threshold (float): largest allowed side ratio between a box and an anchor.

    Returns:
        :class:`YOLOTargets`; the prior index is ``offset_l + (y * W_l + x) * A + a`` (``yolo_grid_priors`` order).
    """
    device = gt_boxes.device
    num_levels, num_anchors = anchors.shape[0], anchors.shape[1]
    if len(grid_sizes) != num_levels or len(strides) != num_levels:
        raise ValueError(f"grid_sizes ({len(grid_sizes)}) and strides ({len(strides)}) must give one entry per "
                         f"anchor level ({num_levels})")
    batch, num_gt = gt_mask.shape
    boxes = gt_boxes.float()
    anchors = anchors.to(device=device, dtype=torch.float32)
    stride = torch.tensor([float(s) for s in strides], device=device)  # [L]
    grid_wh = torch.tensor([[float(w), float(h)] for h, w in grid_sizes], device=device)  # [L, 2]
    counts = [h * w * num_anchors for h, w in grid_sizes]
    level_offset = torch.tensor([sum(counts[:i]) for i in range(num_levels)], device=device)  # [L]
    grid_w = grid_wh[:, 0].long()

    centre = (boxes[..., :2] + boxes[..., 2:]) / 2  # [B, G, 2]
    size = boxes[..., 2:] - boxes[..., :2]
    grid_xy = centre[:, :, None, :] / stride[None, None, :, None]  # [B, G, L, 2] in cells
    inverse_xy = grid_wh - grid_xy  # distance to the far edge, in cells

    # Shape match: [B, G, L, A]; padded boxes have size 0, ratio inf, and are masked anyway.
    ratio = size[:, :, None, None, :] / anchors[None, None]
    shape_match = torch.maximum(ratio, 1 / ratio).amax(dim=-1) < anchor_threshold

    near = (grid_xy % 1 < 0.5) & (grid_xy > 1)  # left / up neighbour allowed, [B, G, L, 2]
    far = (inverse_xy % 1 < 0.5) & (inverse_xy > 1)  # right / down neighbour allowed
    own = torch.ones_like(near[..., 0])
    use_cell = torch.stack((own, near[..., 0], near[..., 1], far[..., 0], far[..., 1]), dim=-1)  # [B, G, L, 5]

    offsets = torch.tensor(_CELL_OFFSETS, device=device, dtype=torch.float32)  # [5, 2]
    cell = grid_xy.floor()[..., None, :] + offsets  # [B, G, L, 5, 2]
    cell = torch.minimum(cell.clamp(min=0), (grid_wh - 1)[:, None, :]).long()
    cell_index = cell[..., 1] * grid_w[:, None] + cell[..., 0]  # [B, G, L, 5]

    anchor_ids = torch.arange(num_anchors, device=device)
    # [B, G, L, A, 5]
    prior_index = (level_offset[:, None, None] + cell_index[:, :, :, None, :] * num_anchors
                   + anchor_ids[None, :, None])
    valid = gt_mask[:, :, None, None, None] & shape_match[..., None] & use_cell[:, :, :, None, :]
    per_candidate = num_levels * num_anchors * len(_CELL_OFFSETS)
    cand_boxes = gt_boxes[:, :, None, :].expand(batch, num_gt, per_candidate, 4)
    cand_labels = gt_labels[:, :, None].expand(batch, num_gt, per_candidate)
    return YOLOTargets(
        prior_index=prior_index.reshape(batch, -1),
        valid=valid.reshape(batch, -1),
        boxes=cand_boxes.reshape(batch, -1, 4),
        labels=cand_labels.reshape(batch, -1).long(),
    )


# Smallest predicted box side in the loss, in cells: keeps every side strictly positive (see cell_relative_pairs).
_MIN_SIDE_IN_CELLS = 1e-4


def cell_relative_pairs(box_logits: Tensor, priors: Tensor, prior_strides: Tensor, gt_boxes: Tensor,
                         valid: Tensor) -> tuple[Tensor, Tensor]:
    """Predicted and target boxes of the assignment candidates, xyxy in units of the prior's stride around the
    prior's centre, ready for the CIoU loss (which is invariant to that translation and scaling).

    Why not pixels: a prediction whose size logit has drifted far negative has a side far below one float32 ulp of
    its pixel coordinate (~1e-5 at 100 px), so ``y2 - y1`` rounds to 0 and the CIoU gradient (through ``atan(w/h)``)
    is NaN. Around the prior centre the coordinates are O(1), and sides are floored at 1e-4 cells, so every side stays
    positive. Candidates that are not real matches get the prior's own box as both prediction and target, so their
    (masked) loss term and its gradient are finite whatever the network predicts there (0 * NaN would be NaN).
    """
    t = box_logits.sigmoid() * 2
    prior_size = priors[..., 2:] / prior_strides.unsqueeze(-1)  # cells
    centre = t[..., :2] - 1
    size = t[..., 2:].square() * prior_size + _MIN_SIDE_IN_CELLS
    pred = torch.cat((centre - size / 2, centre + size / 2), dim=-1)
    stride = prior_strides.unsqueeze(-1)
    gt = torch.cat(((gt_boxes[..., :2] - priors[..., :2]) / stride, (gt_boxes[..., 2:] - priors[..., :2]) / stride),
                   dim=-1)
    prior_box = torch.cat((-prior_size / 2, prior_size / 2), dim=-1)
    valid = valid.unsqueeze(-1)
    return torch.where(valid, pred, prior_box), torch.where(valid, gt, prior_box)


def yolo_select(predictions: Tensor, priors: Tensor, prior_strides: Tensor, image_sizes: Tensor,
                score_threshold: float, iou_threshold: float, max_detections: int, pre_nms_top_k: int,
                nms_method: str = "hard") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decode raw predictions and run batched multi-class NMS: fixed-size output, no host synchronisation, so it works
    under ``torch.compile(fullgraph=True)``.

    Args:
        predictions (Tensor[B, N, 5 + C]): head output (logits).
        priors (Tensor[N, 4]): ``(cx, cy, w, h)`` priors; prior_strides (Tensor[N]): their strides.
        image_sizes (Tensor[B, 2]): ``(height, width)`` of each image inside the padded batch (boxes are clipped to
            it).
        score_threshold, iou_threshold, max_detections, pre_nms_top_k: as ``fastdet.ops.multiclass_nms``.
        nms_method (str): ``multiclass_nms``' ``method`` (``"hard"``, ``"soft"``, ``"soft_linear"``).

    Returns:
        boxes (Tensor[B, K, 4]) xyxy in network-input pixels, scores (Tensor[B, K]), class output indices
        (Tensor[B, K] int64, -1 in empty slots), num_detections (Tensor[B]).
    """
    predictions = predictions.float()
    boxes = decode_yolo_boxes(predictions[..., :4], priors.float(), prior_strides.float())
    limits = image_sizes.to(boxes)[:, None, [1, 0, 1, 0]]  # (w, h, w, h) per image
    boxes = torch.minimum(boxes.clamp(min=0), limits)
    scores = predictions[..., 4:5].sigmoid() * predictions[..., 5:].sigmoid()
    return multiclass_nms(boxes, scores, score_threshold, iou_threshold, max_detections, pre_nms_top_k,
                          method=nms_method)
