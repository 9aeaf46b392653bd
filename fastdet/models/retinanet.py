"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection"), built on ``fastdet.ops`` only.

The model follows torchvision's detection contract and module layout, so a torchvision ``RetinaNet`` state dict loads
unchanged into the fastdet model of the same architecture and gives the same detections:

* ``model(images, targets)`` with ``images`` a list of float ``Tensor[C, H, W]`` in ``[0, 1]`` (any sizes) and, in
  training, ``targets`` a list of ``{"boxes": Tensor[N, 4] (xyxy pixels), "labels": Tensor[N] int64}``;
* training returns ``{"classification", "bbox_regression"}`` losses, evaluation a list of
  ``{"boxes", "labels", "scores"}`` in original-image pixels.

What differs from torchvision is how the work is laid out, not what is computed:

* Training targets are matched for the whole batch at once: ground-truth boxes are padded to ``[B, G, 4]`` and one
  IoU tensor ``[B, G, A]`` is matched with torchvision's ``Matcher`` rules (including low-quality matches). Losses
  are formed over all anchors with masks, so nothing depends on data-dependent shapes.
* Detection selection is one batched function (:func:`retinanet_select_detections`) with fixed-size outputs and no
  host synchronisation; only the final split into per-image dicts reads the detection counts.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet import ops
from fastdet.models._validation import check_images_and_targets
from fastdet.models.layers import conv_norm_activation
from fastdet.models.transform import DetectionTransform, ImageBatch, batched_postprocess_boxes
from fastdet.models.weights import plan_build

__all__ = [
    "RetinaNet",
    "RetinaNetClassificationHead",
    "RetinaNetHead",
    "RetinaNetRegressionHead",
    "retinanet_resnet18_fpn",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "retinanet_select_detections",
]

BELOW_LOW_THRESHOLD = -1  # matcher code: background anchor
BETWEEN_THRESHOLDS = -2  # matcher code: anchor ignored by the classification loss
_IGNORE_LABEL = -100  # sigmoid_focal_loss_with_labels' ignore_index
_BOX_LOSSES = ("l1", "smooth_l1", "giou", "diou", "ciou")


# --------------------------------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------------------------------


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


def _flatten_level(output: Tensor, columns: int) -> Tensor:
    # [B, A * K, H, W] -> [B, H * W * A, K]: anchors ordered by row, column, then anchor shape, as the anchors are.
    batch, _, height, width = output.shape
    return output.view(batch, -1, columns, height, width).permute(0, 3, 4, 1, 2).reshape(batch, -1, columns)


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
        return torch.cat([_flatten_level(self.cls_logits(self.conv(f)), self.num_classes) for f in features], dim=1)


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
        return torch.cat([_flatten_level(self.bbox_reg(self.conv(f)), 4) for f in features], dim=1)


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

    def compute_loss(self, padded_targets: "PaddedTargets", head_outputs: dict[str, Tensor], anchors: Tensor,
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


# --------------------------------------------------------------------------------------------------------------------
# target matching (vectorised over the batch)
# --------------------------------------------------------------------------------------------------------------------


class PaddedTargets:
    """Per-image targets padded to a common length G (the batch's largest box count).

    Attributes:
        boxes (Tensor[B, G, 4]): xyxy; padding rows are zeros. G >= 1 (one padding row when no image has boxes).
        labels (Tensor[B, G] int64): padding rows are -1.
        valid (Tensor[B, G] bool): which rows are real boxes.
    """

    def __init__(self, boxes: Tensor, labels: Tensor, valid: Tensor):
        self.boxes, self.labels, self.valid = boxes, labels, valid

    @classmethod
    def from_list(cls, targets: Sequence[dict[str, Tensor]], dtype: torch.dtype, device) -> "PaddedTargets":
        counts = [int(t["boxes"].shape[0]) for t in targets]  # shapes only: no device read
        # At least one (padding) row, so that gathers by matched index stay valid when no image has a box.
        length = max(1, max(counts))
        boxes = torch.zeros(len(counts), length, 4, dtype=dtype)
        labels = torch.full((len(counts), length), -1, dtype=torch.int64)
        if max(counts) > 0:
            boxes = nn.utils.rnn.pad_sequence([t["boxes"].to(dtype) for t in targets], batch_first=True)
            labels = nn.utils.rnn.pad_sequence([t["labels"].long() for t in targets], batch_first=True,
                                               padding_value=-1)
        valid = torch.arange(length).expand(len(counts), length) < torch.tensor(counts)[:, None]
        return cls(boxes.to(device).reshape(len(counts), length, 4), labels.to(device).reshape(len(counts), length),
                   valid.to(device))


def match_anchors(gt_boxes: Tensor, gt_valid: Tensor, anchors: Tensor, high_threshold: float, low_threshold: float,
                  allow_low_quality_matches: bool) -> Tensor:
    """torchvision's ``Matcher`` for a whole batch.

    Args:
        gt_boxes (Tensor[B, G, 4]), gt_valid (Tensor[B, G] bool): padded ground truth (see :class:`PaddedTargets`).
        anchors (Tensor[A, 4]): anchors shared by the batch.
        high_threshold, low_threshold (float): IoU >= high is a match; [low, high) is ignored (-2); below low is
            background (-1).
        allow_low_quality_matches (bool): every anchor that attains some ground-truth box's highest IoU (ties
            included) is matched to its best box even below ``high_threshold``.

    Returns:
        Tensor[B, A] int64: the matched ground-truth index, or -1 (background) / -2 (between thresholds).
        Images without boxes get -1 everywhere.
    """
    batch, num_gt = gt_boxes.shape[:2]
    num_anchors = anchors.shape[0]
    if num_gt == 0:
        return torch.full((batch, num_anchors), BELOW_LOW_THRESHOLD, dtype=torch.int64, device=anchors.device)
    iou = ops.box_iou(gt_boxes.to(anchors.dtype), anchors)  # [B, G, A]
    # Padding rows get IoU -1, below any real IoU, so they never win the arg-max and never count as a best match.
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)
    best_iou, matches = iou.max(dim=1)  # [B, A]
    best_gt = matches
    matches = torch.where(best_iou < low_threshold, BELOW_LOW_THRESHOLD,
                          torch.where(best_iou < high_threshold, BETWEEN_THRESHOLDS, matches))
    if allow_low_quality_matches:
        highest_per_gt = iou.amax(dim=2, keepdim=True)  # [B, G, 1]
        attains_highest = ((iou == highest_per_gt) & gt_valid[:, :, None]).any(dim=1)  # [B, A]
        matches = torch.where(attains_highest, best_gt, matches)
    return matches


# --------------------------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------------------------


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
    if loss_type not in _BOX_LOSSES:
        raise ValueError(f"loss_type must be one of {_BOX_LOSSES}, got {loss_type!r}")
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


# --------------------------------------------------------------------------------------------------------------------
# detection selection (batched, fixed-size, no host synchronisation)
# --------------------------------------------------------------------------------------------------------------------


def _stable_top_k_mask(values: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest entries of each row of ``values (Tensor[R, M])``, ties taken by increasing index
    (the first k of a stable descending sort). Exact without a full sort: everything above the k-th largest value,
    plus the lowest-indexed entries equal to it until k are taken."""
    take = min(k, values.shape[1])
    if take == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    kth = values.topk(take, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = values > kth
    equal = values == kth
    need = take - above.sum(dim=1, keepdim=True)
    return above | (equal & (equal.cumsum(dim=1) <= need))


def _order_by_anchor_index(boxes: Tensor, scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reorder ``decode_and_select``'s candidate slots (best score first) by anchor index, padding slots last, so that
    slot order is anchor order: the tie order torchvision's flattened (anchor, class) scores have."""
    key = torch.where(index >= 0, index, torch.iinfo(torch.int64).max)
    order = key.argsort(dim=1, stable=True)
    boxes = boxes.gather(1, order[:, :, None].expand_as(boxes))
    scores = scores.gather(1, order[:, :, None].expand_as(scores))
    return boxes, scores, index.gather(1, order)


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
        boxes, scores, index = _order_by_anchor_index(boxes, scores, index)
        # Best topk_candidates (anchor, class) pairs of the level; with slots in anchor order, the flat position
        # slot * K + class orders ties as torchvision's flattened scores do. Failing pairs hold -inf already.
        flat = scores.reshape(batch, -1)
        keep = _stable_top_k_mask(flat, topk_candidates) & (flat > float("-inf"))
        all_scores.append(torch.where(keep, flat, float("-inf")).reshape(batch, -1, num_classes))
        all_boxes.append(boxes)
    boxes = torch.cat(all_boxes, dim=1)
    scores = torch.cat(all_scores, dim=1)
    return ops.multiclass_nms(boxes, scores, score_thresh, nms_thresh, detections_per_img,
                              pre_nms_top_k=levels * topk_candidates, method=nms_method)


def split_detections(boxes: Tensor, scores: Tensor, labels: Tensor, num_detections: Tensor) -> list[dict[str, Tensor]]:
    """Padded ``[B, D]`` detections -> one ``{"boxes", "scores", "labels"}`` dict per image. Reads the counts (one
    host synchronisation on CUDA), which is why it lives outside the selection functions."""
    counts = num_detections.tolist()
    return [{"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]} for i, n in enumerate(counts)]


def image_sizes_tensor(image_sizes: Sequence[tuple[int, int]], device) -> Tensor:
    """``[(h, w), ...]`` -> ``Tensor[B, 2]`` float32 on ``device`` (pinned, non-blocking copy on CUDA)."""
    sizes = torch.tensor([[float(h), float(w)] for h, w in image_sizes], dtype=torch.float32)
    if torch.device(device).type == "cuda":
        return sizes.pin_memory().to(device, non_blocking=True)
    return sizes.to(device)


def features_as_list(features) -> list[Tensor]:
    """A backbone's output (a tensor, or a dict of pyramid levels) as a list of feature maps."""
    if isinstance(features, Tensor):
        return [features]
    if isinstance(features, (dict, OrderedDict)):
        return list(features.values())
    return list(features)


# --------------------------------------------------------------------------------------------------------------------
# the detector
# --------------------------------------------------------------------------------------------------------------------


def dense_anchors(anchor_generator: ops.AnchorGenerator, batch: ImageBatch, features: list[Tensor]) -> Tensor:
    """All levels' anchors for the padded batch, ``Tensor[A, 4]`` float32, shared by its images (torchvision's
    strides: padded size // feature size). float32 even under autocast: bfloat16 anchors would be off by several
    pixels at typical image sizes."""
    grids = [tuple(f.shape[-2:]) for f in features]
    height, width = batch.tensors.shape[-2:]
    strides = [(int(height // h), int(width // w)) for h, w in grids]
    return anchor_generator.anchors(grids, strides, torch.float32, features[0].device)


def _default_anchor_generator() -> ops.AnchorGenerator:
    # torchvision's RetinaNet anchors: three octave scales 2^{0, 1/3, 2/3} (truncated to int) of 32..512 per level.
    sizes = tuple((s, int(s * 2 ** (1.0 / 3)), int(s * 2 ** (2.0 / 3))) for s in (32, 64, 128, 256, 512))
    return ops.AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


class RetinaNet(nn.Module):
    """RetinaNet detector (torchvision-compatible arguments, attributes and state-dict keys).

    Args:
        backbone (nn.Module): returns a tensor or a dict of feature maps (e.g. FPN P3-P7) and has ``out_channels``.
        num_classes (int): number of classes (sigmoid outputs; torchvision's COCO models use 91 with 0 unused).
        min_size, max_size, image_mean, image_std: input transform (see :class:`DetectionTransform`); extra keyword
            arguments (``size_divisible``, ``fixed_size``) go to it too.
        anchor_generator (fastdet.ops.AnchorGenerator, optional): default: 9 anchors per location (3 scales x 3
            ratios) with sizes 32..512 on five levels.
        head (nn.Module, optional): default :class:`RetinaNetHead`.
        score_thresh, nms_thresh, detections_per_img, topk_candidates: detection selection (torchvision's values).
        fg_iou_thresh, bg_iou_thresh (float): anchors with IoU >= fg are positives, < bg negatives, between ignored;
            every ground-truth box also claims its best-overlapping anchors (low-quality matches).
        bbox_loss_type (str): ``'l1'`` (torchvision's default), ``'smooth_l1'``, ``'giou'``, ``'diou'`` or
            ``'ciou'``.
        nms_method (str): ``'hard'`` (torchvision's NMS), ``'soft'`` (gaussian soft-NMS, EfficientDet's reference
            default) or ``'soft_linear'``: the ``method`` of :func:`fastdet.ops.multiclass_nms`.

    Targets' labels must lie in ``[0, num_classes)``; images may have no boxes (all anchors are then background).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, min_size=800, max_size: int = 1333,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                 anchor_generator: ops.AnchorGenerator | None = None, head: nn.Module | None = None,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 300,
                 fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4, topk_candidates: int = 1000,
                 bbox_loss_type: str = "l1", nms_method: str = "hard", **transform_kwargs):
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an out_channels attribute (the channel count of every feature map)")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if anchor_generator is None:
            anchor_generator = _default_anchor_generator()
        if not isinstance(anchor_generator, ops.AnchorGenerator):
            raise TypeError(f"anchor_generator must be a fastdet.ops.AnchorGenerator, got "
                            f"{type(anchor_generator).__name__}")
        if not 0 <= bg_iou_thresh <= fg_iou_thresh:
            raise ValueError(f"need 0 <= bg_iou_thresh <= fg_iou_thresh, got {bg_iou_thresh} and {fg_iou_thresh}")
        if nms_method not in ("hard", "soft", "soft_linear"):
            raise ValueError(f"nms_method must be 'hard', 'soft' or 'soft_linear', got {nms_method!r}")
        if bbox_loss_type not in _BOX_LOSSES:
            raise ValueError(f"bbox_loss_type must be one of {_BOX_LOSSES}, got {bbox_loss_type!r}")
        for name, value in (("detections_per_img", detections_per_img), ("topk_candidates", topk_candidates)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("score_thresh", score_thresh), ("nms_thresh", nms_thresh)):
            if not math.isfinite(float(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        self.backbone = backbone
        self.anchor_generator = anchor_generator
        if head is None:
            head = RetinaNetHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], num_classes)
        self.head = head
        if hasattr(head, "regression_head"):
            head.regression_head._loss_type = bbox_loss_type
        self.num_classes = num_classes
        self.box_coder = ops.BoxCoder(weights=(1.0, 1.0, 1.0, 1.0))
        self.fg_iou_thresh = float(fg_iou_thresh)
        self.bg_iou_thresh = float(bg_iou_thresh)
        self.transform = DetectionTransform(min_size, max_size, image_mean or [0.485, 0.456, 0.406],
                                            image_std or [0.229, 0.224, 0.225], **transform_kwargs)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.nms_method = nms_method

    def replace_class_heads(self, num_classes: int) -> None:
        """Fine-tuning: a fresh ``cls_logits`` convolution for ``num_classes`` (prior-probability bias, as at
        construction) on the loaded classification tower, on the old layer's device and dtype."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        head = self.head.classification_head
        old = head.cls_logits
        fresh = RetinaNetClassificationHead(old.in_channels, head.num_anchors, num_classes).cls_logits
        head.cls_logits = fresh.to(old.weight.device, old.weight.dtype)
        head.num_classes = num_classes
        self.num_classes = num_classes

    def anchors(self, batch: ImageBatch, features: list[Tensor]) -> Tensor:
        """All levels' anchors, ``Tensor[A, 4]`` float32, shared by the batch (see :func:`dense_anchors`)."""
        return dense_anchors(self.anchor_generator, batch, features)

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor],
                     anchors: Tensor) -> dict[str, Tensor]:
        padded = PaddedTargets.from_list(targets, torch.float32, anchors.device)
        matched = match_anchors(padded.boxes, padded.valid, anchors, self.fg_iou_thresh, self.bg_iou_thresh,
                                allow_low_quality_matches=True)
        return self.head.compute_loss(padded, head_outputs, anchors, matched)

    def select_detections(self, head_outputs: dict[str, Tensor], anchors: Tensor, features: list[Tensor],
                          image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Split the head outputs and anchors by level and run :func:`retinanet_select_detections`."""
        per_location = head_outputs["cls_logits"].shape[1] // sum(f.shape[-2] * f.shape[-1] for f in features)
        counts = [f.shape[-2] * f.shape[-1] * per_location for f in features]
        return retinanet_select_detections(
            head_outputs["cls_logits"].split(counts, dim=1), head_outputs["bbox_regression"].split(counts, dim=1),
            anchors.split(counts), image_sizes, self.score_thresh, self.topk_candidates, self.nms_thresh,
            self.detections_per_img, nms_method=getattr(self, "nms_method", "hard"))

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """Training: ``{"classification", "bbox_regression"}``; evaluation: one ``{"boxes", "scores", "labels"}`` per
        image, boxes in the original image's pixels."""
        check_images_and_targets(images, targets, self.training, self.num_classes)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)
        features = features_as_list(self.backbone(batch.tensors))
        head_outputs = self.head(features)
        anchors = self.anchors(batch, features)
        if self.training:
            return self.compute_loss(targets, head_outputs, anchors)
        sizes = image_sizes_tensor(batch.image_sizes, anchors.device)
        boxes, scores, labels, num = self.select_detections(head_outputs, anchors, features, sizes)
        boxes = batched_postprocess_boxes(boxes, batch.image_sizes, original_sizes)
        return split_detections(boxes, scores, labels, num)


# --------------------------------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------------------------------


def _retinanet_resnet_fpn(plan, depth: int, fpn_channels: int, progress: bool, extra_in_channels: int | None = None,
                          **kwargs) -> RetinaNet:
    from fastdet.models import backbones

    # P3-P5 from ResNet stages 2-4 (P2 would add too many anchors, as the paper notes); P6 and P7 from P5 (or from C5
    # when extra_in_channels is C5's width, as in the v2 model).
    extra = backbones.LastLevelP6P7(extra_in_channels or fpn_channels, fpn_channels)
    backbone = backbones.resnet_fpn_backbone(depth, trainable_layers=plan.trainable_backbone_layers,
                                             returned_layers=[2, 3, 4], extra_blocks=extra, norm_layer=plan.norm_layer,
                                             out_channels=fpn_channels,
                                             body_state_dict=plan.backbone_state_dict(progress))
    return plan.load_into(RetinaNet(backbone, plan.num_classes, **kwargs), progress)


def retinanet_resnet50_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                           weights_backbone=None, trainable_backbone_layers: int | None = None,
                           **kwargs) -> RetinaNet:
    """RetinaNet with a ResNet-50 FPN backbone (P3-P7, 256 channels): torchvision's ``retinanet_resnet50_fpn``
    (signature, defaults, state-dict keys).

    ``weights``: ``RetinaNet_ResNet50_FPN_Weights`` (enum or name), a ``.pth`` path or a state dict;
    ``weights_backbone``: ``ResNet50_Weights``; see :mod:`fastdet.models.weights`. ``num_classes`` comes from the
    weights (else 91). ``trainable_backbone_layers`` (0-5) counts ResNet stages from ``layer4`` down (default 3 when
    pretrained, 5 otherwise). ``norm_layer`` (fastdet extra) defaults to ``FrozenBatchNorm2d`` when pretrained and
    ``BatchNorm2d`` otherwise; ``FrozenBatchNorm2d`` models load ``BatchNorm2d`` state dicts too. Other keyword
    arguments go to :class:`RetinaNet`."""
    plan = plan_build("RetinaNet_ResNet50_FPN_Weights", "ResNet50_Weights", weights=weights,
                      weights_backbone=weights_backbone, num_classes=num_classes,
                      trainable_backbone_layers=trainable_backbone_layers, max_trainable_layers=5,
                      default_trainable_layers=3, progress=progress, norm_layer=kwargs.pop("norm_layer", None))
    return _retinanet_resnet_fpn(plan, 50, 256, progress, **kwargs)


def retinanet_resnet50_fpn_v2(*, weights=None, progress: bool = True, num_classes: int | None = None,
                              weights_backbone=None, trainable_backbone_layers: int | None = None,
                              **kwargs) -> RetinaNet:
    """The improved RetinaNet (torchvision's ``retinanet_resnet50_fpn_v2``): P6 from C5, group-norm (32 groups) head
    towers and the GIoU box loss; the ResNet keeps trainable ``BatchNorm2d`` as torchvision's (``norm_layer``
    changes it). Arguments as :func:`retinanet_resnet50_fpn` (``RetinaNet_ResNet50_FPN_V2_Weights``)."""
    plan = plan_build("RetinaNet_ResNet50_FPN_V2_Weights", "ResNet50_Weights", weights=weights,
                      weights_backbone=weights_backbone, num_classes=num_classes,
                      trainable_backbone_layers=trainable_backbone_layers, max_trainable_layers=5,
                      default_trainable_layers=3, progress=progress,
                      norm_layer=kwargs.pop("norm_layer", nn.BatchNorm2d))
    anchor_generator = kwargs.pop("anchor_generator", None) or _default_anchor_generator()
    head = RetinaNetHead(256, anchor_generator.num_anchors_per_location()[0], plan.num_classes,
                         norm_layer=partial(nn.GroupNorm, 32))
    kwargs.setdefault("bbox_loss_type", "giou")
    return _retinanet_resnet_fpn(plan, 50, 256, progress, extra_in_channels=2048, anchor_generator=anchor_generator,
                                 head=head, **kwargs)


def retinanet_resnet18_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                           weights_backbone=None, trainable_backbone_layers: int | None = None,
                           fpn_channels: int = 128, **kwargs) -> RetinaNet:
    """A light RetinaNet (fastdet's; no published detection weights): ResNet-18 FPN with ``fpn_channels`` (default
    128) channels for the pyramid and the heads. Same modules and code paths as :func:`retinanet_resnet50_fpn`; small
    enough to train on a CPU at a few hundred pixels (pass e.g. ``min_size=256, max_size=320``). Unlike the ResNet-50
    builder it keeps ``FrozenBatchNorm2d`` by default (``norm_layer`` changes it); ``weights_backbone`` takes
    ``ResNet18_Weights``."""
    if isinstance(fpn_channels, bool) or not isinstance(fpn_channels, int) or fpn_channels < 1:
        raise ValueError(f"fpn_channels must be a positive int, got {fpn_channels!r}")
    plan = plan_build(None, "ResNet18_Weights", weights=weights, weights_backbone=weights_backbone,
                      num_classes=num_classes, trainable_backbone_layers=trainable_backbone_layers,
                      max_trainable_layers=5, default_trainable_layers=3, progress=progress,
                      norm_layer=kwargs.pop("norm_layer", None) or "FrozenBatchNorm2d")
    return _retinanet_resnet_fpn(plan, 18, fpn_channels, progress, **kwargs)
