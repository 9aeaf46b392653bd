"""Moved to :mod:`fastdet.models.backbones.mobilenet`; this name stays importable."""

from fastdet.models.backbones.mobilenet import (  # noqa: F401
    BlockConfig,
    InvertedResidual,
    MobileNetV3,
    SqueezeExcitation,
    SSDLiteFeatureExtractor,
    freeze_mobilenet_stages,
    make_divisible,
    mobilenet_fpn_backbone,
    mobilenet_v3_large,
    normal_init,
)
