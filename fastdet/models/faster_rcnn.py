"""Faster R-CNN (Ren et al. 2015) with FPN, torchvision's architecture, defaults and checkpoint layout.

``FasterRCNN(backbone, num_classes, ...)`` takes torchvision's constructor arguments; the module tree
(``transform``, ``backbone.body``, ``backbone.fpn``, ``rpn.head``, ``roi_heads.box_head``, ``roi_heads.box_predictor``)
and so the state dict are torchvision's, and ``fasterrcnn_resnet50_fpn(num_classes=91)`` loads a torchvision
``fasterrcnn_resnet50_fpn`` state dict unchanged and gives the same detections.

Differences from torchvision, all in how the work is done rather than in the results:

* Proposal filtering and detection selection run on padded, fixed-size tensors for the whole batch
  (:func:`fastdet.models.rpn.select_proposals`, :func:`fastdet.models.roi_heads.select_detections`): no per-image
  loop and no host synchronisation. The only synchronisation of an inference call is the final split of the padded
  ``[B, K]`` detections into one dict per image (it reads ``num_detections``, see :func:`split_detections`);
  :meth:`FasterRCNN.detect` returns the padded tensors instead and never synchronises.
* Training targets are matched and sampled for the whole batch at once (same rules; the random draws differ).
* Post-processing decodes in float32 under autocast (torchvision decodes in the autocast dtype).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from fastdet.models._validation import check_images_and_targets
from fastdet.models.backbones.resnet import resnet_fpn_backbone
from fastdet.models.heads.roi_heads import (
    Detections,
    FastRCNNConvFCHead,
    RoIHeads,
    box_branch,
)
from fastdet.models.heads.rpn import RegionProposalNetwork, RPNHead
from fastdet.models.layers import FrozenBatchNorm2d
from fastdet.models.postprocess import split_padded
from fastdet.models.targets import pad_targets
from fastdet.models.transform import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform, batched_postprocess_boxes
from fastdet.models.weights import plan_build
from fastdet.ops import AnchorGenerator

__all__ = ["FasterRCNN", "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
           "fasterrcnn_resnet18_fpn", "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "split_detections"]


def fpn_anchor_generator() -> AnchorGenerator:
    """torchvision's FPN anchors: one size per level (32 ... 512), ratios 0.5, 1, 2: 3 anchors per location."""
    return AnchorGenerator(sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5)


def paper_anchor_generator() -> AnchorGenerator:
    """The paper's anchors for a single feature map: sizes 128, 256, 512 x ratios 0.5, 1, 2: 9 per location."""
    return AnchorGenerator(sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))


def split_detections(detections: Detections) -> list[dict[str, Tensor]]:
    """Padded ``[B, K]`` detections -> one ``{"boxes", "labels", "scores"}`` dict per image (plus ``"masks"`` when the
    detections carry them).

    This reads ``num_detections`` on the host (one device synchronisation for the whole batch): the per-image tensors
    have data-dependent lengths. It is deliberately kept out of the selection functions, which stay
    synchronisation-free.
    """
    fields = {"boxes": detections.boxes, "labels": detections.labels, "scores": detections.scores}
    masks = getattr(detections, "masks", None)  # Mask R-CNN's MaskDetections
    if masks is not None:
        fields["masks"] = masks
    return split_padded(detections.num_detections, **fields)


class FasterRCNN(nn.Module):
    """Faster R-CNN: transform -> backbone -> RPN -> RoI heads, torchvision's detection contract.

    ``model(images, targets=None)``: ``images`` a list of float ``Tensor[3, H, W]`` in 0..1 (any sizes); ``targets``
    (training) a list of ``{"boxes": Tensor[N, 4] xyxy pixels, "labels": Tensor[N] int64 in [1, num_classes)}``
    (label 0 is background; ``N = 0`` trains the image as background). Training returns
    ``{"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}``; evaluation returns one
    ``{"boxes", "labels", "scores"}`` dict per image, boxes in the original image's pixels.

    Args (torchvision's names and defaults):
        backbone (nn.Module): returns an OrderedDict of feature maps (or one tensor) and has ``out_channels``.
        num_classes (int): including background. Required unless ``box_predictor`` is given.
        min_size, max_size, image_mean, image_std, size_divisible, fixed_size: see :class:`DetectionTransform`.
        rpn_anchor_generator: default :func:`fpn_anchor_generator` (needs 5 feature maps); use
            :func:`paper_anchor_generator` with a single-map backbone for the original 9-anchor configuration.
        rpn_head, rpn_pre_nms_top_n_train/test, rpn_post_nms_top_n_train/test, rpn_nms_thresh, rpn_fg_iou_thresh,
        rpn_bg_iou_thresh, rpn_batch_size_per_image, rpn_positive_fraction, rpn_score_thresh: the RPN.
        box_roi_pool: default ``MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)`` (or ``["0"]`` for a single map).
        box_head, box_predictor, box_score_thresh, box_nms_thresh, box_detections_per_img, box_fg_iou_thresh,
        box_bg_iou_thresh, box_batch_size_per_image, box_positive_fraction, bbox_reg_weights: the box branch.
        box_pre_nms_top_k (int, optional): cap on candidates per image entering the final NMS (None = all, exact).
        nms_method (str): the final NMS: ``"hard"`` (default, torchvision's), ``"soft"`` (gaussian soft-NMS) or
            ``"soft_linear"`` (see :func:`fastdet.ops.multiclass_nms`); the RPN keeps greedy NMS.
    """

    # The RoI heads built by __init__; a detector with more branches (Mask R-CNN) subclasses both.
    roi_heads_class = RoIHeads
    # Whether the RoI heads train on the targets' instance masks (moved to the device with the padded targets).
    uses_target_masks = False

    def __init__(self, backbone: nn.Module, num_classes: int | None = None, min_size=800, max_size: int = 1333,
                 image_mean=None, image_std=None, size_divisible: int = 32, fixed_size=None,
                 rpn_anchor_generator: nn.Module | None = None, rpn_head: nn.Module | None = None,
                 rpn_pre_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 1000,
                 rpn_post_nms_top_n_train: int = 2000, rpn_post_nms_top_n_test: int = 1000,
                 rpn_nms_thresh: float = 0.7, rpn_fg_iou_thresh: float = 0.7, rpn_bg_iou_thresh: float = 0.3,
                 rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
                 rpn_score_thresh: float = 0.0, box_roi_pool: nn.Module | None = None,
                 box_head: nn.Module | None = None, box_predictor: nn.Module | None = None,
                 box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5, box_detections_per_img: int = 100,
                 box_fg_iou_thresh: float = 0.5, box_bg_iou_thresh: float = 0.5,
                 box_batch_size_per_image: int = 512, box_positive_fraction: float = 0.25,
                 bbox_reg_weights=None, box_pre_nms_top_k: int | None = None, nms_method: str = "hard"):
        super().__init__()
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an 'out_channels' attribute (channels of its feature maps)")
        out_channels = backbone.out_channels
        if rpn_anchor_generator is None:
            rpn_anchor_generator = fpn_anchor_generator()
        if rpn_head is None:
            rpn_head = RPNHead(out_channels, rpn_anchor_generator.num_anchors_per_location()[0])
        # After the RPN head, as torchvision: the random initialisations are drawn in its order.
        box_roi_pool, box_head, box_predictor, self.num_classes = box_branch(
            out_channels, num_classes, box_roi_pool, box_head, box_predictor)
        self.transform = DetectionTransform(min_size, max_size, image_mean or IMAGENET_MEAN, image_std or IMAGENET_STD,
                                            size_divisible=size_divisible, fixed_size=fixed_size)
        self.backbone = backbone
        self.rpn = RegionProposalNetwork(
            rpn_anchor_generator, rpn_head, rpn_fg_iou_thresh, rpn_bg_iou_thresh, rpn_batch_size_per_image,
            rpn_positive_fraction, {"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            {"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test}, rpn_nms_thresh,
            score_thresh=rpn_score_thresh)
        self.roi_heads = self.roi_heads_class(
            box_roi_pool, box_head, box_predictor, box_fg_iou_thresh, box_bg_iou_thresh, box_batch_size_per_image,
            box_positive_fraction, bbox_reg_weights, box_score_thresh, box_nms_thresh, box_detections_per_img,
            box_pre_nms_top_k, nms_method)

    def replace_class_heads(self, num_classes: int) -> None:
        """Fine-tuning: a fresh ``FastRCNNPredictor`` for ``num_classes`` (background included) on the same features,
        on the old predictor's device and dtype (torchvision's tutorial recipe); the rest stays as loaded."""
        self.roi_heads.replace_box_predictor(num_classes)
        self.num_classes = num_classes

    def _features(self, images: Tensor) -> OrderedDict[str, Tensor]:
        features = self.backbone(images)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        return features

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        check_images_and_targets(images, targets, self.training, self.num_classes, min_label=1)
        if self.training:
            return self.compute_losses(images, targets)
        return split_detections(self.detect(images))

    def compute_losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Training losses for a batch (inputs are assumed checked, as by :meth:`forward`)."""
        batch, resized_targets = self.transform(images, targets)
        padded = pad_targets(resized_targets, batch.tensors.device, with_masks=self.uses_target_masks)
        features = self._features(batch.tensors)
        proposals, rpn_losses = self.rpn(batch, features, padded)
        _, head_losses = self.roi_heads(features, proposals, batch.image_sizes, padded)
        return {**head_losses, **rpn_losses}

    def detect(self, images: list[Tensor]) -> Detections:
        """Padded detections ``[B, K]`` in original-image pixels, without host synchronisation after the
        transform on CUDA and under torch.compile / export (see :class:`fastdet.models.roi_heads.Detections`; eager
        CPU inference reads the proposal count to skip the padding slots, which costs nothing there)."""
        original_sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        batch, _ = self.transform(images, None)
        features = self._features(batch.tensors)
        proposals, _ = self.rpn(batch, features)
        detections, _ = self.roi_heads(features, proposals, batch.image_sizes)
        boxes = batched_postprocess_boxes(detections.boxes, batch.image_sizes, original_sizes)
        return detections._replace(boxes=boxes)


# -- builders ---------------------------------------------------------------------------------------------------------
# torchvision's signature and rules (fastdet.models.weights.plan_build); ``norm_layer`` is a fastdet extra.


def resnet_fpn_two_stage_parts(depth: int, weights_name: str | None, *, weights, progress: bool, num_classes,
                                weights_backbone, trainable_backbone_layers, kwargs: dict, v2: bool = False):
    """What the ResNet-FPN two-stage builders (Faster R-CNN, Mask R-CNN; v1, v2 and the light ResNet-18 ones) share:
    torchvision's weight rules (:func:`plan_build`), the backbone, and for ``v2`` the batch-norm FPN, two-conv RPN
    head and four-conv + one-FC box head. Pops ``norm_layer`` from ``kwargs`` (default: FrozenBatchNorm2d for
    ResNet-18, trainable BatchNorm2d for v2, torchvision's rule otherwise) and sets the light models' input size.
    Returns ``(plan, backbone, model_kwargs)``."""
    default_norm = {18: FrozenBatchNorm2d}.get(depth, nn.BatchNorm2d if v2 else None)
    plan = plan_build(weights_name, f"ResNet{depth}_Weights", weights=weights, weights_backbone=weights_backbone,
                      num_classes=num_classes, trainable_backbone_layers=trainable_backbone_layers,
                      max_trainable_layers=5, default_trainable_layers=3, progress=progress,
                      norm_layer=kwargs.pop("norm_layer", default_norm))
    if depth == 18:
        kwargs.setdefault("min_size", 320)
        kwargs.setdefault("max_size", 512)
    backbone = resnet_fpn_backbone(depth, trainable_layers=plan.trainable_backbone_layers, norm_layer=plan.norm_layer,
                                   body_state_dict=plan.backbone_state_dict(progress),
                                   **({"fpn_norm_layer": nn.BatchNorm2d} if v2 else {}))
    parts = {}
    if v2:
        anchor_generator = fpn_anchor_generator()
        parts = dict(
            rpn_anchor_generator=anchor_generator,
            rpn_head=RPNHead(backbone.out_channels, anchor_generator.num_anchors_per_location()[0], conv_depth=2),
            box_head=FastRCNNConvFCHead((backbone.out_channels, 7, 7), [256, 256, 256, 256], [1024],
                                        norm_layer=nn.BatchNorm2d),
        )
    return plan, backbone, parts


def fasterrcnn_resnet50_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                            weights_backbone=None, trainable_backbone_layers: int | None = None,
                            **kwargs) -> FasterRCNN:
    """Faster R-CNN, ResNet-50 FPN: torchvision's ``fasterrcnn_resnet50_fpn`` (same signature, defaults and state
    dict).

    Args:
        weights: ``FasterRCNN_ResNet50_FPN_Weights`` (enum, ``"DEFAULT"``/``"COCO_V1"``), a ``.pth`` path or a state
            dict; see :mod:`fastdet.models.weights` (no download unless allowed).
        progress (bool): progress bar when a download is allowed.
        num_classes (int, optional): background included; from the weights when given, else 91.
        weights_backbone: ``ResNet50_Weights`` (ImageNet), a path or a state dict; ignored when ``weights`` is given.
        trainable_backbone_layers (int in [0, 5], optional): ResNet stages trained, from ``layer4`` down; default 3
            when anything is pretrained, 5 otherwise.
        norm_layer (fastdet extra): the ResNet's normalisation; default ``FrozenBatchNorm2d`` when pretrained and
            ``BatchNorm2d`` otherwise (torchvision's rule); also ``"FrozenBatchNorm2d"`` / ``"BatchNorm2d"``.
        **kwargs: :class:`FasterRCNN` arguments.
    """
    plan, backbone, parts = resnet_fpn_two_stage_parts(
        50, "FasterRCNN_ResNet50_FPN_Weights", weights=weights, progress=progress, num_classes=num_classes,
        weights_backbone=weights_backbone, trainable_backbone_layers=trainable_backbone_layers, kwargs=kwargs)
    return plan.load_into(FasterRCNN(backbone, num_classes=plan.num_classes, **parts, **kwargs), progress)


def fasterrcnn_resnet50_fpn_v2(*, weights=None, progress: bool = True, num_classes: int | None = None,
                               weights_backbone=None, trainable_backbone_layers: int | None = None,
                               **kwargs) -> FasterRCNN:
    """The improved Faster R-CNN of Li et al. 2021 (torchvision's ``fasterrcnn_resnet50_fpn_v2``): batch norm in the
    FPN and in a four-conv + one-FC box head, a two-conv RPN head. The ResNet keeps trainable ``BatchNorm2d``
    (torchvision's choice for this model, pretrained or not) unless ``norm_layer`` says otherwise. Arguments as
    :func:`fasterrcnn_resnet50_fpn` (``FasterRCNN_ResNet50_FPN_V2_Weights``)."""
    plan, backbone, parts = resnet_fpn_two_stage_parts(
        50, "FasterRCNN_ResNet50_FPN_V2_Weights", weights=weights, progress=progress, num_classes=num_classes,
        weights_backbone=weights_backbone, trainable_backbone_layers=trainable_backbone_layers, kwargs=kwargs, v2=True)
    return plan.load_into(FasterRCNN(backbone, num_classes=plan.num_classes, **parts, **kwargs), progress)


def fasterrcnn_resnet18_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                            weights_backbone=None, trainable_backbone_layers: int | None = None,
                            **kwargs) -> FasterRCNN:
    """A light Faster R-CNN (ResNet-18 FPN, same code; fastdet's, no published detection weights) that trains on a
    CPU: smaller input (``min_size`` 320, ``max_size`` 512 by default), frozen batch norm (``norm_layer`` changes
    it) and every backbone stage trainable unless ImageNet ``weights_backbone`` (``ResNet18_Weights``) are given
    (then 3). ``weights`` takes a ``.pth`` path or a state dict."""
    plan, backbone, parts = resnet_fpn_two_stage_parts(
        18, None, weights=weights, progress=progress, num_classes=num_classes, weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers, kwargs=kwargs)
    return plan.load_into(FasterRCNN(backbone, num_classes=plan.num_classes, **parts, **kwargs), progress)


def _fasterrcnn_mobilenet_v3_large_fpn(weights_enum: str, weights, progress: bool, num_classes: int | None,
                                       weights_backbone, trainable_backbone_layers: int | None,
                                       **kwargs) -> FasterRCNN:
    from fastdet.models.backbones.mobilenet import mobilenet_fpn_backbone, mobilenet_v3_large

    plan = plan_build(weights_enum, "MobileNet_V3_Large_Weights", weights=weights, weights_backbone=weights_backbone,
                      num_classes=num_classes, trainable_backbone_layers=trainable_backbone_layers,
                      max_trainable_layers=6, default_trainable_layers=3, progress=progress,
                      norm_layer=kwargs.pop("norm_layer", None))
    network = mobilenet_v3_large(norm_layer=plan.norm_layer)
    backbone_weights = plan.backbone_state_dict(progress)
    if backbone_weights is not None:
        network.load_state_dict(backbone_weights)
    backbone = mobilenet_fpn_backbone(network, plan.trainable_backbone_layers)
    # Five sizes x three ratios on each of the three levels (two FPN outputs and the max-pool level).
    anchor_generator = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    model = FasterRCNN(backbone, num_classes=plan.num_classes, rpn_anchor_generator=anchor_generator, **kwargs)
    return plan.load_into(model, progress)


def fasterrcnn_mobilenet_v3_large_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                                      weights_backbone="IMAGENET1K_V1", trainable_backbone_layers: int | None = None,
                                      **kwargs) -> FasterRCNN:
    """Faster R-CNN on a MobileNetV3-Large FPN (torchvision's ``fasterrcnn_mobilenet_v3_large_fpn``: signature,
    defaults, state dict). ``weights``: ``FasterRCNN_MobileNet_V3_Large_FPN_Weights``; ``weights_backbone``
    defaults to ``MobileNet_V3_Large_Weights.IMAGENET1K_V1`` as in torchvision (the file must be in the hub cache,
    see :mod:`fastdet.models.weights`; pass ``None`` for a random backbone); ``trainable_backbone_layers`` in
    [0, 6] (default 3 when pretrained, 6 otherwise). RPN score threshold 0.05 by default; other keyword arguments
    go to :class:`FasterRCNN`."""
    kwargs = {"rpn_score_thresh": 0.05, **kwargs}
    return _fasterrcnn_mobilenet_v3_large_fpn("FasterRCNN_MobileNet_V3_Large_FPN_Weights", weights, progress,
                                              num_classes, weights_backbone, trainable_backbone_layers, **kwargs)


def fasterrcnn_mobilenet_v3_large_320_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                                          weights_backbone="IMAGENET1K_V1",
                                          trainable_backbone_layers: int | None = None, **kwargs) -> FasterRCNN:
    """The low-resolution variant of :func:`fasterrcnn_mobilenet_v3_large_fpn` (torchvision's
    ``fasterrcnn_mobilenet_v3_large_320_fpn``): images resized to 320-640 px, 150 proposals before and after NMS at
    test time, RPN score threshold 0.05. ``weights``: ``FasterRCNN_MobileNet_V3_Large_320_FPN_Weights``."""
    kwargs = {"min_size": 320, "max_size": 640, "rpn_pre_nms_top_n_test": 150, "rpn_post_nms_top_n_test": 150,
              "rpn_score_thresh": 0.05, **kwargs}
    return _fasterrcnn_mobilenet_v3_large_fpn("FasterRCNN_MobileNet_V3_Large_320_FPN_Weights", weights, progress,
                                              num_classes, weights_backbone, trainable_backbone_layers, **kwargs)
