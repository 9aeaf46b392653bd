"""Per-iteration learning-rate schedule: linear warmup times a cosine, step or constant curve."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

__all__ = ["WarmupSchedule"]


class WarmupSchedule:
    """Learning-rate multiplier as a function of the iteration, for ``torch.optim.lr_scheduler.LambdaLR``.

    ``factor(i) = warmup(i) * curve(i)`` where

    * ``warmup(i)`` rises linearly from ``warmup_factor`` at ``i = 0`` to 1 at ``i = warmup_iters`` and stays 1;
    * ``curve(i)`` is ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * i / total_iters)) / 2`` for ``"cosine"``
      (held at its end value past ``total_iters``), ``gamma ** (number of milestones <= i)`` for ``"step"`` (milestones
      in iterations), or 1 for ``"constant"``.

    A plain object rather than a closure, so that ``LambdaLR.state_dict`` stores it and a resumed run gets the same
    schedule.
    """

    def __init__(self, total_iters: int, kind: str = "cosine", warmup_iters: int = 0, warmup_factor: float = 0.001,
                 milestones: Sequence[int] = (), gamma: float = 0.1, min_lr_ratio: float = 0.0) -> None:
        if kind not in ("cosine", "step", "constant"):
            raise ValueError(f"kind must be 'cosine', 'step' or 'constant', got {kind!r}")
        if total_iters < 1:
            raise ValueError(f"total_iters must be >= 1, got {total_iters}")
        if warmup_iters < 0:
            raise ValueError(f"warmup_iters must be >= 0, got {warmup_iters}")
        self.total_iters = int(total_iters)
        self.kind = kind
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.min_lr_ratio = float(min_lr_ratio)

    def curve(self, iteration: int) -> float:
        if self.kind == "cosine":
            progress = min(iteration, self.total_iters) / self.total_iters
            return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "step":
            return self.gamma ** bisect.bisect_right(self.milestones, iteration)
        return 1.0

    def warmup(self, iteration: int) -> float:
        if iteration >= self.warmup_iters:
            return 1.0
        alpha = iteration / self.warmup_iters
        return self.warmup_factor * (1.0 - alpha) + alpha

    def __call__(self, iteration: int) -> float:
        return self.warmup(iteration) * self.curve(iteration)
