"""torchrun integration: process-group set-up from the environment, and data loaders with a DistributedSampler.

Launch a multi-GPU or multi-node run with torch's own launcher, e.g. ``torchrun --nproc_per_node=8 -m fastdet train
...``; torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, which is all this module reads.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "DistributedContext",
    "build_data_loader",
    "collate_pairs",
    "distributed_context",
    "init_distributed",
    "is_main_process",
    "seed_everything",
]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def distributed_context() -> DistributedContext:
    """The context of an initialised process group, else the one torchrun's environment describes, else a single
    process."""
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    return DistributedContext(rank, world_size, local_rank)


def init_distributed(device: torch.device, backend: str | None = None) -> DistributedContext:
    """Initialise the default process group when torchrun's environment asks for more than one process (nccl on
    CUDA, gloo on the CPU unless ``backend`` says otherwise); a no-op for a single process or an existing group."""
    context = distributed_context()
    if not context.enabled or dist.is_initialized():
        return context
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_kwargs = {"backend": backend}
    if backend == "nccl":
        init_kwargs["device_id"] = device  # binds the communicator to this process's GPU up front
    dist.init_process_group(**init_kwargs)
    return distributed_context()


def is_main_process() -> bool:
    return distributed_context().is_main


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def collate_pairs(batch):
    """Collate ``(image, target)`` samples into ``(list_of_images, list_of_targets)``: detection images differ in size,
    so they are not stacked."""
    if not all(isinstance(sample, (tuple, list)) and len(sample) == 2 for sample in batch):
        raise ValueError("each dataset sample must be an (image, target) pair")
    images, targets = zip(*batch)
    return list(images), list(targets)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker's torch and Python generators from the loader's base seed, but not numpy's, so
    # numpy-based augmentations would repeat across workers; derive numpy's seed from the worker's torch seed.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_data_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    num_workers: int = 0,
    collate_fn=None,
    drop_last: bool = False,
    seed: int = 0,
    pin_memory: bool = False,
    context: DistributedContext | None = None,
) -> DataLoader:
    """A DataLoader for training or evaluation that is correct under torchrun.

    Always samples through a ``DistributedSampler`` (with one replica when not distributed), so each rank reads its
    own ``1 / world_size`` share, and shuffling depends only on ``seed`` and the epoch (:class:`Trainer` calls
    ``set_epoch``): reproducible, and identical after a resume. ``batch_size`` is per process. ``collate_fn``
    defaults to :func:`collate_pairs`. Workers get distinct numpy seeds.

    Evaluation loaders for rank-0 evaluation should pass ``context=DistributedContext()`` so rank 0 sees the whole
    dataset (a DistributedSampler pads the last batch with repeated samples to equalise ranks otherwise)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers!r}")
    context = context or distributed_context()
    sampler = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=shuffle,
                                 seed=seed, drop_last=drop_last)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_fn or collate_pairs,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
        persistent_workers=False,
    )
