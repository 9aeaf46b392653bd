"""Ground truth of a batch padded to fixed shapes, the one convention every detector uses.

A batch's targets are padded to ``G = max(1, most boxes in any image)`` slots: ``boxes [B, G, 4]``, ``labels [B, G]``
and ``valid [B, G]`` (:class:`PaddedTargets`). Padding slots hold zero boxes and label 0 and are ignored everywhere
through ``valid``; an image without objects is an all-padding row, so it trains as pure background.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

__all__ = ["PaddedTargets", "pad_box_lists", "pad_targets"]


class PaddedTargets(NamedTuple):
    """Ground truth of a batch padded to G slots per image (see the module docstring)."""

    boxes: Tensor  # [B, G, 4] float, xyxy
    labels: Tensor  # [B, G] int64
    valid: Tensor  # [B, G] bool
    masks: list[Tensor] | None = None  # per image [G_i, H_i, W_i] instance masks, when every target has them


def pad_targets(targets: list[dict[str, Tensor]], device: torch.device | None = None,
                dtype: torch.dtype = torch.float32, with_masks: bool = False) -> PaddedTargets:
    """Stack per-image ``{"boxes", "labels"}`` dicts into :class:`PaddedTargets` (G >= 1 so shapes never collapse)."""
    if len(targets) == 0:
        raise ValueError("targets must hold one dict per image, got an empty list")
    if device is None:
        device = targets[0]["boxes"].device
    # One sentinel row per image guarantees G >= 1 even when every image is empty; it is dropped again below only
    # if some image has boxes (then the longest image defines G).
    boxes = [t["boxes"].to(device=device, dtype=dtype) for t in targets]
    labels = [t["labels"].to(device=device, dtype=torch.int64) for t in targets]
    counts = torch.tensor([b.shape[0] for b in boxes], device=device)
    padded_boxes = pad_sequence(boxes + [boxes[0].new_zeros(1, 4)], batch_first=True)[:-1]
    padded_labels = pad_sequence(labels + [labels[0].new_zeros(1)], batch_first=True)[:-1]
    slots = padded_boxes.shape[1]
    valid = torch.arange(slots, device=device)[None, :] < counts[:, None]
    masks = [t["masks"].to(device) for t in targets] if with_masks and all("masks" in t for t in targets) else None
    return PaddedTargets(padded_boxes, padded_labels, valid, masks)


def pad_box_lists(boxes: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image ``boxes (Tensor[G_i, 4])`` and ``labels (Tensor[G_i])`` -> ``(boxes [B, G, 4], labels [B, G],
    valid [B, G])`` with :func:`pad_targets`' padding; boxes keep their dtype and device, labels become int64."""
    if len(boxes) != len(labels):
        raise ValueError(f"boxes and labels must have one entry per image, got {len(boxes)} and {len(labels)}")
    if len(boxes) == 0:
        raise ValueError("boxes must hold one tensor per image, got an empty list")
    padded = pad_targets([{"boxes": b, "labels": l} for b, l in zip(boxes, labels)], boxes[0].device, boxes[0].dtype)
    return padded.boxes, padded.labels, padded.valid
