"""SSD (Liu et al., "SSD: Single Shot MultiBox Detector"), built on ``fastdet.ops`` only.

Same contract, module layout and state-dict keys as torchvision's ``SSD`` / ``ssd300_vgg16``: a torchvision
``ssd300_vgg16`` state dict loads unchanged into :func:`ssd300_vgg16` and gives the same detections.

* Training: default boxes are matched to ground truth for the whole batch at once (IoU >= ``iou_thresh``, and every
  ground-truth box claims its best default box), the box loss is smooth L1 on ``(10, 10, 5, 5)``-weighted deltas,
  and the classification loss is softmax cross-entropy over the positives plus the hardest negatives, three per
  positive (per image), both divided by the batch's number of positives. Hard negative mining ranks each image's
  losses with one batched sort.
* Evaluation: :func:`ssd_select_detections` applies torchvision's rules (softmax, per class score > 0.01 and best 400,
  decode and clip, class-wise NMS 0.45, best 200) to the whole batch with fixed-size tensors and no host
  synchronisation.

Label 0 is the background class: targets' labels must lie in ``[1, num_classes)`` (torchvision would silently treat a
box labelled 0 as background).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet import ops
from fastdet.models._validation import check_images_and_targets
from fastdet.models.retinanet import (
    BELOW_LOW_THRESHOLD,
    PaddedTargets,
    _order_by_anchor_index,
    _stable_top_k_mask,
    features_as_list,
    image_sizes_tensor,
    split_detections,
)
from fastdet.models.transform import DetectionTransform, batched_postprocess_boxes
from fastdet.models.weights import plan_build

__all__ = [
    "SSD",
    "SSDClassificationHead",
    "SSDHead",
    "SSDRegressionHead",
    "VGG16SSDFeatures",
    "match_default_boxes",
    "ssd300_vgg16",
    "ssd300_vgg16_light",
    "ssd_select_detections",
]

_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def _xavier_init(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.constant_(layer.bias, 0.0)


# --------------------------------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------------------------------


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
        _xavier_init(convs)
        super().__init__(convs, num_classes)


class SSDRegressionHead(_SSDScoringHead):
    """Box deltas (weights ``(10, 10, 5, 5)``) for every default box."""

    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int]):
        convs = nn.ModuleList(nn.Conv2d(c, 4 * a, kernel_size=3, padding=1) for c, a in zip(in_channels, num_anchors))
        _xavier_init(convs)
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


# --------------------------------------------------------------------------------------------------------------------
# VGG-16 feature extractor (torchvision's SSD300 layout and key names)
# --------------------------------------------------------------------------------------------------------------------


def _vgg16_layers(width: float) -> list[nn.Module]:
    """VGG-16's convolutional part (13 3x3 convs + ReLU, 5 max pools), channels scaled by ``width``. Indices match
    torchvision's ``vgg16().features`` (conv1_1 is 0, the pools are 4, 9, 16, 23, 30)."""
    layers: list[nn.Module] = []
    in_channels = 3
    for stage, (channels, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        out_channels = _scaled(channels, width)
        for _ in range(convs):
            conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(conv.bias, 0)
            layers += [conv, nn.ReLU(inplace=True)]
            in_channels = out_channels
        # SSD rounds the third pool up (75 -> 38 at 300 px) to get the paper's 38x38 conv4_3 map.
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=stage == 2))
    return layers


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class VGG16SSDFeatures(nn.Module):
    """SSD300's VGG-16 feature extractor with torchvision's module names (``features``, ``scale_weight``,
    ``extra.{0..4}``), so ``backbone.*`` keys of a torchvision ``ssd300_vgg16`` state dict load unchanged.

    Outputs six maps (38, 19, 10, 5, 3, 1 at 300 px): conv4_3 L2-normalised per location and rescaled by the learned
    ``scale_weight`` (initially 20), fc7 (dilated fc6 + 1x1 fc7 after a 3x3/1 pool5), and conv8_2 ... conv11_2.

    Args:
        width (float): channel multiplier (1.0 = VGG-16; e.g. 0.125 for a light model that trains on a CPU).
    """

    def __init__(self, width: float = 1.0):
        super().__init__()
        if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
            raise ValueError(f"width must be a positive number, got {width!r}")
        w = lambda c: _scaled(c, width)  # noqa: E731
        layers = _vgg16_layers(width)
        self.scale_weight = nn.Parameter(torch.ones(w(512)) * 20)
        self.features = nn.Sequential(*layers[:23])  # conv1_1 .. conv4_3 + ReLU
        fc = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=False),  # pool5, resolution kept
            nn.Conv2d(w(512), w(1024), kernel_size=3, padding=6, dilation=6),  # fc6, atrous
            nn.ReLU(inplace=True),
            nn.Conv2d(w(1024), w(1024), kernel_size=1),  # fc7
            nn.ReLU(inplace=True),
        )
        _xavier_init(fc)

        def extra_block(in_c: int, mid_c: int, out_c: int, **conv_kwargs) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(in_c, mid_c, kernel_size=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(mid_c, out_c, kernel_size=3, **conv_kwargs), nn.ReLU(inplace=True))

        extra = nn.ModuleList([
            extra_block(w(1024), w(256), w(512), padding=1, stride=2),  # conv8_2
            extra_block(w(512), w(128), w(256), padding=1, stride=2),  # conv9_2
            extra_block(w(256), w(128), w(256)),  # conv10_2
            extra_block(w(256), w(128), w(256)),  # conv11_2
        ])
        _xavier_init(extra)
        # pool4 .. conv5_3 (+ ReLU), then pool5/fc6/fc7: torchvision keeps them together as extra.0.
        extra.insert(0, nn.Sequential(*layers[23:30], fc))
        self.extra = extra
        self.out_channels = [w(512), w(1024), w(512), w(256), w(256), w(256)]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        x = self.features(x)
        outputs = [self.scale_weight.view(1, -1, 1, 1) * F.normalize(x)]
        for block in self.extra:
            x = block(x)
            outputs.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(outputs))


def _freeze_vgg_stages(backbone: VGG16SSDFeatures, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` of VGG's five stages (torchvision's rule: the stages start at
    layer 0 and at each of the first four pools; stage 5's convolutions live in ``extra.0``, which always trains)."""
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_backbone_layers must be an int in [0, 5], got {trainable_layers!r}")
    stage_starts = [0, 4, 9, 16, 23]
    freeze_before = 30 if trainable_layers == 0 else stage_starts[5 - trainable_layers]
    # VGG layers 0-22 are features.0-22; layers 23-29 (pool4, conv5_x) are extra.0.0-6.
    vgg_layers = list(backbone.features) + list(backbone.extra[0])[:7]
    for layer in vgg_layers[:freeze_before]:
        for parameter in layer.parameters():
            parameter.requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------------
# matching and loss
# --------------------------------------------------------------------------------------------------------------------


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
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)
    best_iou, matches = iou.max(dim=1)
    matches = torch.where(best_iou < iou_threshold, BELOW_LOW_THRESHOLD, matches)
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
    target_deltas = ops.box_encode(matched_boxes.reshape(-1, 4), boxes_b.reshape(-1, 4), _BOX_WEIGHTS)
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


# --------------------------------------------------------------------------------------------------------------------
# detection selection (batched, fixed-size, no host synchronisation)
# --------------------------------------------------------------------------------------------------------------------


def ssd_select_detections(
    cls_logits: Tensor,
    bbox_regression: Tensor,
    default_boxes: Tensor,
    image_sizes: Tensor,
    score_thresh: float = 0.01,
    topk_candidates: int = 400,
    nms_thresh: float = 0.45,
    detections_per_img: int = 200,
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
    chosen = _stable_top_k_mask(ranked, topk_candidates) & (ranked > float("-inf"))
    chosen = chosen.reshape(batch, num_classes - 1, num_boxes).transpose(1, 2)
    candidate_scores = torch.where(chosen, foreground, float("-inf"))
    # Every box with a chosen class is a candidate (at most min(N, topk * (K - 1))); only those are decoded.
    max_candidates = min(num_boxes, topk_candidates * (num_classes - 1))
    boxes, scores, index, _ = ops.decode_and_select(bbox_regression.float(), default_boxes.float(), candidate_scores,
                                                    score_thresh, max_candidates, image_sizes, weights=_BOX_WEIGHTS)
    boxes, scores, _ = _order_by_anchor_index(boxes, scores, index)
    # At most min(N, topk) boxes per class pass, so this pre-NMS cap never drops a candidate.
    det_boxes, det_scores, det_labels, num = ops.multiclass_nms(
        boxes, scores, score_thresh, nms_thresh, detections_per_img,
        pre_nms_top_k=min(num_boxes, topk_candidates) * (num_classes - 1))
    # Class columns start at 1 (background removed); padding labels stay -1.
    return det_boxes, det_scores, torch.where(det_labels >= 0, det_labels + 1, -1), num


# --------------------------------------------------------------------------------------------------------------------
# the detector
# --------------------------------------------------------------------------------------------------------------------


class SSD(nn.Module):
    """SSD detector (torchvision-compatible arguments, attributes and state-dict keys).

    Args:
        backbone (nn.Module): returns a dict (or list) of feature maps; ``out_channels`` (a list) is read if present,
            otherwise found by running the backbone once on a zero image of ``size``.
        anchor_generator (fastdet.ops.DefaultBoxGenerator): one entry of aspect ratios per feature map.
        size ((int, int)): ``(width, height)`` every image is resized to.
        num_classes (int): including the background class 0.
        image_mean, image_std: input normalisation (default ImageNet's).
        head (nn.Module, optional): default :class:`SSDHead`.
        score_thresh, nms_thresh, detections_per_img, topk_candidates: detection selection (torchvision's values).
        iou_thresh (float): a default box is positive at IoU >= iou_thresh (plus each box's best default box).
        positive_fraction (float): hard negative mining keeps ``(1 - f) / f`` negatives per positive (3 for 0.25).
    """

    def __init__(self, backbone: nn.Module, anchor_generator: ops.DefaultBoxGenerator, size: tuple[int, int],
                 num_classes: int, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, head: nn.Module | None = None,
                 score_thresh: float = 0.01, nms_thresh: float = 0.45, detections_per_img: int = 200,
                 iou_thresh: float = 0.5, topk_candidates: int = 400, positive_fraction: float = 0.25,
                 **transform_kwargs):
        super().__init__()
        if not isinstance(anchor_generator, ops.DefaultBoxGenerator):
            raise TypeError(f"anchor_generator must be a fastdet.ops.DefaultBoxGenerator, got "
                            f"{type(anchor_generator).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background + at least one class), got {num_classes!r}")
        size = tuple(size)
        if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
            raise ValueError(f"size must be (width, height) positive ints, got {size!r}")
        if not 0.0 < positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in (0, 1], got {positive_fraction}")
        if not 0.0 <= iou_thresh <= 1.0:
            raise ValueError(f"iou_thresh must be in [0, 1], got {iou_thresh}")
        for name, value in (("detections_per_img", detections_per_img), ("topk_candidates", topk_candidates)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.backbone = backbone
        self.anchor_generator = anchor_generator
        self.box_coder = ops.BoxCoder(weights=_BOX_WEIGHTS)
        if head is None:
            out_channels = getattr(backbone, "out_channels", None)
            if out_channels is None:
                out_channels = _probe_out_channels(backbone, size)
            if len(out_channels) != len(anchor_generator.aspect_ratios):
                raise ValueError(f"the backbone gives {len(out_channels)} feature maps but the anchor generator has "
                                 f"{len(anchor_generator.aspect_ratios)} levels of aspect ratios")
            head = SSDHead(out_channels, anchor_generator.num_anchors_per_location(), num_classes)
        self.head = head
        self.num_classes = num_classes
        self.iou_thresh = float(iou_thresh)
        self.transform = DetectionTransform(min(size), max(size), image_mean or [0.485, 0.456, 0.406],
                                            image_std or [0.229, 0.224, 0.225], size_divisible=1, fixed_size=size,
                                            **transform_kwargs)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates
        self.neg_to_pos_ratio = (1.0 - positive_fraction) / positive_fraction

    def replace_class_heads(self, num_classes: int) -> None:
        """Fine-tuning: fresh class-logit layers for ``num_classes`` (background included) on every feature map, each
        initialised like the layer it replaces (its module's own initialiser), on its device and dtype."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
        head = self.head.classification_head
        for level, module in enumerate(head.module_list):
            container, index = (module, len(module) - 1) if isinstance(module, nn.Sequential) else (head.module_list,
                                                                                                     level)
            old = container[index]
            anchors = old.out_channels // head.num_columns
            fresh = nn.Conv2d(old.in_channels, anchors * num_classes, old.kernel_size, old.stride, old.padding)
            getattr(head, "init_logits", _xavier_init)(fresh)
            container[index] = fresh.to(old.weight.device, old.weight.dtype)
        head.num_columns = num_classes
        self.num_classes = num_classes

    def default_boxes(self, image_shape, features: list[Tensor]) -> Tensor:
        """All default boxes, ``Tensor[N, 4]`` (xyxy pixels, float32), shared by the batch."""
        grids = [tuple(f.shape[-2:]) for f in features]
        return self.anchor_generator.default_boxes(grids, tuple(image_shape), torch.float32, features[0].device)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """Training: ``{"bbox_regression", "classification"}``; evaluation: one ``{"boxes", "scores", "labels"}`` per
        image, boxes in the original image's pixels."""
        check_images_and_targets(images, targets, self.training, self.num_classes, min_label=1)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)
        features = features_as_list(self.backbone(batch.tensors))
        head_outputs = self.head(features)
        default_boxes = self.default_boxes(batch.tensors.shape[-2:], features)
        if self.training:
            padded = PaddedTargets.from_list(targets, torch.float32, default_boxes.device)
            matched = match_default_boxes(padded.boxes, padded.valid, default_boxes, self.iou_thresh)
            return ssd_loss(head_outputs["cls_logits"], head_outputs["bbox_regression"], padded, default_boxes,
                            matched, self.neg_to_pos_ratio)
        sizes = image_sizes_tensor(batch.image_sizes, default_boxes.device)
        boxes, scores, labels, num = ssd_select_detections(
            head_outputs["cls_logits"], head_outputs["bbox_regression"], default_boxes, sizes, self.score_thresh,
            self.topk_candidates, self.nms_thresh, self.detections_per_img)
        boxes = batched_postprocess_boxes(boxes, batch.image_sizes, original_sizes)
        return split_detections(boxes, scores, labels, num)


def _probe_out_channels(backbone: nn.Module, size: tuple[int, int]) -> list[int]:
    was_training = backbone.training
    backbone.eval()
    parameter = next(backbone.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    with torch.no_grad():
        features = features_as_list(backbone(torch.zeros(1, 3, size[1], size[0], device=device)))
    backbone.train(was_training)
    return [f.shape[1] for f in features]


# --------------------------------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------------------------------


def _ssd300_default_boxes() -> ops.DefaultBoxGenerator:
    return ops.DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                   scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
                                   steps=[8, 16, 32, 64, 100, 300])


def load_vgg16_features(backbone: VGG16SSDFeatures, state_dict) -> None:
    """Load torchvision ``vgg16`` weights (``features.{i}.*``; the classifier's entries are ignored) into the VGG
    layers of ``backbone``: layers 0-22 are ``features``, 23-29 (pool4, conv5_x) are ``extra.0.0``-``extra.0.6``."""
    mapped = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue
        index = int(parts[1])
        target = f"features.{index}" if index < 23 else f"extra.0.{index - 23}"
        mapped[".".join([target, *parts[2:]])] = value
    expected = {k for k in backbone.state_dict() if k.startswith("features.") or
                (k.startswith("extra.0.") and int(k.split(".")[2]) < 7)}
    if set(mapped) != expected:
        raise ValueError(f"weights_backbone is not a VGG-16 state dict of this width: missing "
                         f"{sorted(expected - set(mapped))[:4]}, unexpected {sorted(set(mapped) - expected)[:4]}")
    backbone.load_state_dict(mapped, strict=False)


def _ssd300(width: float, plan, progress: bool, **kwargs) -> SSD:
    if "size" in kwargs:
        raise ValueError("SSD300's input size is fixed at (300, 300); do not pass size")
    backbone = VGG16SSDFeatures(width)
    backbone_weights = plan.backbone_state_dict(progress)
    if backbone_weights is not None:
        load_vgg16_features(backbone, backbone_weights)
    _freeze_vgg_stages(backbone, plan.trainable_backbone_layers)
    # torchvision's SSD300 normalisation: the VGG weights expect 0..255 inputs minus the mean, hence std = 1 / 255.
    defaults = {"image_mean": [0.48235, 0.45882, 0.40784], "image_std": [1.0 / 255.0, 1.0 / 255.0, 1.0 / 255.0]}
    model = SSD(backbone, _ssd300_default_boxes(), (300, 300), plan.num_classes, **{**defaults, **kwargs})
    return plan.load_into(model, progress)


def ssd300_vgg16(*, weights=None, progress: bool = True, num_classes: int | None = None,
                 weights_backbone="IMAGENET1K_FEATURES", trainable_backbone_layers: int | None = None,
                 **kwargs) -> SSD:
    """SSD300 with a VGG-16 backbone: torchvision's ``ssd300_vgg16`` (signature, defaults, default boxes (8732 at
    300 px), normalisation and state-dict keys).

    ``weights``: ``SSD300_VGG16_Weights`` (enum or name), a ``.pth`` path or a state dict. ``weights_backbone``
    defaults to ``VGG16_Weights.IMAGENET1K_FEATURES`` as in torchvision: the file must be in the hub cache (see
    :mod:`fastdet.models.weights`); pass ``weights_backbone=None`` for a randomly initialised model.
    ``trainable_backbone_layers`` (0-5) counts VGG stages from the last: default 4 when pretrained, 5 otherwise.
    Keyword arguments go to :class:`SSD`."""
    plan = plan_build("SSD300_VGG16_Weights", "VGG16_Weights", weights=weights, weights_backbone=weights_backbone,
                      num_classes=num_classes, trainable_backbone_layers=trainable_backbone_layers,
                      max_trainable_layers=5, default_trainable_layers=4, progress=progress)
    return _ssd300(1.0, plan, progress, **kwargs)


def ssd300_vgg16_light(*, weights=None, progress: bool = True, num_classes: int | None = None,
                       weights_backbone=None, trainable_backbone_layers: int | None = None, width: float = 0.125,
                       **kwargs) -> SSD:
    """A light SSD300 (fastdet's; no published weights): the VGG-16 layout of :func:`ssd300_vgg16` with every channel
    count multiplied by ``width`` (default 1/8, about 1/64 of the compute). Same default boxes, heads and code paths;
    small enough to train on a CPU. ``weights``/``weights_backbone`` take paths or state dicts."""
    plan = plan_build(None, None, weights=weights, weights_backbone=weights_backbone, num_classes=num_classes,
                      trainable_backbone_layers=trainable_backbone_layers, max_trainable_layers=5,
                      default_trainable_layers=4, progress=progress)
    return _ssd300(width, plan, progress, **kwargs)
