"""Fast R-CNN box branch on top of proposals: RoI pooling, box head, classification + per-class regression, training
targets and synchronisation-free detection selection.

Detection selection for a batch (:func:`select_detections`), equivalent to torchvision's ``postprocess_detections``:
softmax over classes, per-class decoding of the deltas against the proposal (weights ``(10, 10, 5, 5)``), clipping to
the image, then over all (proposal, foreground class) pairs: score ``> score_thresh``, width and height ``>= 1e-2``,
per-class NMS and the best ``detections_per_img``. Candidates that fail a rule (and background and padding
proposals) get score ``-inf`` instead of being removed, and ``fastdet.ops.multiclass_nms`` visits the rest in
torchvision's order (score descending, ties by ``proposal * C + class``), so the kept detections are torchvision's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet.models.layers import conv_norm_activation
from fastdet.models.heads.rpn import Proposals
from fastdet.models.matching import (
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    BalancedPositiveNegativeSampler,
    Matcher,
    match_iou,
)
from fastdet.models.postprocess import (
    check_nms_method,
    clip_boxes_to_images,
    compact_mask,
    gather_rows,
    image_sizes_tensor,
    trim_padding,
)
from fastdet.models.targets import PaddedTargets
from fastdet.ops import box_decode, box_encode, multiclass_nms, smooth_l1_loss

__all__ = ["Detections", "FastRCNNConvFCHead", "FastRCNNPredictor", "RoIHeads", "SingleMapRoIPool", "TwoMLPHead",
           "box_branch", "select_detections"]

# torchvision's fixed minimum side of a detection (RoIHeads.postprocess_detections' remove_small_boxes).
MIN_DETECTION_SIZE = 1e-2


class Detections(NamedTuple):
    boxes: Tensor  # [B, K, 4]
    scores: Tensor  # [B, K]
    labels: Tensor  # [B, K] int64; -1 in padding slots
    num_detections: Tensor  # [B] int64; valid slots are the prefix [0, num_detections)


class TwoMLPHead(nn.Module):
    """Flatten pooled RoI features and apply two fully connected layers with ReLU (``fc6``, ``fc7``)."""

    def __init__(self, in_channels: int, representation_size: int):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(start_dim=1)))))


def init_conv_head(module: nn.Module) -> None:
    """torchvision's initialisation of the RoI heads' convolutions (box and mask heads): He-normal weights (fan-out,
    ReLU gain), zero biases."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class FastRCNNConvFCHead(nn.Sequential):
    """Box head of the v2 models: 3x3 conv (+ norm) + ReLU blocks, flatten, then Linear + ReLU layers; torchvision's
    ``FastRCNNConvFCHead`` layout (``{i}.0`` conv, ``{i}.1`` norm, then the linear layers), so its keys load.

    Args:
        input_size ((C, H, W)): the pooled RoI features' shape.
        conv_layers, fc_layers (list of int): output channels of each conv block and fully connected layer.
        norm_layer: e.g. ``nn.BatchNorm2d``; None for plain convolutions with bias.
    """

    def __init__(self, input_size: tuple[int, int, int], conv_layers: list[int], fc_layers: list[int],
                 norm_layer=None):
        channels, height, width = input_size
        blocks: list[nn.Module] = []
        for out_channels in conv_layers:
            blocks.append(conv_norm_activation(channels, out_channels, 3, norm_layer=norm_layer))
            channels = out_channels
        blocks.append(nn.Flatten())
        features = channels * height * width
        for out_features in fc_layers:
            blocks += [nn.Linear(features, out_features), nn.ReLU(inplace=True)]
            features = out_features
        super().__init__(*blocks)
        init_conv_head(self)


class FastRCNNPredictor(nn.Module):
    """Class logits (``cls_score``, C outputs with 0 = background) and per-class box deltas (``bbox_pred``, 4C)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() == 4 and tuple(x.shape[2:]) != (1, 1):
            raise ValueError(f"FastRCNNPredictor expects [N, C] or [N, C, 1, 1] features, got {tuple(x.shape)}")
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class SingleMapRoIPool(nn.Module):
    """Adapter giving a single-map RoI pooling module (``pool(features, rois)``, e.g. ``fastdet.ops.RoISPP``,
    ``RoIPool``, ``RoIAlign``) :class:`RoIHeads`' ``box_roi_pool(features, rois, image_sizes)`` contract: it pools
    ``features[featmap_name]`` and ignores the image sizes (the pool carries its own ``spatial_scale``)."""

    def __init__(self, pool: nn.Module, featmap_name: str = "0"):
        super().__init__()
        self.pool = pool
        self.featmap_name = featmap_name

    def forward(self, features: dict[str, Tensor], rois: Tensor, image_sizes=None) -> Tensor:
        if self.featmap_name not in features:
            raise KeyError(f"SingleMapRoIPool pools the feature map {self.featmap_name!r}, the backbone gave "
                           f"{list(features)}")
        return self.pool(features[self.featmap_name], rois)


def box_branch(out_channels: int, num_classes: int | None, box_roi_pool: nn.Module | None = None,
               box_head: nn.Module | None = None, box_predictor: nn.Module | None = None
               ) -> tuple[nn.Module, nn.Module, nn.Module, int]:
    """The box branch of a two-stage detector with torchvision's defaults for what is not given: ``box_roi_pool``
    ``MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)``, ``box_head`` ``TwoMLPHead(out_channels * 7 * 7, 1024)`` (the
    pool's ``output_size``), ``box_predictor`` ``FastRCNNPredictor(1024, num_classes)``. ``num_classes`` (background
    included, >= 2) is required unless ``box_predictor`` is given, and must then be None. Returns
    ``(box_roi_pool, box_head, box_predictor, num_classes)``."""
    from fastdet.ops import MultiScaleRoIAlign

    if box_predictor is None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background included) when box_predictor is not "
                             f"given, got {num_classes!r}")
    elif num_classes is not None:
        raise ValueError("num_classes must be None when box_predictor is given")
    if box_roi_pool is None:
        box_roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    if box_head is None:
        resolution = box_roi_pool.output_size[0]
        box_head = TwoMLPHead(out_channels * resolution**2, 1024)
    if box_predictor is None:
        box_predictor = FastRCNNPredictor(1024, num_classes)
    return box_roi_pool, box_head, box_predictor, box_predictor.cls_score.out_features


def select_detections(class_logits: Tensor, box_regression: Tensor, proposals: Tensor, proposal_valid: Tensor,
                      image_sizes: Tensor, score_thresh: float, nms_thresh: float, detections_per_img: int,
                      bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), pre_nms_top_k: int | None = None,
                      nms_method: str = "hard") -> Detections:
    """Final detections of the batch (see the module docstring).

    Args:
        class_logits (Tensor[B * P, C]), box_regression (Tensor[B * P, 4 * C]): box-predictor outputs for the
            padded proposals, image-major.
        proposals (Tensor[B, P, 4]), proposal_valid (Tensor[B, P]): the RPN's padded proposals.
        image_sizes (Tensor[B, 2]): ``(height, width)`` of each resized image.
        pre_nms_top_k (int, optional): cap on the candidates per image entering NMS; None (default) = all
            ``P * (C - 1)``, which keeps the result identical to torchvision's.
        nms_method (str): ``"hard"`` (default, torchvision's), ``"soft"`` or ``"soft_linear"`` (soft-NMS; see
            :func:`fastdet.ops.multiclass_nms`).

    Returns :class:`Detections` (K = ``detections_per_img``), boxes in resized-image pixels. No host synchronisation;
    compiles with ``torch.compile(fullgraph=True)``.
    """
    B, P, _ = proposals.shape
    C = class_logits.shape[-1]
    deltas = box_regression.float().reshape(B * P, C * 4)
    boxes = box_decode(deltas, proposals.float().reshape(B * P, 4), bbox_reg_weights).reshape(B, P, C, 4)
    boxes = clip_boxes_to_images(boxes, image_sizes)
    scores = F.softmax(class_logits.float(), dim=-1).reshape(B, P, C)
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    usable = (widths >= MIN_DETECTION_SIZE) & (heights >= MIN_DETECTION_SIZE) & proposal_valid[..., None]
    usable[..., 0] = False  # class 0 is background
    scores = torch.where(usable, scores, float("-inf"))
    top_k = P * C if pre_nms_top_k is None else int(pre_nms_top_k)
    return Detections(*multiclass_nms(boxes, scores, score_thresh, nms_thresh, detections_per_img, top_k,
                                      method=nms_method))


class RoIHeads(nn.Module):
    """The box branch: ``box_roi_pool`` (e.g. ``fastdet.ops.MultiScaleRoIAlign``), ``box_head``, ``box_predictor``,
    with torchvision's training rules (proposals plus ground truth, matching without low-quality matches, balanced
    sampling) and :func:`select_detections` at inference.

    ``forward(features, proposals, image_sizes, targets=None) -> (Detections | None, losses)``: detections in
    evaluation mode, ``{"loss_classifier", "loss_box_reg"}`` in training mode.
    """

    def __init__(self, box_roi_pool: nn.Module, box_head: nn.Module, box_predictor: nn.Module, fg_iou_thresh: float,
                 bg_iou_thresh: float, batch_size_per_image: int, positive_fraction: float,
                 bbox_reg_weights=None, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100, pre_nms_top_k: int | None = None, nms_method: str = "hard"):
        super().__init__()
        self.nms_method = check_nms_method(nms_method)
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.proposal_matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.fg_bg_sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.bbox_reg_weights = tuple(bbox_reg_weights) if bbox_reg_weights is not None else (10.0, 10.0, 5.0, 5.0)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.pre_nms_top_k = pre_nms_top_k

    def replace_box_predictor(self, num_classes: int) -> None:
        """Fine-tuning: a fresh :class:`FastRCNNPredictor` for ``num_classes`` (background included) on the same
        features, on the old predictor's device and dtype (torchvision's tutorial recipe)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
        old = self.box_predictor.cls_score
        self.box_predictor = FastRCNNPredictor(old.in_features, num_classes).to(old.weight.device, old.weight.dtype)

    def _predict(self, features: dict[str, Tensor], boxes: Tensor, image_sizes) -> tuple[Tensor, Tensor]:
        B, R, _ = boxes.shape
        batch_index = torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(R)
        rois = torch.cat([batch_index[:, None], boxes.reshape(B * R, 4)], dim=1)
        pooled = self.box_roi_pool(features, rois, image_sizes)
        return self.box_predictor(self.box_head(pooled))

    def forward(self, features: dict[str, Tensor], proposals: Proposals, image_sizes: list[tuple[int, int]],
                targets: PaddedTargets | None = None) -> tuple[Detections | None, dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets must be given in training mode")
            boxes, labels, regression_targets, sampled = self.select_training_samples(proposals, targets)
            class_logits, box_regression = self._predict(features, boxes.detach(), image_sizes)
            return None, self.compute_loss(class_logits, box_regression, labels, regression_targets, sampled)
        # eager CPU: no box-head work for the padding slots past the batch's largest proposal count
        valid, boxes = trim_padding(proposals.valid, proposals.boxes)
        class_logits, box_regression = self._predict(features, boxes, image_sizes)
        sizes = image_sizes_tensor(image_sizes, boxes.device)
        detections = select_detections(class_logits, box_regression, boxes, valid, sizes,
                                       self.score_thresh, self.nms_thresh, self.detections_per_img,
                                       self.bbox_reg_weights, self.pre_nms_top_k,
                                       getattr(self, "nms_method", "hard"))
        return detections, {}

    def select_training_samples(self, proposals: Proposals, targets: PaddedTargets
                                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Proposals and ground-truth boxes of each image (torchvision adds the ground truth as proposals), matched
        and sampled: returns ``boxes [B, S, 4]``, ``labels [B, S]`` (0 = background), ``regression_targets [B, S, 4]``
        and ``sampled [B, S]`` (which slots hold a sampled example), ``S = min(batch_size_per_image, P + G)``."""
        return self.sample_with_matches(proposals, targets)[:4]

    def sample_with_matches(self, proposals: Proposals, targets: PaddedTargets
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """:meth:`select_training_samples` plus ``matched [B, S]``: the ground-truth slot each sampled box was matched
        to (meaningful where the label is positive; the mask branch reads its mask target there)."""
        gt_boxes = targets.boxes.to(proposals.boxes.dtype)
        candidates = torch.cat([proposals.boxes, gt_boxes], dim=1)  # [B, P + G, 4]
        candidate_valid = torch.cat([proposals.valid, targets.valid], dim=1)
        matches = self.proposal_matcher(match_iou(gt_boxes, candidates), targets.valid, candidate_valid)
        labels = targets.labels.gather(1, matches.clamp(min=0))
        labels = torch.where(matches == BELOW_LOW_THRESHOLD, 0, labels)
        labels = torch.where((matches == BETWEEN_THRESHOLDS) | ~candidate_valid, -1, labels)
        positive, negative = self.fg_bg_sampler(labels)
        sampled_mask = positive | negative
        slots = min(self.fg_bg_sampler.batch_size_per_image, candidates.shape[1])
        index, sampled = compact_mask(sampled_mask, slots)
        boxes = gather_rows(candidates, index)
        labels = torch.where(sampled, labels.gather(1, index), 0)
        is_positive = sampled & (labels > 0)
        matched = matches.gather(1, index).clamp(min=0)
        matched_gt = gather_rows(gt_boxes, matched)
        B, S, _ = boxes.shape
        regression_targets = box_encode(matched_gt.reshape(-1, 4), boxes.reshape(-1, 4),
                                        self.bbox_reg_weights).reshape(B, S, 4)
        # Only positive slots have a target. Others (padding proposals are zero boxes: log(0 / 0) = NaN) get 0, which
        # must happen here: a NaN target would turn the zero gradient of a masked-out loss term into NaN.
        regression_targets = torch.where(is_positive[..., None], regression_targets, 0.0)
        return boxes, labels, regression_targets, sampled, matched

    def compute_loss(self, class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor,
                     sampled: Tensor) -> dict[str, Tensor]:
        """Cross-entropy over the sampled slots and smooth L1 (beta 1/9) of the true class's deltas over the positive
        ones, both divided by the number of sampled slots (torchvision's ``fastrcnn_loss``)."""
        labels = labels.reshape(-1)
        sampled = sampled.reshape(-1)
        num_sampled = sampled.sum().clamp(min=1).float()
        ce = F.cross_entropy(class_logits.float(), labels, reduction="none")
        classifier_loss = torch.where(sampled, ce, 0.0).sum() / num_sampled
        num_classes = class_logits.shape[-1]
        per_class = box_regression.float().reshape(-1, num_classes, 4)
        class_deltas = per_class.gather(1, labels.reshape(-1, 1, 1).expand(-1, 1, 4)).squeeze(1)
        box_loss = smooth_l1_loss(class_deltas, regression_targets.reshape(-1, 4).float(), beta=1 / 9).sum(dim=-1)
        box_loss = torch.where(sampled & (labels > 0), box_loss, 0.0).sum() / num_sampled
        return {"loss_classifier": classifier_loss, "loss_box_reg": box_loss}
