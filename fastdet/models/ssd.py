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

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastdet import ops
from fastdet.models._validation import check_images_and_targets
from fastdet.models.backbones.vgg import VGG16SSDFeatures, freeze_vgg_stages, load_vgg16_features
from fastdet.models.heads.ssd_head import (
    SSD_BOX_WEIGHTS,
    SSDClassificationHead,
    SSDHead,
    SSDRegressionHead,
    match_default_boxes,
    ssd_loss,
    ssd_select_detections,
)
from fastdet.models.layers import xavier_init
from fastdet.models.postprocess import (
    check_nms_method,
    features_as_list,
    image_sizes_tensor,
    probe_out_channels,
    split_detections,
)
from fastdet.models.targets import pad_targets
from fastdet.models.transform import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform, batched_postprocess_boxes
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


# --------------------------------------------------------------------------------------------------------------------
# heads
# --------------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------------
# VGG-16 feature extractor (torchvision's SSD300 layout and key names)
# --------------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------------
# matching and loss
# --------------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------------
# detection selection (batched, fixed-size, no host synchronisation)
# --------------------------------------------------------------------------------------------------------------------


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
        nms_method (str): ``"hard"`` (greedy NMS, default), ``"soft"`` (gaussian soft-NMS) or ``"soft_linear"``
            (see :func:`fastdet.ops.multiclass_nms`).
    """

    def __init__(self, backbone: nn.Module, anchor_generator: ops.DefaultBoxGenerator, size: tuple[int, int],
                 num_classes: int, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, head: nn.Module | None = None,
                 score_thresh: float = 0.01, nms_thresh: float = 0.45, detections_per_img: int = 200,
                 iou_thresh: float = 0.5, topk_candidates: int = 400, positive_fraction: float = 0.25,
                 nms_method: str = "hard", **transform_kwargs):
        super().__init__()
        self.nms_method = check_nms_method(nms_method)
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
        self.box_coder = ops.BoxCoder(weights=SSD_BOX_WEIGHTS)
        if head is None:
            out_channels = getattr(backbone, "out_channels", None)
            if out_channels is None:
                out_channels = probe_out_channels(backbone, size)
            if len(out_channels) != len(anchor_generator.aspect_ratios):
                raise ValueError(f"the backbone gives {len(out_channels)} feature maps but the anchor generator has "
                                 f"{len(anchor_generator.aspect_ratios)} levels of aspect ratios")
            head = SSDHead(out_channels, anchor_generator.num_anchors_per_location(), num_classes)
        self.head = head
        self.num_classes = num_classes
        self.iou_thresh = float(iou_thresh)
        self.transform = DetectionTransform(min(size), max(size), image_mean or IMAGENET_MEAN,
                                            image_std or IMAGENET_STD, size_divisible=1, fixed_size=size,
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
            getattr(head, "init_logits", xavier_init)(fresh)
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
            padded = pad_targets(targets, default_boxes.device)
            matched = match_default_boxes(padded.boxes, padded.valid, default_boxes, self.iou_thresh)
            return ssd_loss(head_outputs["cls_logits"], head_outputs["bbox_regression"], padded, default_boxes,
                            matched, self.neg_to_pos_ratio)
        sizes = image_sizes_tensor(batch.image_sizes, default_boxes.device)
        boxes, scores, labels, num = ssd_select_detections(
            head_outputs["cls_logits"], head_outputs["bbox_regression"], default_boxes, sizes, self.score_thresh,
            self.topk_candidates, self.nms_thresh, self.detections_per_img, getattr(self, "nms_method", "hard"))
        boxes = batched_postprocess_boxes(boxes, batch.image_sizes, original_sizes)
        return split_detections(boxes, scores, labels, num)


# --------------------------------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------------------------------


def _ssd300_default_boxes() -> ops.DefaultBoxGenerator:
    return ops.DefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                   scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
                                   steps=[8, 16, 32, 64, 100, 300])


def _ssd300(width: float, plan, progress: bool, **kwargs) -> SSD:
    if "size" in kwargs:
        raise ValueError("SSD300's input size is fixed at (300, 300); do not pass size")
    backbone = VGG16SSDFeatures(width)
    backbone_weights = plan.backbone_state_dict(progress)
    if backbone_weights is not None:
        load_vgg16_features(backbone, backbone_weights)
    freeze_vgg_stages(backbone, plan.trainable_backbone_layers)
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
