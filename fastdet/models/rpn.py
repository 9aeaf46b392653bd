"""Moved to :mod:`fastdet.models.heads.rpn`; these names stay importable from here."""

from fastdet.models.heads.rpn import Proposals, RegionProposalNetwork, RPNHead, select_proposals  # noqa: F401
from fastdet.models.postprocess import flatten_level_outputs, image_sizes_tensor  # noqa: F401

__all__ = ["Proposals", "RPNHead", "RegionProposalNetwork", "flatten_level_outputs", "select_proposals"]
