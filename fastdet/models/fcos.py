"""FCOS (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection"), anchor-free, on ``fastdet.ops``.

Same contract, module layout and state-dict keys as torchvision's ``FCOS`` / ``fcos_resnet50_fpn``: a torchvision
state dict loads unchanged and gives the same detections and, for the same targets, the same losses.

* Every feature-map location is a point (torchvision represents it as a square "anchor" of the level's stride,
  centred on the point). The head predicts class logits, distances ``(l, t, r, b)`` to the box sides in units of the
  stride (linear box coding, ReLU'd), and a centerness logit.
* Training (centre sampling, batched over images): a point is assigned to a ground-truth box when it lies inside the
  box, within ``center_sampling_radius`` strides of the box centre, and the box's largest side distance from the
  point falls in the level's range ``(4 s, 8 s)`` (``0`` below on the finest level, no limit above on the coarsest);
  among several candidate boxes the smallest one wins. Losses (sums divided by the batch's number of foreground
  points): sigmoid focal loss over all points and classes, GIoU loss of the decoded boxes and binary cross-entropy of
  the centerness (target ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``) over the foreground points.
* Evaluation (:func:`fcos_select_detections`, fixed-size tensors, no host synchronisation): per level, scores
  ``sqrt(sigmoid(class) * sigmoid(centerness))``, the pairs above ``score_thresh``, the best ``topk_candidates``
  (ties: lower flat index), boxes decoded and clipped; all levels go through class-wise
  :func:`fastdet.ops.multiclass_nms` and the best ``detections_per_img`` are kept. As in torchvision, every class
  column is a class (with 91 COCO columns, column 0 can produce detections labelled 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from fastdet import ops
from fastdet.models._validation import check_images_and_targets
from fastdet.models.heads.fcos_head import (
    FCOSClassificationHead,
    FCOSHead,
    FCOSRegressionHead,
    fcos_assign_targets,
    fcos_select_detections,
    linear_box_decode,
    linear_box_encode,
)
from fastdet.models.postprocess import (
    check_nms_method,
    dense_anchors,
    features_as_list,
    image_sizes_tensor,
    split_detections,
)
from fastdet.models.targets import pad_targets
from fastdet.models.transform import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform, batched_postprocess_boxes
from fastdet.models.weights import plan_build

__all__ = [
    "FCOS",
    "FCOSClassificationHead",
    "FCOSHead",
    "FCOSRegressionHead",
    "fcos_assign_targets",
    "fcos_resnet50_fpn",
    "fcos_select_detections",
    "linear_box_decode",
    "linear_box_encode",
]


# --------------------------------------------------------------------------------------------------------------------
# the detector
# --------------------------------------------------------------------------------------------------------------------


def _default_point_generator() -> ops.AnchorGenerator:
    # One square per location whose side equals the level's stride (P3-P7: 8 ... 128): its centre is the FCOS point.
    return ops.AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)


class FCOS(nn.Module):
    """FCOS detector (torchvision-compatible arguments, attributes and state-dict keys).

    Args:
        backbone (nn.Module): returns a tensor or a dict of feature maps and has ``out_channels``.
        num_classes (int): class columns (torchvision's COCO model: 91, labels in ``[0, num_classes)``).
        min_size, max_size, image_mean, image_std: input transform (see :class:`DetectionTransform`); extra keyword
            arguments (``size_divisible``, ``fixed_size``) go to it too.
        anchor_generator (fastdet.ops.AnchorGenerator, optional): exactly one square per location (default: the
            stride, 8 ... 128 on five levels).
        head (nn.Module, optional): default :class:`FCOSHead`.
        center_sampling_radius (float): positives lie within this many strides of a box's centre.
        score_thresh, nms_thresh, detections_per_img, topk_candidates: detection selection (torchvision's values).
        nms_method (str): ``"hard"`` (greedy NMS, default), ``"soft"`` (gaussian soft-NMS) or ``"soft_linear"``
            (see :func:`fastdet.ops.multiclass_nms`).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, min_size=800, max_size: int = 1333,
                 image_mean: Sequence[float] | None = None, image_std: Sequence[float] | None = None,
                 anchor_generator: ops.AnchorGenerator | None = None, head: nn.Module | None = None,
                 center_sampling_radius: float = 1.5, score_thresh: float = 0.2, nms_thresh: float = 0.6,
                 detections_per_img: int = 100, topk_candidates: int = 1000, nms_method: str = "hard",
                 **transform_kwargs):
        super().__init__()
        self.nms_method = check_nms_method(nms_method)
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an out_channels attribute (the channel count of every feature map)")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if anchor_generator is None:
            anchor_generator = _default_point_generator()
        if not isinstance(anchor_generator, ops.AnchorGenerator):
            raise TypeError(f"anchor_generator must be a fastdet.ops.AnchorGenerator, got "
                            f"{type(anchor_generator).__name__}")
        if anchor_generator.num_anchors_per_location()[0] != 1:
            raise ValueError(f"FCOS needs exactly one anchor per location, got "
                             f"{anchor_generator.num_anchors_per_location()[0]}")
        for name, value in (("detections_per_img", detections_per_img), ("topk_candidates", topk_candidates)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("score_thresh", score_thresh), ("nms_thresh", nms_thresh),
                            ("center_sampling_radius", center_sampling_radius)):
            if not math.isfinite(float(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        self.backbone = backbone
        self.anchor_generator = anchor_generator
        self.head = head if head is not None else FCOSHead(backbone.out_channels, 1, num_classes)
        self.num_classes = num_classes
        self.transform = DetectionTransform(min_size, max_size, image_mean or IMAGENET_MEAN,
                                            image_std or IMAGENET_STD, **transform_kwargs)
        self.center_sampling_radius = float(center_sampling_radius)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates

    def replace_class_heads(self, num_classes: int) -> None:
        """Fine-tuning: a fresh ``cls_logits`` layer for ``num_classes`` on the loaded tower (prior-probability
        bias, as at construction), on the old layer's device and dtype."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        head = self.head.classification_head
        old = head.cls_logits
        head.cls_logits = head._logits_layer(old.in_channels, num_classes).to(old.weight.device, old.weight.dtype)
        head.num_classes = num_classes
        self.num_classes = num_classes

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        """Training: ``{"classification", "bbox_regression", "bbox_ctrness"}``; evaluation: one
        ``{"boxes", "scores", "labels"}`` per image, boxes in the original image's pixels."""
        check_images_and_targets(images, targets, self.training, self.num_classes)
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, targets = self.transform(images, targets)
        features = features_as_list(self.backbone(batch.tensors))
        head_outputs = self.head(features)
        anchors = dense_anchors(self.anchor_generator, batch, features)
        points_per_level = [f.shape[-2] * f.shape[-1] for f in features]
        if self.training:
            padded = pad_targets(targets, anchors.device)
            matched = fcos_assign_targets(padded.boxes, padded.valid, anchors, points_per_level,
                                          self.center_sampling_radius)
            return self.head.compute_loss(padded.boxes, padded.labels, head_outputs, anchors, matched)
        sizes = image_sizes_tensor(batch.image_sizes, anchors.device)
        boxes, scores, labels, num = fcos_select_detections(
            head_outputs["cls_logits"], head_outputs["bbox_regression"], head_outputs["bbox_ctrness"], anchors,
            points_per_level, sizes, self.score_thresh, self.topk_candidates, self.nms_thresh,
            self.detections_per_img, getattr(self, "nms_method", "hard"))
        boxes = batched_postprocess_boxes(boxes, batch.image_sizes, original_sizes)
        return split_detections(boxes, scores, labels, num)


def fcos_resnet50_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                      weights_backbone="IMAGENET1K_V1", trainable_backbone_layers: int | None = None,
                      **kwargs) -> FCOS:
    """FCOS with a ResNet-50 FPN backbone (P3-P7, 256 channels; P6 from P5): torchvision's ``fcos_resnet50_fpn``
    (signature, defaults, state-dict keys).

    ``weights``: ``FCOS_ResNet50_FPN_Weights`` (enum or name), a ``.pth`` path or a state dict. ``weights_backbone``
    defaults to ``ResNet50_Weights.IMAGENET1K_V1`` as in torchvision: the file must be in the hub cache (see
    :mod:`fastdet.models.weights`); pass ``weights_backbone=None`` for a randomly initialised model.
    ``trainable_backbone_layers`` (0-5): default 3 when pretrained, 5 otherwise. ``norm_layer`` (fastdet extra):
    the ResNet's normalisation (default ``FrozenBatchNorm2d`` when pretrained, ``BatchNorm2d`` otherwise). Other
    keyword arguments go to :class:`FCOS`."""
    from fastdet.models import backbones

    plan = plan_build("FCOS_ResNet50_FPN_Weights", "ResNet50_Weights", weights=weights,
                      weights_backbone=weights_backbone, num_classes=num_classes,
                      trainable_backbone_layers=trainable_backbone_layers, max_trainable_layers=5,
                      default_trainable_layers=3, progress=progress, norm_layer=kwargs.pop("norm_layer", None))
    backbone = backbones.resnet_fpn_backbone(50, trainable_layers=plan.trainable_backbone_layers,
                                             returned_layers=[2, 3, 4], extra_blocks=backbones.LastLevelP6P7(256, 256),
                                             norm_layer=plan.norm_layer,
                                             body_state_dict=plan.backbone_state_dict(progress))
    return plan.load_into(FCOS(backbone, plan.num_classes, **kwargs), progress)
