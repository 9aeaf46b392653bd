"""Batching for detection: images differ in size and in their number of objects, so a batch is a pair of lists."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def collate_detection(batch: Sequence[tuple[Any, dict]]) -> tuple[list, list[dict]]:
    """``[(image, target), ...] -> ([image, ...], [target, ...])``: the DataLoader ``collate_fn`` for detection.

    Images are not stacked (sizes may differ; the model's transform pads them); targets stay per-image dicts.
    """
    if not isinstance(batch, (list, tuple)):
        raise TypeError(f"batch must be a list of (image, target) pairs, got {type(batch).__name__}")
    images, targets = [], []
    for i, sample in enumerate(batch):
        if not isinstance(sample, (list, tuple)) or len(sample) != 2:
            raise TypeError(f"batch[{i}] must be an (image, target) pair, got {type(sample).__name__}")
        images.append(sample[0])
        targets.append(sample[1])
    return images, targets


def make_data_loader(dataset: torch.utils.data.Dataset, batch_size: int = 2, shuffle: bool = False,
                     num_workers: int = 0, seed: int | None = None, drop_last: bool = False,
                     pin_memory: bool = False, persistent_workers: bool | None = None,
                     **kwargs: Any) -> torch.utils.data.DataLoader:
    """A DataLoader for a detection dataset with :func:`collate_detection`.

    Args:
        dataset: any dataset yielding ``(image, target)``.
        batch_size: images per batch (>= 1).
        shuffle: reshuffle every epoch.
        num_workers: worker processes decoding images (0: in the main process).
        seed: seeds the shuffling order and the workers' random transforms, so a run can be repeated exactly;
            None draws from torch's global generator.
        drop_last, pin_memory: as for ``torch.utils.data.DataLoader``.
        persistent_workers: keep workers alive between epochs (default: True when ``num_workers > 0``).
        **kwargs: passed to ``DataLoader`` (e.g. ``sampler``, ``prefetch_factor``).
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty: nothing to load")
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=collate_detection,
        drop_last=drop_last, pin_memory=pin_memory, generator=generator,
        persistent_workers=persistent_workers and num_workers > 0, worker_init_fn=_seed_worker, **kwargs)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker's torch generator from the loader's generator; transforms that draw from Python's
    # `random` or numpy need their generators seeded from it too, or all workers would repeat the same draws.
    import random

    import numpy as np

    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)
