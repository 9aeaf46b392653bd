"""Mask R-CNN (He et al. 2017) with FPN: Faster R-CNN plus a mask branch, torchvision's architecture, defaults and
checkpoint layout (``roi_heads.mask_roi_pool``, ``roi_heads.mask_head``, ``roi_heads.mask_predictor``), so
``maskrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn_v2`` load torchvision's state dicts unchanged and give the same
detections and masks.

The mask branch, on top of :class:`fastdet.models.faster_rcnn.FasterRCNN`:

* training: the positive sampled proposals of every image (compacted into as many padded slots as the image with the
  most positives needs: one host synchronisation) are pooled at 14 x 14, run through the mask
  head and predictor (28 x 28 logits per class), and the loss is the binary cross-entropy of the matched ground-truth
  class's channel against the ground-truth mask resampled onto the proposal
  (:func:`fastdet.ops.project_masks_on_boxes`, reading the uint8/bool masks directly), averaged over all positive
  proposals' pixels: torchvision's ``maskrcnn_loss``. Ground-truth masks go in the targets as ``"masks"``
  (``Tensor[N, H, W]`` uint8/bool, one per box) and are resized with their image.
* inference: the padded ``[B, K]`` detections are pooled and run through the mask branch in one batch; each
  detection keeps the sigmoid of its class's channel; :meth:`MaskRCNN.forward` pastes them into the original image
  (:func:`fastdet.ops.paste_masks_in_image`, one native pass per image): ``"masks"`` ``Tensor[N, 1, H, W]``
  probabilities, as torchvision.
"""

from __future__ import annotations

from torch import Tensor, nn

from fastdet.models._validation import check_images_and_targets
from fastdet.models.faster_rcnn import FasterRCNN, resnet_fpn_two_stage_parts, split_detections
from fastdet.models.heads.mask_head import (  # noqa: F401  (mask_loss: importable from here as before)
    MaskDetections,
    MaskRCNNHeads,
    MaskRCNNPredictor,
    MaskRoIHeads,
    mask_loss,
)
from fastdet.ops import MultiScaleRoIAlign, paste_masks_in_image

__all__ = [
    "MaskRCNN",
    "MaskDetections",
    "MaskRCNNHeads",
    "MaskRCNNPredictor",
    "MaskRoIHeads",
    "maskrcnn_resnet18_fpn",
    "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2",
]


class MaskRCNN(FasterRCNN):
    """Mask R-CNN: :class:`FasterRCNN` (same arguments) plus the mask branch (module docstring).

    Extra args (torchvision's):
        mask_roi_pool: default ``MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)``.
        mask_head: default ``MaskRCNNHeads(backbone.out_channels, (256, 256, 256, 256), 1)``.
        mask_predictor: default ``MaskRCNNPredictor(256, 256, num_classes)``; give either it or ``num_classes``.

    Targets (training) also need ``"masks"``: ``Tensor[N, H, W]`` (uint8 or bool) of the image's size, one per box.
    Evaluation returns ``{"boxes", "labels", "scores", "masks"}`` per image, ``masks`` ``Tensor[N, 1, H, W]``
    probabilities in the original image's pixels.
    """

    roi_heads_class = MaskRoIHeads
    uses_target_masks = True

    def __init__(self, backbone: nn.Module, num_classes: int | None = None, *, mask_roi_pool: nn.Module | None = None,
                 mask_head: nn.Module | None = None, mask_predictor: nn.Module | None = None, **kwargs):
        if num_classes is not None and mask_predictor is not None:
            raise ValueError("num_classes must be None when mask_predictor is given")
        super().__init__(backbone, num_classes, **kwargs)
        if mask_roi_pool is None:
            mask_roi_pool = MultiScaleRoIAlign(featmap_names=["0", "1", "2", "3"], output_size=14, sampling_ratio=2)
        if mask_head is None:
            mask_head = MaskRCNNHeads(backbone.out_channels, (256, 256, 256, 256), 1)
        if mask_predictor is None:
            mask_predictor = MaskRCNNPredictor(256, 256, self.num_classes)
        self.roi_heads.set_mask_branch(mask_roi_pool, mask_head, mask_predictor)

    def replace_class_heads(self, num_classes: int) -> None:
        """Fine-tuning: fresh box and mask predictors for ``num_classes`` (background included), torchvision's
        tutorial recipe; the rest stays as loaded."""
        super().replace_class_heads(num_classes)
        old = self.roi_heads.mask_predictor
        conv = old.conv5_mask
        self.roi_heads.mask_predictor = MaskRCNNPredictor(conv.in_channels, conv.out_channels, num_classes).to(
            conv.weight.device, conv.weight.dtype)

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        check_images_and_targets(images, targets, self.training, self.num_classes, min_label=1)
        if self.training:
            check_target_masks(images, targets)
            return self.compute_losses(images, targets)
        results = split_detections(self.detect(images))
        for result, image in zip(results, images):
            result["masks"] = paste_masks_in_image(result["masks"], result["boxes"], tuple(image.shape[-2:]))
        return results


def check_target_masks(images: list[Tensor], targets: list[dict[str, Tensor]]) -> None:
    """Every training target needs ``"masks"``: an integer/bool ``Tensor[N, H, W]`` with one mask per box, of its
    image's size."""
    for i, (image, target) in enumerate(zip(images, targets)):
        masks = target.get("masks")
        if not isinstance(masks, Tensor):
            raise ValueError(f"targets[{i}] needs 'masks' (Tensor[N, H, W], one per box) to train Mask R-CNN")
        n = target["boxes"].shape[0]
        if masks.dim() != 3 or masks.shape[0] != n or tuple(masks.shape[1:]) != tuple(image.shape[-2:]):
            raise ValueError(f"targets[{i}]['masks'] must have shape [N, H, W] = [{n}, {image.shape[-2]}, "
                             f"{image.shape[-1]}] (one mask per box, the image's size), got {tuple(masks.shape)}")
        if masks.is_floating_point() or masks.is_complex():
            raise TypeError(f"targets[{i}]['masks'] must be uint8 or bool, got {masks.dtype}")


# -- builders ---------------------------------------------------------------------------------------------------------
# torchvision's signature and rules (fastdet.models.weights.plan_build); ``norm_layer`` is a fastdet extra.


def maskrcnn_resnet50_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                          weights_backbone=None, trainable_backbone_layers: int | None = None, **kwargs) -> MaskRCNN:
    """Mask R-CNN, ResNet-50 FPN: torchvision's ``maskrcnn_resnet50_fpn`` (same signature, defaults and state dict;
    ``MaskRCNN_ResNet50_FPN_Weights``). Arguments as :func:`fastdet.models.fasterrcnn_resnet50_fpn`; ``kwargs`` go to
    :class:`MaskRCNN`."""
    plan, backbone, parts = resnet_fpn_two_stage_parts(
        50, "MaskRCNN_ResNet50_FPN_Weights", weights=weights, progress=progress, num_classes=num_classes,
        weights_backbone=weights_backbone, trainable_backbone_layers=trainable_backbone_layers, kwargs=kwargs)
    return plan.load_into(MaskRCNN(backbone, num_classes=plan.num_classes, **parts, **kwargs), progress)


def maskrcnn_resnet50_fpn_v2(*, weights=None, progress: bool = True, num_classes: int | None = None,
                             weights_backbone=None, trainable_backbone_layers: int | None = None,
                             **kwargs) -> MaskRCNN:
    """The improved Mask R-CNN of Li et al. 2021 (torchvision's ``maskrcnn_resnet50_fpn_v2``): batch norm in the FPN,
    in a four-conv + one-FC box head and in the mask head, a two-conv RPN head; the ResNet keeps trainable
    ``BatchNorm2d`` unless ``norm_layer`` says otherwise. Arguments as :func:`maskrcnn_resnet50_fpn`
    (``MaskRCNN_ResNet50_FPN_V2_Weights``)."""
    plan, backbone, parts = resnet_fpn_two_stage_parts(
        50, "MaskRCNN_ResNet50_FPN_V2_Weights", weights=weights, progress=progress, num_classes=num_classes,
        weights_backbone=weights_backbone, trainable_backbone_layers=trainable_backbone_layers, kwargs=kwargs, v2=True)
    mask_head = MaskRCNNHeads(backbone.out_channels, [256, 256, 256, 256], 1, norm_layer=nn.BatchNorm2d)
    return plan.load_into(MaskRCNN(backbone, num_classes=plan.num_classes, mask_head=mask_head, **parts, **kwargs),
                          progress)


def maskrcnn_resnet18_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                          weights_backbone=None, trainable_backbone_layers: int | None = None, **kwargs) -> MaskRCNN:
    """A light Mask R-CNN (ResNet-18 FPN, same code; fastdet's, no published weights) that trains on a CPU: input
    ``min_size`` 320 / ``max_size`` 512 by default, frozen batch norm, every stage trainable unless ImageNet
    ``weights_backbone`` (``ResNet18_Weights``) are given. ``weights`` takes a ``.pth`` path or a state dict."""
    plan, backbone, parts = resnet_fpn_two_stage_parts(
        18, None, weights=weights, progress=progress, num_classes=num_classes, weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers, kwargs=kwargs)
    return plan.load_into(MaskRCNN(backbone, num_classes=plan.num_classes, **parts, **kwargs), progress)
