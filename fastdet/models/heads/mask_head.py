"""Mask R-CNN's mask branch: the mask head (4 conv blocks) and predictor (deconv + 1x1 to per-class logits) with
torchvision's module names, the mask loss, and :class:`MaskRoIHeads` (the box RoI heads plus the mask branch, batched
over the padded proposals / detections). See :mod:`fastdet.models.mask_rcnn` for the detector."""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdet.models.heads.roi_heads import Detections, RoIHeads, init_conv_head
from fastdet.models.heads.rpn import Proposals
from fastdet.models.layers import conv_norm_activation
from fastdet.models.postprocess import compact_mask, gather_rows, trim_padding
from fastdet.models.targets import PaddedTargets
from fastdet.ops import project_masks_on_boxes

__all__ = ["MaskDetections", "MaskRCNNHeads", "MaskRCNNPredictor", "MaskRoIHeads", "mask_loss"]


class MaskDetections(NamedTuple):
    """:class:`fastdet.models.roi_heads.Detections` plus the mask branch's output."""

    boxes: Tensor  # [B, K, 4]
    scores: Tensor  # [B, K]
    labels: Tensor  # [B, K] int64; -1 in padding slots
    num_detections: Tensor  # [B] int64
    masks: Tensor  # [B, K, 1, M, M] probabilities of each detection's class, in its box


class MaskRCNNHeads(nn.Sequential):
    """The mask head: ``len(layers)`` 3 x 3 conv (+ optional norm) + ReLU blocks, keys ``<i>.0.weight`` (and
    ``<i>.1.*`` for the norm) as torchvision's ``MaskRCNNHeads``; He-normal (fan-out) weights, zero biases."""

    def __init__(self, in_channels: int, layers, dilation: int = 1, norm_layer=None):
        blocks = []
        for channels in layers:
            blocks.append(conv_norm_activation(in_channels, channels, 3, norm_layer=norm_layer, dilation=dilation))
            in_channels = channels
        super().__init__(*blocks)
        init_conv_head(self)


class MaskRCNNPredictor(nn.Sequential):
    """2 x upsampling (``conv5_mask``, a stride-2 transposed conv) + ReLU + per-class 1 x 1 logits
    (``mask_fcn_logits``): ``[N, in_channels, 14, 14] -> [N, num_classes, 28, 28]``."""

    def __init__(self, in_channels: int, dim_reduced: int, num_classes: int):
        super().__init__(OrderedDict([
            ("conv5_mask", nn.ConvTranspose2d(in_channels, dim_reduced, 2, 2, 0)),
            ("relu", nn.ReLU(inplace=True)),
            ("mask_fcn_logits", nn.Conv2d(dim_reduced, num_classes, 1, 1, 0)),
        ]))
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor, valid: Tensor) -> Tensor:
    """torchvision's ``maskrcnn_loss`` on padded slots: mean binary cross-entropy with logits of each valid slot's
    class channel (``mask_logits [S, C, M, M]``, ``labels [S]``) against ``targets [S, M, M]``, over every pixel of
    the valid slots; 0 (with a gradient path) when no slot is valid."""
    channel = mask_logits.gather(1, labels.clamp(min=0)[:, None, None, None].expand(-1, 1, *mask_logits.shape[-2:]))
    bce = F.binary_cross_entropy_with_logits(channel[:, 0].float(), targets.float(), reduction="none")
    count = valid.sum() * mask_logits.shape[-1] * mask_logits.shape[-2]
    return torch.where(valid[:, None, None], bce, 0.0).sum() / count.clamp(min=1)


class MaskRoIHeads(RoIHeads):
    """:class:`RoIHeads` with torchvision's mask branch (``mask_roi_pool``, ``mask_head``, ``mask_predictor``, set by
    :meth:`set_mask_branch`). Training adds ``"loss_mask"`` (needs ``targets.masks``); inference returns
    :class:`MaskDetections`, whose ``masks`` are ``[B, K, 1, M, M]`` probabilities of each detection's class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_roi_pool = None
        self.mask_head = None
        self.mask_predictor = None

    def set_mask_branch(self, mask_roi_pool: nn.Module, mask_head: nn.Module, mask_predictor: nn.Module) -> None:
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor

    def mask_logits(self, features: dict[str, Tensor], boxes: Tensor, image_sizes) -> Tensor:
        """``[B * R, C, M, M]`` mask logits of ``boxes [B, R, 4]`` (image-major)."""
        B, R, _ = boxes.shape
        batch_index = torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(R)
        rois = torch.cat([batch_index[:, None], boxes.reshape(B * R, 4)], dim=1)
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, rois, image_sizes)))

    def forward(self, features: dict[str, Tensor], proposals: Proposals, image_sizes: list[tuple[int, int]],
                targets: PaddedTargets | None = None) -> tuple[Detections | MaskDetections | None, dict[str, Tensor]]:
        if self.mask_predictor is None:
            return super().forward(features, proposals, image_sizes, targets)
        if self.training:
            if targets is None or targets.masks is None:
                raise ValueError("Mask R-CNN training needs targets with 'masks'")
            boxes, labels, regression_targets, sampled, matched = self.sample_with_matches(proposals, targets)
            class_logits, box_regression = self._predict(features, boxes.detach(), image_sizes)
            losses = self.compute_loss(class_logits, box_regression, labels, regression_targets, sampled)
            losses["loss_mask"] = self.compute_mask_loss(features, boxes.detach(), labels, sampled, matched,
                                                         image_sizes, targets.masks)
            return None, losses
        detections, _ = super().forward(features, proposals, image_sizes)
        B, K = detections.labels.shape
        # Padding slots get zero masks; in eager CPU inference the mask head runs only on the slots some image fills.
        filled = torch.arange(K, device=detections.labels.device) < detections.num_detections[:, None]
        filled, boxes, labels = trim_padding(filled, detections.boxes, detections.labels)
        k = boxes.shape[1]
        probs = self.mask_logits(features, boxes, image_sizes).sigmoid()
        index = labels.reshape(B * k).clamp(min=0)[:, None, None, None].expand(-1, 1, *probs.shape[-2:])
        masks = probs.gather(1, index).reshape(B, k, 1, *probs.shape[-2:])
        masks = torch.where(filled[:, :, None, None, None], masks, 0.0)
        if k < K:
            masks = torch.cat([masks, masks.new_zeros(B, K - k, *masks.shape[2:])], dim=1)
        return MaskDetections(*detections, masks), {}

    def compute_mask_loss(self, features, boxes: Tensor, labels: Tensor, sampled: Tensor, matched: Tensor,
                          image_sizes, gt_masks: list[Tensor]) -> Tensor:
        """The positive sampled slots of each image, compacted to ``k`` padded slots (``k`` = the most positives of an
        image), through the mask branch; targets from :func:`fastdet.ops.project_masks_on_boxes`."""
        B, S = labels.shape
        positive = sampled & (labels > 0)
        # Slots for the most positives any image has: the mask head is the costliest part of training, and the
        # sampler's budget (128 per image by default) is usually far above the positives there are. Reading the
        # count is this branch's one host synchronisation (torchvision synchronises once per image here).
        k = max(1, int(positive.sum(dim=1).max()))
        index, valid = compact_mask(positive, k)
        mask_boxes = gather_rows(boxes, index)
        mask_labels = labels.gather(1, index)
        mask_matched = matched.gather(1, index)
        logits = self.mask_logits(features, mask_boxes, image_sizes)
        M = logits.shape[-1]
        # One native call per image: each image's masks have their own size (torchvision loops the same way).
        mask_targets = []
        for b in range(B):
            if gt_masks[b].shape[0] == 0:
                mask_targets.append(logits.new_zeros((k, M, M), dtype=torch.float32))
            else:
                mask_targets.append(project_masks_on_boxes(gt_masks[b], mask_boxes[b].float(), mask_matched[b], M))
        return mask_loss(logits, mask_labels.reshape(-1), torch.cat(mask_targets), valid.reshape(-1))
