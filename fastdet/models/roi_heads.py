"""Moved to :mod:`fastdet.models.heads.roi_heads`; these names stay importable from here."""

from fastdet.models.heads.roi_heads import (  # noqa: F401
    MIN_DETECTION_SIZE,
    Detections,
    FastRCNNConvFCHead,
    FastRCNNPredictor,
    RoIHeads,
    TwoMLPHead,
    init_conv_head,
    select_detections,
)

__all__ = ["Detections", "FastRCNNConvFCHead", "FastRCNNPredictor", "RoIHeads", "TwoMLPHead", "select_detections"]
