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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet.models._validation import check_images_and_targets
from fastdet.models.backbones.darknet import CSPBackbone
from fastdet.models.heads.yolo_head import (
    STRIDES,
    YOLOHead,
    YOLOTargets,
    assign_yolo_targets,
    cell_relative_pairs,
    decode_yolo_boxes,
    yolo_select,
)
from fastdet.models.necks.pan import PANNeck
from fastdet.models.postprocess import check_nms_method
from fastdet.models.targets import pad_box_lists as pad_targets
from fastdet.models.transform import DetectionTransform, batched_postprocess_boxes
from fastdet.models.weights import plan_build
from fastdet.ops import complete_box_iou_loss, yolo_grid_priors

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


# YOLOv5's objectness weights per level: the fine level has the most priors and the most small, hard objects.
_OBJECTNESS_BALANCE = (4.0, 1.0, 0.4)


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
        nms_method (str): ``"hard"`` (greedy NMS, default), ``"soft"`` (gaussian soft-NMS) or ``"soft_linear"``
            (see :func:`fastdet.ops.multiclass_nms`).
    """

    def __init__(self, num_classes: int, *, width_multiple: float = 0.5, depth_multiple: float = 0.33,
                 image_size: int = 640, anchors=None, anchor_threshold: float = 4.0,
                 box_loss_gain: float = 0.05, obj_loss_gain: float = 1.0, cls_loss_gain: float = 0.5,
                 score_threshold: float = 0.001, nms_threshold: float = 0.6, detections_per_image: int = 100,
                 pre_nms_top_k: int = 1000, image_mean: Sequence[float] = (0.0, 0.0, 0.0),
                 image_std: Sequence[float] = (1.0, 1.0, 1.0), nms_method: str = "hard"):
        super().__init__()
        self.nms_method = check_nms_method(nms_method)
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
        pred_boxes, target_boxes = cell_relative_pairs(picked[..., :4], priors[index], prior_strides[index],
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
                                                    self.nms_threshold, self.detections_per_image, self.pre_nms_top_k,
                                                    getattr(self, "nms_method", "hard"))
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
