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
from collections.abc import Sequence
from functools import partial

from torch import Tensor, nn

from fastdet import ops
from fastdet.models._validation import check_images_and_targets
from fastdet.models.heads.retinanet_head import (
    BOX_LOSS_TYPES,
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
    retinanet_select_detections,
)
from fastdet.models.matching import match_anchors
from fastdet.models.postprocess import (
    check_nms_method,
    dense_anchors,
    features_as_list,
    image_sizes_tensor,
    split_detections,
)
from fastdet.models.targets import pad_targets
from fastdet.models.transform import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectionTransform,
    ImageBatch,
    batched_postprocess_boxes,
)
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

# --------------------------------------------------------------------------------------------------------------------
# the detector
# --------------------------------------------------------------------------------------------------------------------


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
        check_nms_method(nms_method)
        if bbox_loss_type not in BOX_LOSS_TYPES:
            raise ValueError(f"bbox_loss_type must be one of {BOX_LOSS_TYPES}, got {bbox_loss_type!r}")
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
        self.transform = DetectionTransform(min_size, max_size, image_mean or IMAGENET_MEAN,
                                            image_std or IMAGENET_STD, **transform_kwargs)
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
        padded = pad_targets(targets, anchors.device)
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
