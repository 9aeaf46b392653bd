"""Argument checks shared by every detector's ``forward(images, targets)``.

Detectors follow torchvision's detection contract: ``images`` is a list of float ``Tensor[C, H, W]`` (values in 0..1,
any sizes), ``targets`` (required in training) a list of dicts with ``"boxes"`` (float ``Tensor[N, 4]``, xyxy pixels,
``x1 < x2`` and ``y1 < y2``) and ``"labels"`` (integer ``Tensor[N]``). ``N = 0`` is allowed: an image without objects
trains its classifier on background only.

The checks run once at the model's entry and read box and label values (one host synchronisation on CUDA, as
torchvision's degenerate-box check). The post-processing behind them is synchronisation-free.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_images_and_targets", "check_images", "check_targets"]


def check_images(images, num_channels: int | None = 3) -> None:
    """Check a list of ``Tensor[C, H, W]`` floating-point images on one device.

    Raises:
        TypeError: ``images`` is not a list/tuple of tensors, or an image is not floating point.
        ValueError: the list is empty, an image has the wrong rank, channel count or an empty side, or the images are
            on different devices.
    """
    if isinstance(images, Tensor) or not isinstance(images, Sequence):
        raise TypeError(
            f"images must be a list of Tensor[C, H, W] (one per image, sizes may differ), got {type(images).__name__}"
            + (" (stack-free list expected; use list(batch) for a [B, C, H, W] tensor)" if isinstance(images, Tensor)
               else "")
        )
    if len(images) == 0:
        raise ValueError("images must contain at least one image, got an empty list")
    device = None
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise TypeError(f"images[{i}] must be a Tensor[C, H, W], got {type(image).__name__}")
        if image.dim() != 3:
            raise ValueError(f"images[{i}] must have shape [C, H, W] (3 dimensions), got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"images[{i}] must be a floating-point tensor with values in [0, 1], got {image.dtype}")
        if num_channels is not None and image.shape[0] != num_channels:
            raise ValueError(
                f"images[{i}] must have {num_channels} channels (shape [C, H, W]), got shape {tuple(image.shape)}"
            )
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"images[{i}] has an empty side: shape {tuple(image.shape)}")
        if device is None:
            device = image.device
        elif image.device != device:
            raise ValueError(f"all images must be on the same device: images[0] is on {device}, images[{i}] on "
                             f"{image.device}")


def check_targets(targets, num_images: int, num_classes: int | None, device: torch.device | None = None,
                  min_label: int = 0) -> None:
    """Check per-image target dicts: one per image, ``boxes`` float ``[N, 4]`` finite with positive width and height,
    ``labels`` integer ``[N]`` in ``[min_label, num_classes)`` (when ``num_classes`` is given).

    Raises:
        TypeError: wrong container or tensor types.
        ValueError: wrong lengths or shapes, missing keys, degenerate or non-finite boxes, labels out of range, or a
            target on another device than the images.
    """
    if isinstance(targets, dict) or not isinstance(targets, Sequence):
        raise TypeError(f"targets must be a list of dicts (one per image), got {type(targets).__name__}")
    if len(targets) != num_images:
        raise ValueError(f"targets must have one dict per image: got {len(targets)} targets for {num_images} images")
    value_checks = []
    for i, target in enumerate(targets):
        if not isinstance(target, dict):
            raise TypeError(f"targets[{i}] must be a dict with 'boxes' and 'labels', got {type(target).__name__}")
        for key in ("boxes", "labels"):
            if key not in target:
                raise ValueError(f"targets[{i}] is missing the key {key!r} (it has {sorted(target)})")
            if not isinstance(target[key], Tensor):
                raise TypeError(f"targets[{i}][{key!r}] must be a Tensor, got {type(target[key]).__name__}")
        boxes, labels = target["boxes"], target["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must have shape [N, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
        if not boxes.is_floating_point():
            raise TypeError(f"targets[{i}]['boxes'] must be a floating-point tensor, got {boxes.dtype}")
        if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
            raise ValueError(f"targets[{i}]['labels'] must have shape [N] with N = {boxes.shape[0]} (the number of "
                             f"boxes), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"targets[{i}]['labels'] must be an integer tensor (int64), got {labels.dtype}")
        if device is not None:
            for key in ("boxes", "labels"):
                if target[key].device != device:
                    raise ValueError(f"targets[{i}][{key!r}] is on {target[key].device}, the images on {device}")
        if boxes.shape[0] == 0:
            continue
        finite = torch.isfinite(boxes).all()
        degenerate = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
        bad_label = labels < min_label
        if num_classes is not None:
            bad_label = bad_label | (labels >= num_classes)
        value_checks.append((i, degenerate, bad_label, torch.stack([~finite, degenerate.any(), bad_label.any()])))
    if not value_checks:
        return
    # The value checks of the whole batch are read back in one device read (not one per image); only a failing
    # target is then looked at again to name the bad row.
    flags = torch.stack([f.to(value_checks[0][3].device) for *_, f in value_checks]).tolist()
    for (i, degenerate, bad_label, _), (non_finite, has_degenerate, has_bad_label) in zip(value_checks, flags):
        boxes, labels = targets[i]["boxes"], targets[i]["labels"]
        if non_finite:
            raise ValueError(f"targets[{i}]['boxes'] contains NaN or infinite coordinates")
        if has_degenerate:
            row = int(degenerate.nonzero()[0, 0])
            raise ValueError(
                f"targets[{i}]['boxes'][{row}] = {boxes[row].tolist()} is degenerate: boxes must have x1 < x2 and "
                f"y1 < y2 (positive width and height)"
            )
        if has_bad_label:
            row = int(bad_label.nonzero()[0, 0])
            allowed = f"[{min_label}, {num_classes})" if num_classes is not None else f">= {min_label}"
            raise ValueError(f"targets[{i}]['labels'][{row}] = {int(labels[row])} is out of range: labels must be in "
                             f"{allowed}")


def check_images_and_targets(images, targets, training: bool, num_classes: int | None, *,
                             num_channels: int | None = 3, min_label: int = 0) -> None:
    """Check a detector's inputs; raise ``TypeError``/``ValueError`` naming the bad image or target by index.

    Args:
        images: list of float ``Tensor[C, H, W]``.
        targets: list of ``{"boxes", "labels"}`` dicts, or None. Required when ``training``; checked when given.
        training (bool): whether the model is in training mode.
        num_classes (int, optional): labels must lie in ``[min_label, num_classes)``; None skips the range check.
        num_channels (int, optional): required channel count (3 for RGB); None accepts any.
        min_label (int): smallest allowed label (0; a detector that reserves 0 for background may pass 1).
    """
    check_images(images, num_channels)
    if targets is None:
        if training:
            raise ValueError("targets must be given in training mode (a list of {'boxes', 'labels'} dicts, one per "
                             "image); call model.eval() for inference")
        return
    check_targets(targets, len(images), num_classes, images[0].device, min_label)
