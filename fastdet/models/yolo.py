"""An anchor-based YOLO detector in the style of YOLOv5: CSP backbone, PAN neck, three output levels.

Architecture (YOLOv5 v6 layout, scaled by a width and a depth multiplier):

* backbone: a 6x6 stride-2 stem, then four stages of (3x3 stride-2 conv, C3 block), and an SPPF block on the last;
  the stage outputs at strides 8, 16 and 32 feed the neck;
* neck: a top-down path (1x1 conv, nearest upsampling, concatenation, C3) followed by a bottom-up path (3x3 stride-2
  conv, concatenation, C3), giving one map per stride;
* head: one 1x1 conv per level predicting, for each of the level's 3 anchor priors, ``(tx, ty, tw, th, objectness,
  class_1 .. class_C)`` as logits.

Box parameterisation (YOLOv5): with the prior centred in its cell at ``(cx, cy)`` (``fastdet.ops.yolo_grid_priors``,
offset 0.5), stride ``s`` and prior size ``(pw, ph)``::

    x = cx + (2 * sigmoid(tx) - 1) * s        # YOLOv5's (2 sigmoid - 0.5 + grid) * s: reaches half a cell beyond
    y = cy + (2 * sigmoid(ty) - 1) * s        #   the cell on each side, so neighbouring cells can predict a box
    w = (2 * sigmoid(tw)) ** 2 * pw           # bounded to (0, 4) x the prior: no exp overflow
    h = (2 * sigmoid(th)) ** 2 * ph

Labels follow the other fastdet detectors (torchvision's convention): ``num_classes`` counts the background, target
labels are ``1 .. num_classes - 1`` and detections carry the same ids. Internally the network has ``num_classes - 1``
sigmoid class outputs and class ``k`` is output ``k - 1``; there is no background output (objectness plays its part).

Training (YOLOv5's loss): every ground-truth box is matched to the priors of every level whose width and height ratios
to the box lie within ``anchor_threshold`` (4 by default), in the cell holding the box centre and in the (up to) two
neighbouring cells nearest to the centre. Each match gets a CIoU box loss and a class BCE; every prior gets an
objectness BCE whose target is the (detached, clamped at 0) CIoU of its matched prediction, 0 for unmatched priors.
The assignment is tensor code over the padded ``[B, G_max]`` targets, with no loop over images, boxes or levels. The
CIoU is computed on boxes expressed in cells around each prior's centre (CIoU is invariant to translation and scale),
which keeps collapsed predictions from rounding to zero-size boxes with NaN gradients.

Anchors decide which priors learn from which objects: fit them to the data's box sizes on every level (what YOLOv5's
autoanchor does). With the default COCO anchors, a dataset of large objects leaves the stride-8 level without matches.

Inference: decode every level, score = sigmoid(objectness) * sigmoid(class), then ``fastdet.ops.multiclass_nms`` on
the whole batch at once (fixed-size output, no host synchronisation); only the final split into per-image dicts reads
the detection counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet.models._validation import check_images_and_targets
from fastdet.models.transform import DetectionTransform, batched_postprocess_boxes
from fastdet.models.weights import plan_build
from fastdet.ops import complete_box_iou_loss, multiclass_nms, yolo_grid_priors

__all__ = [
    "YOLO",
    "YOLOTargets",
    "assign_yolo_targets",
    "decode_yolo_boxes",
    "pad_targets",
    "yolo",
    "yolo_n",
    "yolo_s",
    "yolo_m",
    "yolo_select",
    "YOLO_VARIANTS",
    "YOLOV5_ANCHORS",
]

# (depth_multiple, width_multiple) of YOLOv5's n / s / m models.
YOLO_VARIANTS: dict[str, tuple[float, float]] = {"n": (0.33, 0.25), "s": (0.33, 0.50), "m": (0.67, 0.75)}

# YOLOv5's default anchor sizes (w, h) in pixels for 640-pixel inputs, per level (strides 8, 16, 32).
YOLOV5_ANCHORS: tuple[tuple[tuple[float, float], ...], ...] = (
    ((10, 13), (16, 30), (33, 23)),
    ((30, 61), (62, 45), (59, 119)),
    ((116, 90), (156, 198), (373, 326)),
)

STRIDES = (8, 16, 32)

# YOLOv5's objectness weights per level: the fine level has the most priors and the most small, hard objects.
_OBJECTNESS_BALANCE = (4.0, 1.0, 0.4)

# Offsets (dx, dy) of the cells a ground truth may be assigned to: its own cell, then left, up, right, down.
_CELL_OFFSETS = ((0, 0), (-1, 0), (0, -1), (1, 0), (0, 1))


# --------------------------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------------------------


class ConvBNAct(nn.Module):
    """Conv (no bias) -> BatchNorm -> SiLU, 'same' padding for odd kernels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 padding: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                              kernel_size // 2 if padding is None else padding, bias=False)
        # YOLOv5's BatchNorm settings: a slower running-statistics update than PyTorch's default.
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1x1 conv -> 3x3 conv, with a residual connection when ``shortcut`` and the channel counts agree."""

    def __init__(self, in_channels: int, out_channels: int, shortcut: bool = True, expansion: float = 1.0):
        super().__init__()
        hidden = int(out_channels * expansion)
        self.cv1 = ConvBNAct(in_channels, hidden, 1)
        self.cv2 = ConvBNAct(hidden, out_channels, 3)
        self.add = shortcut and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convs: half the channels go through ``depth`` bottlenecks, the other half bypass them, and
    a 1x1 conv fuses the two."""

    def __init__(self, in_channels: int, out_channels: int, depth: int = 1, shortcut: bool = True):
        super().__init__()
        hidden = out_channels // 2
        self.cv1 = ConvBNAct(in_channels, hidden, 1)
        self.cv2 = ConvBNAct(in_channels, hidden, 1)
        self.cv3 = ConvBNAct(2 * hidden, out_channels, 1)
        self.m = nn.Sequential(*(Bottleneck(hidden, hidden, shortcut) for _ in range(depth)))

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools (receptive fields 5, 9, 13) concatenated."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5):
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = ConvBNAct(in_channels, hidden, 1)
        self.cv2 = ConvBNAct(hidden * 4, out_channels, 1)
        self.pool = nn.MaxPool2d(kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat((x, y1, y2, self.pool(y2)), dim=1))


def _scaled_channels(channels: int, width_multiple: float) -> int:
    # YOLOv5 rounds channel counts up to multiples of 8.
    return max(8, int(math.ceil(channels * width_multiple / 8) * 8))


def _scaled_depth(depth: int, depth_multiple: float) -> int:
    return max(1, round(depth * depth_multiple))


class CSPBackbone(nn.Module):
    """YOLOv5's CSP-Darknet backbone; returns the feature maps at strides 8, 16 and 32."""

    def __init__(self, width_multiple: float, depth_multiple: float, in_channels: int = 3):
        super().__init__()
        c = [_scaled_channels(x, width_multiple) for x in (64, 128, 256, 512, 1024)]
        d = [_scaled_depth(x, depth_multiple) for x in (3, 6, 9, 3)]
        self.stem = ConvBNAct(in_channels, c[0], 6, 2, 2)
        self.stage2 = nn.Sequential(ConvBNAct(c[0], c[1], 3, 2), C3(c[1], c[1], d[0]))
        self.stage3 = nn.Sequential(ConvBNAct(c[1], c[2], 3, 2), C3(c[2], c[2], d[1]))
        self.stage4 = nn.Sequential(ConvBNAct(c[2], c[3], 3, 2), C3(c[3], c[3], d[2]))
        self.stage5 = nn.Sequential(ConvBNAct(c[3], c[4], 3, 2), C3(c[4], c[4], d[3]), SPPF(c[4], c[4]))
        self.out_channels = (c[2], c[3], c[4])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p3 = self.stage3(self.stage2(self.stem(x)))
        p4 = self.stage4(p3)
        return p3, p4, self.stage5(p4)


class PANNeck(nn.Module):
    """YOLOv5's PAN neck: top-down fusion (FPN) then bottom-up fusion; returns maps at strides 8, 16, 32."""

    def __init__(self, in_channels: tuple[int, int, int], depth_multiple: float):
        super().__init__()
        c3, c4, c5 = in_channels
        depth = _scaled_depth(3, depth_multiple)
        self.lateral5 = ConvBNAct(c5, c4, 1)
        self.top_down4 = C3(2 * c4, c4, depth, shortcut=False)
        self.lateral4 = ConvBNAct(c4, c3, 1)
        self.top_down3 = C3(2 * c3, c3, depth, shortcut=False)
        self.down3 = ConvBNAct(c3, c3, 3, 2)
        self.bottom_up4 = C3(2 * c3, c4, depth, shortcut=False)
        self.down4 = ConvBNAct(c4, c4, 3, 2)
        self.bottom_up5 = C3(2 * c4, c5, depth, shortcut=False)
        self.out_channels = (c3, c4, c5)

    def forward(self, features: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        p3, p4, p5 = features
        lat5 = self.lateral5(p5)
        td4 = self.top_down4(torch.cat((F.interpolate(lat5, size=p4.shape[-2:], mode="nearest"), p4), dim=1))
        lat4 = self.lateral4(td4)
        out3 = self.top_down3(torch.cat((F.interpolate(lat4, size=p3.shape[-2:], mode="nearest"), p3), dim=1))
        out4 = self.bottom_up4(torch.cat((self.down3(out3), lat4), dim=1))
        out5 = self.bottom_up5(torch.cat((self.down4(out4), lat5), dim=1))
        return out3, out4, out5


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


# --------------------------------------------------------------------------------------------------------------------
# decoding, target padding, assignment
# --------------------------------------------------------------------------------------------------------------------


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


def pad_targets(boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Stack per-image ``boxes (Tensor[G_i, 4])`` and ``labels (Tensor[G_i])`` into ``[B, G_max, 4]``,
    ``[B, G_max]`` and a ``[B, G_max]`` bool mask of the real entries (padding: box 0, label 0).

    One ``pad_sequence`` per field (no loop over boxes); G_max is 1 when every image is empty, so shapes stay
    non-empty.
    """
    if len(boxes) != len(labels):
        raise ValueError(f"boxes and labels must have one entry per image, got {len(boxes)} and {len(labels)}")
    counts = torch.tensor([b.shape[0] for b in boxes], device=boxes[0].device)
    longest = max(1, max(b.shape[0] for b in boxes))
    # An extra dummy row of the full length makes pad_sequence pad every image to exactly `longest`.
    padded_boxes = nn.utils.rnn.pad_sequence([*boxes, boxes[0].new_zeros(longest, 4)], batch_first=True)[:-1]
    padded_labels = nn.utils.rnn.pad_sequence([*labels, labels[0].new_zeros(longest)], batch_first=True)[:-1]
    mask = torch.arange(longest, device=counts.device)[None, :] < counts[:, None]
    return padded_boxes, padded_labels, mask


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


# Smallest predicted box side in the loss, in cells: keeps every side strictly positive (see _cell_relative_pairs).
_MIN_SIDE_IN_CELLS = 1e-4


def _cell_relative_pairs(box_logits: Tensor, priors: Tensor, prior_strides: Tensor, gt_boxes: Tensor,
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
                score_threshold: float, iou_threshold: float, max_detections: int, pre_nms_top_k: int
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Decode raw predictions and run batched multi-class NMS: fixed-size output, no host synchronisation, so it works
    under ``torch.compile(fullgraph=True)``.

    Args:
        predictions (Tensor[B, N, 5 + C]): head output (logits).
        priors (Tensor[N, 4]): ``(cx, cy, w, h)`` priors; prior_strides (Tensor[N]): their strides.
        image_sizes (Tensor[B, 2]): ``(height, width)`` of each image inside the padded batch (boxes are clipped to
            it).
        score_threshold, iou_threshold, max_detections, pre_nms_top_k: as ``fastdet.ops.multiclass_nms``.

    Returns:
        boxes (Tensor[B, K, 4]) xyxy in network-input pixels, scores (Tensor[B, K]), class output indices
        (Tensor[B, K] int64, -1 in empty slots), num_detections (Tensor[B]).
    """
    predictions = predictions.float()
    boxes = decode_yolo_boxes(predictions[..., :4], priors.float(), prior_strides.float())
    limits = image_sizes.to(boxes)[:, None, [1, 0, 1, 0]]  # (w, h, w, h) per image
    boxes = torch.minimum(boxes.clamp(min=0), limits)
    scores = predictions[..., 4:5].sigmoid() * predictions[..., 5:].sigmoid()
    return multiclass_nms(boxes, scores, score_threshold, iou_threshold, max_detections, pre_nms_top_k)


# --------------------------------------------------------------------------------------------------------------------
# the detector
# --------------------------------------------------------------------------------------------------------------------


class YOLO(nn.Module):
    """Anchor-based YOLOv5-style detector following torchvision's detection contract.

    ``model(images, targets)`` in training mode returns ``{"loss_box", "loss_obj", "loss_cls"}`` (already weighted;
    sum them for the total); ``model(images)`` in eval mode returns one ``{"boxes", "labels", "scores"}`` dict per
    image, boxes xyxy in the original image's pixels.

    Args:
        num_classes (int): number of classes including the background (labels are ``1 .. num_classes - 1``).
        width_multiple, depth_multiple (float): channel and depth scaling of YOLOv5's layout (see ``YOLO_VARIANTS``).
        image_size (int): the longer image side is resized to this (aspect ratio kept; YOLOv5's letterbox with the
            padding at the bottom/right), then the batch is padded to a multiple of 32.
        anchors (3 levels x 3 (w, h) pairs, optional): anchor sizes in pixels of the resized input. Default: YOLOv5's
            640-pixel COCO anchors scaled by ``image_size / 640`` (objects shrink with the image); datasets whose
            objects are not COCO-sized train much faster with anchors fitted to their boxes.
        anchor_threshold (float): largest side ratio between a ground-truth box and an anchor it is assigned to.
        box_loss_gain, obj_loss_gain, cls_loss_gain (float): YOLOv5's loss weights 0.05, 1.0, 0.5; as YOLOv5 does,
            the objectness weight is scaled by ``(image_size / 640) ** 2`` (fewer cells, larger per-cell mean) and the
            class weight by ``C / 80`` (the class BCE is a mean over C outputs).
        score_threshold (float): detections need ``objectness * class`` probability above this.
        nms_threshold (float): IoU threshold of the per-class NMS.
        detections_per_image (int): output slots per image.
        pre_nms_top_k (int): best candidates per image (over all classes) entering NMS.
        image_mean, image_std: normalisation; the default (0, 1) keeps YOLOv5's plain 0..1 input.
    """

    def __init__(self, num_classes: int, *, width_multiple: float = 0.5, depth_multiple: float = 0.33,
                 image_size: int = 640, anchors=None, anchor_threshold: float = 4.0,
                 box_loss_gain: float = 0.05, obj_loss_gain: float = 1.0, cls_loss_gain: float = 0.5,
                 score_threshold: float = 0.001, nms_threshold: float = 0.6, detections_per_image: int = 100,
                 pre_nms_top_k: int = 1000, image_mean: Sequence[float] = (0.0, 0.0, 0.0),
                 image_std: Sequence[float] = (1.0, 1.0, 1.0)):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (it counts the background), got {num_classes!r}")
        for name, value in (("width_multiple", width_multiple), ("depth_multiple", depth_multiple),
                            ("anchor_threshold", anchor_threshold)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"image_size must be an int >= 32, got {image_size!r}")
        for name, value in (("detections_per_image", detections_per_image), ("pre_nms_top_k", pre_nms_top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= float(nms_threshold) <= 1.0:
            raise ValueError(f"nms_threshold must lie in [0, 1], got {nms_threshold!r}")

        self.num_classes = num_classes
        self.num_outputs = num_classes - 1  # class outputs; no background output
        self.image_size = image_size
        if anchors is None:
            scale = self.image_size / 640
            anchors = [[(w * scale, h * scale) for w, h in level] for level in YOLOV5_ANCHORS]
        anchors = torch.as_tensor(anchors, dtype=torch.float32)
        if anchors.dim() != 3 or anchors.shape[0] != len(STRIDES) or anchors.shape[2] != 2:
            raise ValueError(f"anchors must be {len(STRIDES)} levels of (w, h) pairs, got shape {tuple(anchors.shape)}")
        if not (torch.isfinite(anchors).all() and (anchors > 0).all()):
            raise ValueError("anchors must hold finite positive sizes")
        # The buffer travels with the state dict; a plain copy feeds yolo_grid_priors (which takes Python sizes)
        # without reading the device, and is refreshed whenever a state dict is loaded.
        self.register_buffer("anchors", anchors)
        self._anchor_sizes = anchors.tolist()
        self.register_load_state_dict_post_hook(_refresh_anchor_sizes)
        self.anchor_threshold = float(anchor_threshold)
        self.box_loss_gain = float(box_loss_gain)
        self.obj_loss_gain = float(obj_loss_gain) * (self.image_size / 640) ** 2
        self.cls_loss_gain = float(cls_loss_gain) * self.num_outputs / 80
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.detections_per_image = detections_per_image
        self.pre_nms_top_k = pre_nms_top_k
        self.width_multiple = float(width_multiple)
        self.depth_multiple = float(depth_multiple)

        self.transform = DetectionTransform(min_size=image_size, max_size=image_size, image_mean=image_mean,
                                            image_std=image_std, size_divisible=STRIDES[-1])
        self.backbone = CSPBackbone(width_multiple, depth_multiple)
        self.neck = PANNeck(self.backbone.out_channels, depth_multiple)
        self.head = YOLOHead(self.neck.out_channels, anchors.shape[1], 5 + self.num_outputs)
        self.head.initialise_biases(self.image_size, self.num_outputs)

    # -- pieces ------------------------------------------------------------------------------------------------------

    def priors(self, grid_sizes: Sequence[tuple[int, int]], device: torch.device) -> tuple[Tensor, Tensor]:
        """``(cx, cy, w, h)`` priors of all levels ``[N, 4]`` (float32) and the stride of each ``[N]``."""
        priors = yolo_grid_priors(grid_sizes, STRIDES, self._anchor_sizes, fmt="cxcywh", dtype=torch.float32,
                                  device=device)
        num_anchors = self.anchors.shape[1]
        prior_strides = torch.cat([torch.full((h * w * num_anchors,), float(s), device=device)
                                   for (h, w), s in zip(grid_sizes, STRIDES)])
        return priors, prior_strides

    def compute_loss(self, predictions: Tensor, grid_sizes: Sequence[tuple[int, int]],
                     targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """YOLOv5's loss of raw ``predictions (Tensor[B, N, 5 + C])`` against targets in network-input pixels."""
        predictions = predictions.float()
        batch, num_priors, _ = predictions.shape
        device = predictions.device
        priors, prior_strides = self.priors(grid_sizes, device)
        gt_boxes, gt_labels, gt_mask = pad_targets([t["boxes"].float() for t in targets],
                                                   [t["labels"] for t in targets])
        assigned = assign_yolo_targets(gt_boxes, gt_labels - 1, gt_mask, grid_sizes, STRIDES, self.anchors,
                                       self.anchor_threshold)
        valid = assigned.valid
        index = assigned.prior_index
        picked = predictions.gather(1, index[..., None].expand(-1, -1, predictions.shape[-1]))  # [B, M, 5 + C]
        pred_boxes, target_boxes = _cell_relative_pairs(picked[..., :4], priors[index], prior_strides[index],
                                                        assigned.boxes.float(), valid)
        ciou_loss = complete_box_iou_loss(pred_boxes, target_boxes)  # [B, M]
        # YOLOv5 averages the box and class losses over the matches of each level, then sums the levels.
        num_levels = len(grid_sizes)
        weight = valid.float()
        by_level = (batch, gt_boxes.shape[1], num_levels, -1)  # candidates are laid out [B, G, L, A * 5]
        matches_per_level = weight.view(by_level).sum(dim=(0, 1, 3))  # [L]
        level_norm = torch.where(matches_per_level > 0, 1 / matches_per_level.clamp(min=1), 0)
        loss_box = ((ciou_loss * weight).view(by_level).sum(dim=(0, 1, 3)) * level_norm).sum()

        # Objectness target: the CIoU of the prior's prediction with its ground truth; when several boxes claim one
        # prior, the largest wins (a deterministic scatter, unlike an indexed assignment).
        quality = ((1 - ciou_loss).detach().clamp(min=0) * weight).reshape(-1)
        flat_index = (index + torch.arange(batch, device=device)[:, None] * num_priors).reshape(-1)
        obj_target = predictions.new_zeros(batch * num_priors).scatter_reduce(
            0, flat_index, quality, reduce="amax", include_self=True).view(batch, num_priors)
        obj_bce = F.binary_cross_entropy_with_logits(predictions[..., 4], obj_target, reduction="none")
        loss_obj = (obj_bce * self._objectness_weights(grid_sizes, device)).sum() / batch

        # Class BCE: a mean over the C outputs of every match, per level as for the box loss.
        num_outputs = self.num_outputs
        cls_target = F.one_hot(assigned.labels.clamp(0, num_outputs - 1), num_outputs).float()
        cls_bce = F.binary_cross_entropy_with_logits(picked[..., 5:], cls_target, reduction="none").mean(-1)
        loss_cls = ((cls_bce * weight).view(by_level).sum(dim=(0, 1, 3)) * level_norm).sum()
        return {
            "loss_box": loss_box * self.box_loss_gain,
            "loss_obj": loss_obj * self.obj_loss_gain,
            "loss_cls": loss_cls * self.cls_loss_gain,
        }

    def _objectness_weights(self, grid_sizes: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
        """Per-prior weight ``balance_l / (priors in level l)``: summing BCE * weight gives YOLOv5's sum over levels of
        ``balance_l * mean(BCE over the level)`` for one image."""
        num_anchors = self.anchors.shape[1]
        return torch.cat([torch.full((h * w * num_anchors,), balance / max(h * w * num_anchors, 1), device=device)
                          for (h, w), balance in zip(grid_sizes, _OBJECTNESS_BALANCE)])

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        check_images_and_targets(images, targets, self.training, self.num_classes, min_label=1)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)
        features = self.neck(self.backbone(batch.tensors))
        grid_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        predictions = self.head(features)
        if self.training:
            return self.compute_loss(predictions, grid_sizes, targets)
        return self.postprocess(predictions, grid_sizes, batch.image_sizes, original_sizes)

    @torch.no_grad()
    def postprocess(self, predictions: Tensor, grid_sizes: Sequence[tuple[int, int]],
                    image_sizes: Sequence[tuple[int, int]], original_sizes: Sequence[tuple[int, int]]
                    ) -> list[dict[str, Tensor]]:
        priors, prior_strides = self.priors(grid_sizes, predictions.device)
        sizes = torch.tensor(image_sizes, dtype=torch.float32, device=predictions.device)
        boxes, scores, labels, counts = yolo_select(predictions, priors, prior_strides, sizes, self.score_threshold,
                                                    self.nms_threshold, self.detections_per_image, self.pre_nms_top_k)
        boxes = batched_postprocess_boxes(boxes, image_sizes, original_sizes)
        # The one host read of the whole inference: how many slots of each image are real.
        return [{"boxes": b[:n], "labels": l[:n] + 1, "scores": s[:n]}
                for b, l, s, n in zip(boxes, labels, scores, counts.tolist())]


def _refresh_anchor_sizes(module: YOLO, incompatible_keys) -> None:
    module._anchor_sizes = module.anchors.tolist()


_YOLO_STAGES = ("stage5", "stage4", "stage3", "stage2", "stem")


def yolo(*, weights=None, progress: bool = True, num_classes: int | None = None, weights_backbone=None,
         trainable_backbone_layers: int | None = None, variant: str = "s", **kwargs) -> YOLO:
    """Build a YOLO detector of the given ``variant`` (``"n"``, ``"s"`` or ``"m"``: YOLOv5's width/depth multipliers)
    with the builders' common signature (see :mod:`fastdet.models.weights`). There are no published weights:
    ``weights`` and ``weights_backbone`` (the CSP backbone's ``backbone.*`` part) take a ``.pth`` path or a state
    dict. ``num_classes`` counts the background (default 91). ``trainable_backbone_layers`` (0-5) counts backbone
    stages from ``stage5`` down to the stem: default 3 with backbone weights, 5 otherwise. Other keyword arguments go
    to :class:`YOLO` (explicit ``width_multiple``/``depth_multiple`` override the variant's)."""
    if variant not in YOLO_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(YOLO_VARIANTS)}, got {variant!r}")
    plan = plan_build(None, None, weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
                      trainable_backbone_layers=trainable_backbone_layers, max_trainable_layers=len(_YOLO_STAGES),
                      default_trainable_layers=3, progress=progress)
    depth, width = YOLO_VARIANTS[variant]
    kwargs.setdefault("width_multiple", width)
    kwargs.setdefault("depth_multiple", depth)
    model = YOLO(plan.num_classes, **kwargs)
    backbone_weights = plan.backbone_state_dict(progress)
    if backbone_weights is not None:
        prefix = "backbone."
        if any(k.startswith(prefix) for k in backbone_weights):  # a whole detector's state dict: take its backbone
            backbone_weights = {k[len(prefix):]: v for k, v in backbone_weights.items() if k.startswith(prefix)}
        model.backbone.load_state_dict(backbone_weights)
    frozen = _YOLO_STAGES[plan.trainable_backbone_layers:]
    for name in frozen:
        getattr(model.backbone, name).requires_grad_(False)
    return plan.load_into(model, progress)


def yolo_n(**kwargs) -> YOLO:
    """YOLOv5n-sized detector (width 0.25, depth 0.33); arguments as :func:`yolo`."""
    return yolo(variant="n", **kwargs)


def yolo_s(**kwargs) -> YOLO:
    """YOLOv5s-sized detector (width 0.50, depth 0.33); arguments as :func:`yolo`."""
    return yolo(variant="s", **kwargs)


def yolo_m(**kwargs) -> YOLO:
    """YOLOv5m-sized detector (width 0.75, depth 0.67); arguments as :func:`yolo`."""
    return yolo(variant="m", **kwargs)
