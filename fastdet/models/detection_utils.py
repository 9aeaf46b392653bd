"""Moved: matching and sampling to :mod:`fastdet.models.matching`, target padding to :mod:`fastdet.models.targets`,
row selections and clipping to :mod:`fastdet.models.postprocess`. These names stay importable from here."""

from fastdet.models.matching import (  # noqa: F401
    BELOW_LOW_THRESHOLD,
    BETWEEN_THRESHOLDS,
    BalancedPositiveNegativeSampler,
    Matcher,
    match_iou,
)
from fastdet.models.postprocess import clip_boxes_to_images, compact_mask, gather_rows  # noqa: F401
from fastdet.models.targets import PaddedTargets, pad_targets  # noqa: F401

__all__ = [
    "BELOW_LOW_THRESHOLD",
    "BETWEEN_THRESHOLDS",
    "BalancedPositiveNegativeSampler",
    "Matcher",
    "PaddedTargets",
    "clip_boxes_to_images",
    "compact_mask",
    "gather_rows",
    "match_iou",
    "pad_targets",
]
