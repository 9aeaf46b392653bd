"""Training engine: Trainer (SGD/AdamW, warmup + cosine/step schedule, bfloat16 autocast, gradient clipping,
checkpoints with exact resume, COCO evaluation, early stopping, metrics log) and torchrun/DDP helpers."""

from fastdet.engine.config import TrainConfig
from fastdet.engine.distributed import (
    DistributedContext,
    build_data_loader,
    collate_pairs,
    distributed_context,
    init_distributed,
    is_main_process,
    seed_everything,
)
from fastdet.engine.metrics_log import MetricsLogger
from fastdet.engine.schedule import WarmupSchedule
from fastdet.engine.trainer import NonFiniteLossError, Trainer, build_optimizer

__all__ = [
    "DistributedContext",
    "MetricsLogger",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "WarmupSchedule",
    "build_data_loader",
    "build_optimizer",
    "collate_pairs",
    "distributed_context",
    "init_distributed",
    "is_main_process",
    "seed_everything",
]
