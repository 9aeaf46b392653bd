"""Fast R-CNN (Girshick 2015): RoI pooling from one forward pass of the backbone and joint classification +
class-specific box regression, on *external* proposals (selective search, a proposals file, another model).

Here it is the modern form of Fast R-CNN: Faster R-CNN without its RPN. The backbone (ResNet + FPN) and the RoI heads
(:class:`fastdet.models.heads.roi_heads.RoIHeads`: multi-scale RoI Align, two FC layers, classifier and per-class
box deltas, torchvision's sampling and ``loss_classifier`` / ``loss_box_reg``) are Faster R-CNN's, module for module,
so a Faster R-CNN checkpoint loads without its ``rpn.*`` keys, and the model given the Faster R-CNN's own RPN
proposals detects exactly what that Faster R-CNN detects. The paper's VGG-16 with single-scale 7 x 7 RoI max pooling
is the same recipe on another backbone / pool (``box_roi_pool`` accepts
``SingleMapRoIPool(fastdet.ops.RoIPool((7, 7), 1 / 16))``).

Proposals: see :mod:`fastdet.models.proposals` (``model(images, proposals)``, or the ``proposal_generator``, by
default selective search in fast mode with 2,000 boxes per training image and 1,000 per test image).
"""

from __future__ import annotations

from torch import nn

from fastdet.models.faster_rcnn import resnet_fpn_two_stage_parts
from fastdet.models.heads.roi_heads import box_branch
from fastdet.models.proposals import ProposalDetector

__all__ = ["FastRCNN", "fast_rcnn_resnet18_fpn", "fast_rcnn_resnet50_fpn"]


class FastRCNN(ProposalDetector):
    """Fast R-CNN on external proposals: :class:`fastdet.models.proposals.ProposalDetector` with Faster R-CNN's box
    branch defaults (``MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)``, ``TwoMLPHead(C * 7 * 7, 1024)``,
    ``FastRCNNPredictor(1024, num_classes)``).

    ``model(images, proposals=None, targets=None, *, image_ids=None)``: see :class:`ProposalDetector`.

    Args:
        backbone (nn.Module): with ``out_channels`` (e.g. :func:`fastdet.models.resnet_fpn_backbone`).
        num_classes (int): background included; required unless ``box_predictor`` is given.
        proposal_generator: None (selective search, fast mode), a callable ``image -> Tensor[K, 4]``, a
            ``{image_id: boxes}`` mapping or a proposals file path (:func:`fastdet.models.proposals.load_proposals`).
        max_proposals_train, max_proposals_test (int): boxes per image taken from the default selective-search
            generator or a proposal table (the best-ranked first).
        box_roi_pool, box_head, box_predictor: the box branch (Faster R-CNN's defaults).
        **kwargs: :class:`ProposalDetector` arguments (transform sizes, ``box_*`` thresholds and sampling).
    """

    def __init__(self, backbone: nn.Module, num_classes: int | None = None, proposal_generator=None,
                 max_proposals_train: int = 2000, max_proposals_test: int = 1000,
                 box_roi_pool: nn.Module | None = None, box_head: nn.Module | None = None,
                 box_predictor: nn.Module | None = None, **kwargs):
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an 'out_channels' attribute (channels of its feature maps)")
        box_roi_pool, box_head, box_predictor, _ = box_branch(backbone.out_channels, num_classes, box_roi_pool,
                                                              box_head, box_predictor)
        super().__init__(backbone, box_roi_pool, box_head, box_predictor, proposal_generator, max_proposals_train,
                         max_proposals_test, **kwargs)


# -- builders ---------------------------------------------------------------------------------------------------------
# A Faster R-CNN checkpoint (its weights enum, a path or a state dict) loads without the RPN: "rpn." keys are ignored.
_IGNORED = ("rpn.",)


def fast_rcnn_resnet50_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                           weights_backbone=None, trainable_backbone_layers: int | None = None,
                           **kwargs) -> FastRCNN:
    """Fast R-CNN, ResNet-50 FPN: the backbone and RoI heads of torchvision's ``fasterrcnn_resnet50_fpn``.

    Args:
        weights: a Faster R-CNN (or Fast R-CNN) checkpoint: ``FasterRCNN_ResNet50_FPN_Weights`` (enum or name), a
            ``.pth`` path or a state dict; its ``backbone.*`` and ``roi_heads.*`` keys load (strictly), ``rpn.*``
            are ignored. See :mod:`fastdet.models.weights`.
        progress, num_classes, weights_backbone, trainable_backbone_layers, norm_layer: as
            :func:`fastdet.models.fasterrcnn_resnet50_fpn`.
        **kwargs: :class:`FastRCNN` arguments (``proposal_generator``, ``max_proposals_train/test``, ...).
    """
    plan, backbone, _ = resnet_fpn_two_stage_parts(
        50, "FasterRCNN_ResNet50_FPN_Weights", weights=weights, progress=progress, num_classes=num_classes,
        weights_backbone=weights_backbone, trainable_backbone_layers=trainable_backbone_layers, kwargs=kwargs)
    return plan.load_into(FastRCNN(backbone, num_classes=plan.num_classes, **kwargs), progress, _IGNORED)


def fast_rcnn_resnet18_fpn(*, weights=None, progress: bool = True, num_classes: int | None = None,
                           weights_backbone=None, trainable_backbone_layers: int | None = None,
                           **kwargs) -> FastRCNN:
    """A light Fast R-CNN (ResNet-18 FPN) that trains on a CPU, the counterpart of
    :func:`fastdet.models.fasterrcnn_resnet18_fpn` (same defaults: ``min_size`` 320, ``max_size`` 512, frozen batch
    norm); ``weights`` takes that model's checkpoint (path or state dict; ``rpn.*`` ignored)."""
    plan, backbone, _ = resnet_fpn_two_stage_parts(
        18, None, weights=weights, progress=progress, num_classes=num_classes, weights_backbone=weights_backbone,
        trainable_backbone_layers=trainable_backbone_layers, kwargs=kwargs)
    return plan.load_into(FastRCNN(backbone, num_classes=plan.num_classes, **kwargs), progress, _IGNORED)
