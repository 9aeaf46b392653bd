"""Ensemble / test-time-augmentation options shared by the commands that run checkpoints (``fastdet predict``; ready
for ``fastdet eval``): repeated ``--checkpoint``, ``--ensemble wbf|nmw|nms|soft-nms``, ``--tta`` (see
fastdet.ensemble)."""

from __future__ import annotations

import argparse

import torch

from fastdet.cli._common import CommandError, load_checkpoint


def add_ensemble_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ensemble", choices=["wbf", "nmw", "nms", "soft-nms"], default="wbf",
                   help="how detections of several --checkpoint models and --tta views are merged "
                        "(default: %(default)s)")
    p.add_argument("--ensemble-iou", type=float, default=0.55,
                   help="IoU threshold of the merge (default: %(default)s)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: also run each image flipped horizontally and merge")


def load_models(checkpoints: list[str], device: torch.device, args: argparse.Namespace):
    """One checkpoint without --tta: the model itself. Otherwise an EnsembleDetector over all of them (they must
    predict the same classes). Returns (model, spec of the first checkpoint)."""
    loaded = [load_checkpoint(path, device) for path in checkpoints]
    model, spec = loaded[0]
    for path, (_, other) in zip(checkpoints[1:], loaded[1:]):
        if other.get("class_names") != spec.get("class_names"):
            raise CommandError(f"--checkpoint {path}: its classes differ from those of {checkpoints[0]}; an ensemble "
                               "needs models of the same classes")
    if not 0.0 <= args.ensemble_iou <= 1.0:
        raise CommandError(f"--ensemble-iou must be in [0, 1], got {args.ensemble_iou}")
    if len(loaded) == 1 and not args.tta:
        return model, spec
    from fastdet.ensemble import EnsembleDetector

    ensemble = EnsembleDetector([m for m, _ in loaded], method=args.ensemble, tta=args.tta,
                                iou_threshold=args.ensemble_iou)
    return ensemble.to(device).eval(), spec
