"""Backbones: ResNet (:mod:`.resnet`), MobileNetV3 (:mod:`.mobilenet`), YOLOv5's CSP-Darknet (:mod:`.darknet`).

Re-exports what ``fastdet.models.backbones`` has always offered (the ResNet bodies, the FPN wrapper and the shared
layers), so ``from fastdet.models.backbones import X`` keeps working."""

from fastdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet, resnet, resnet_fpn_backbone
from fastdet.models.layers import FrozenBatchNorm2d, IntermediateLayers, conv_norm_activation
from fastdet.models.necks.fpn import BackboneWithFPN, FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

__all__ = [
    "BackboneWithFPN",
    "BasicBlock",
    "Bottleneck",
    "FeaturePyramidNetwork",
    "FrozenBatchNorm2d",
    "IntermediateLayers",
    "LastLevelMaxPool",
    "LastLevelP6P7",
    "ResNet",
    "conv_norm_activation",
    "resnet",
    "resnet_fpn_backbone",
]
