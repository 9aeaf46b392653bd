"""SPP-Net (He, Zhang, Ren, Sun 2014) for detection: the conv layers run once per image, each proposal is pooled from
the last conv feature map with a spatial pyramid (``fastdet.ops.roi_spp``), then two fully connected layers and the
classifier / box regressor.

What is followed from the paper, and what is not:

* One feature map per image, stride 16, 256 channels, pooled with the 4-level pyramid ``{6x6, 3x3, 2x2, 1x1}``
  (50 bins, a 12,800-d vector: the paper's ZF-5 detection setting). The backbone is ResNet up to C4
  (:func:`fastdet.models.backbones.resnet.resnet_trunk_backbone`) instead of ZF-5: for ResNet-18 that is the same
  stride (16) and channel count (256) as ZF-5's conv5, with ImageNet weights available through torchvision's
  ``ResNet18_Weights``; ResNet-50's C4 has 1,024 channels. ``levels`` is an argument.
* fc6 / fc7 of ``representation_size`` (the paper: 4,096; default here 1,024, enough for small datasets and
  CPU-trainable) and single-scale testing (the paper's shorter side 688 for ``sppnet_resnet50``; the light model
  uses 320).
* Training: the paper fine-tuned only the FC layers on the pooled features, then trained per-class linear SVMs and a
  separate box regressor. Here the whole network trains end to end with Fast R-CNN's multi-task loss (softmax
  ``loss_classifier`` + smooth-L1 ``loss_box_reg``, :class:`fastdet.models.heads.roi_heads.RoIHeads`), which Fast
  R-CNN showed to beat the SVM pipeline; ``roi_spp`` is differentiable, so the conv layers can train too
  (``trainable_backbone_layers=0`` freezes them all, the paper's setting).
* Proposals: external, exactly as Fast R-CNN (:mod:`fastdet.models.proposals`: selective search in fast mode by
  default, 2,000 per training image, 1,000 per test image, as the paper's ~2,000).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from fastdet.models.backbones.resnet import resnet_trunk_backbone
from fastdet.models.heads.roi_heads import FastRCNNPredictor, SingleMapRoIPool, TwoMLPHead
from fastdet.models.layers import FrozenBatchNorm2d
from fastdet.models.proposals import ProposalDetector
from fastdet.models.weights import plan_build
from fastdet.ops import RoISPP

__all__ = ["SPPNet", "sppnet_resnet18", "sppnet_resnet50"]

#: The paper's pyramid for ZF-5 detection: 6x6, 3x3, 2x2 and 1x1 bins.
PAPER_LEVELS = (1, 2, 3, 6)


class SPPNet(ProposalDetector):
    """SPP-Net detector (module docstring): one feature map -> :class:`fastdet.ops.RoISPP` -> fc6, fc7 ->
    classifier + class-specific box deltas, on external proposals.

    ``model(images, proposals=None, targets=None, *, image_ids=None)``: see
    :class:`fastdet.models.proposals.ProposalDetector`.

    Args:
        backbone (nn.Module): returns one feature map (a tensor, or a dict with key ``"0"``) and has ``out_channels``
            and ``stride`` (input pixels per feature pixel), e.g. :func:`resnet_trunk_backbone`.
        num_classes (int): background included (>= 2).
        levels (sequence of int): bins per side of each pyramid level (default the paper's ``(1, 2, 3, 6)``).
        representation_size (int): width of fc6 and fc7.
        spatial_scale (float, optional): default ``1 / backbone.stride``.
        proposal_generator, max_proposals_train, max_proposals_test, **kwargs: as :class:`fastdet.models.FastRCNN`.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, levels: Sequence[int] = PAPER_LEVELS,
                 representation_size: int = 1024, spatial_scale: float | None = None, proposal_generator=None,
                 max_proposals_train: int = 2000, max_proposals_test: int = 1000, **kwargs):
        if not hasattr(backbone, "out_channels"):
            raise ValueError("backbone must have an 'out_channels' attribute (channels of its feature map)")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
        if isinstance(representation_size, bool) or not isinstance(representation_size, int) or \
                representation_size < 1:
            raise ValueError(f"representation_size must be a positive int, got {representation_size!r}")
        if spatial_scale is None:
            stride = getattr(backbone, "stride", None)
            if not stride:
                raise ValueError("spatial_scale must be given when the backbone has no 'stride' attribute")
            spatial_scale = 1.0 / stride
        spp = RoISPP(levels, spatial_scale)
        box_head = TwoMLPHead(spp.output_channels(backbone.out_channels), representation_size)
        box_predictor = FastRCNNPredictor(representation_size, num_classes)
        super().__init__(backbone, SingleMapRoIPool(spp), box_head, box_predictor, proposal_generator,
                         max_proposals_train, max_proposals_test, **kwargs)

    @property
    def levels(self) -> tuple[int, ...]:
        return self.roi_heads.box_roi_pool.pool.levels


def _sppnet_resnet(depth: int, weights, progress: bool, num_classes, weights_backbone, trainable_backbone_layers,
                   kwargs: dict) -> SPPNet:
    plan = plan_build(None, f"ResNet{depth}_Weights", weights=weights, weights_backbone=weights_backbone,
                      num_classes=num_classes, trainable_backbone_layers=trainable_backbone_layers,
                      max_trainable_layers=5, default_trainable_layers=3, progress=progress,
                      norm_layer=kwargs.pop("norm_layer", {18: FrozenBatchNorm2d}.get(depth)))
    backbone = resnet_trunk_backbone(depth, 3, plan.trainable_backbone_layers, plan.norm_layer,
                                     plan.backbone_state_dict(progress))
    return plan.load_into(SPPNet(backbone, plan.num_classes, **kwargs), progress)


def sppnet_resnet18(*, weights=None, progress: bool = True, num_classes: int | None = None, weights_backbone=None,
                    trainable_backbone_layers: int | None = None, **kwargs) -> SPPNet:
    """The light SPP-Net: ResNet-18 up to C4 (stride 16, 256 channels: ZF-5 conv5's shape), the paper's pyramid
    ``(1, 2, 3, 6)``, fc6/fc7 of 1,024, input shorter side 320 (``max_size`` 512), frozen batch norm.

    Args (fastdet's builder conventions, :mod:`fastdet.models.weights`):
        weights: an SPP-Net checkpoint (``.pth`` path or state dict); there are no published ones.
        num_classes (int, optional): background included (default 91).
        weights_backbone: ``ResNet18_Weights`` (ImageNet), a path or a state dict.
        trainable_backbone_layers (int in [0, 5]): ResNet stages trained counted from ``layer4`` (absent here) down;
            default 3 with pretrained weights (``layer3``, ``layer2``), else 5.
        **kwargs: :class:`SPPNet` arguments (``levels``, ``representation_size``, ``proposal_generator``, ``min_size``,
            ``box_*``, ...) and ``norm_layer``.
    """
    kwargs.setdefault("min_size", 320)
    kwargs.setdefault("max_size", 512)
    return _sppnet_resnet(18, weights, progress, num_classes, weights_backbone, trainable_backbone_layers, kwargs)


def sppnet_resnet50(*, weights=None, progress: bool = True, num_classes: int | None = None, weights_backbone=None,
                    trainable_backbone_layers: int | None = None, **kwargs) -> SPPNet:
    """SPP-Net on ResNet-50 up to C4 (stride 16, 1,024 channels), the paper's pyramid ``(1, 2, 3, 6)``, fc6/fc7 of
    1,024, the paper's single test scale (shorter side 688, ``max_size`` 1333). Arguments as
    :func:`sppnet_resnet18` (``ResNet50_Weights``; batch norm frozen when pretrained, torchvision's rule)."""
    kwargs.setdefault("min_size", 688)
    kwargs.setdefault("max_size", 1333)
    return _sppnet_resnet(50, weights, progress, num_classes, weights_backbone, trainable_backbone_layers, kwargs)
