"""Training configuration: every option of :class:`fastdet.engine.Trainer` in one dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

__all__ = ["TrainConfig"]

_OPTIMIZERS = ("sgd", "adamw")
_SCHEDULES = ("cosine", "step", "constant")
_LOG_FORMATS = ("jsonl", "csv")


@dataclass
class TrainConfig:
    """Options of a training run. The command line builds one from its arguments; ``to_dict``/``from_dict`` round-trip
    it through checkpoints.

    Optimiser
        optimizer: ``"sgd"`` (momentum, optional Nesterov) or ``"adamw"``. lr: peak learning rate (after warmup).
        momentum, nesterov: SGD only. betas, eps: AdamW only. weight_decay: L2 (SGD) or decoupled (AdamW) decay.
        decay_norm_and_bias: whether normalisation-layer parameters and biases get weight decay too. Off by default:
        decaying them shrinks scales and offsets that are not over-parameterised, which usually costs accuracy.
    Schedule (stepped every iteration)
        schedule: ``"cosine"`` (from ``lr`` down to ``lr * min_lr_ratio`` over the whole run), ``"step"`` (multiply by
        ``gamma`` at each epoch in ``milestones``) or ``"constant"``. warmup_iters: linear warmup length in
        iterations, starting from ``lr * warmup_factor``; the warmup multiplies the schedule, so the first
        iterations of a cosine run rise linearly toward the cosine curve.
    Numerics
        amp: bfloat16 autocast for the forward pass (no loss scaling is needed for bfloat16). grad_clip_norm: clip
        the global gradient norm to this value (None: no clipping).
    Run
        epochs: total epochs (a resumed run continues to this total). device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``;
        None picks ``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU. seed: seeds torch, numpy and Python
        (plus the rank, so ranks draw different augmentations). deterministic: ask torch for deterministic
        kernels (slower; warns where none exists).
    Output
        output_dir: checkpoints (``last.pt``, ``best.pt``) and the metrics log go here; None keeps nothing on disk.
        checkpoint_every: save ``last.pt`` every this many epochs (and always after the last one). log_format:
        ``"jsonl"`` or ``"csv"``. log_every: write a training record every this many iterations. progress: show tqdm
        progress bars (rank 0 only).
    Evaluation
        eval_every: run COCO evaluation every this many epochs (0: never; needs a val_loader and ground truth).
        eval_max_detections: COCO's per-image limit. eval_backend: ``"native"`` (fastdet's COCO evaluator) or
        ``"pycocotools"``; both give identical numbers. early_stopping_patience: stop after this many evaluations
        without an improvement of more than ``early_stopping_min_delta`` in ``early_stopping_metric`` (a key of
        :attr:`fastdet.eval.CocoEvaluation.stats`); None disables early stopping.
    Distributed
        find_unused_parameters: passed to DistributedDataParallel (needed by models whose losses skip some
        parameters on some iterations). distributed_backend: None picks nccl on CUDA and gloo on the CPU.
    resume_from: a checkpoint path that :meth:`Trainer.fit` resumes from (same as calling ``Trainer.resume``).
    extra: free-form values stored with the configuration in every checkpoint (e.g. the command line's model and
    dataset arguments); plain Python values only (numbers, strings, lists, dicts), so checkpoints load with
    ``torch.load(weights_only=True)``.

    ``deterministic=True`` switches torch's global deterministic-algorithms flag on for the whole process.
    """

    epochs: int = 12
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = False
    schedule: str = "cosine"
    warmup_iters: int = 0
    warmup_factor: float = 0.001
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr_ratio: float = 0.0
    amp: bool = False
    grad_clip_norm: float | None = None
    device: str | None = None
    seed: int = 0
    deterministic: bool = False
    output_dir: str | None = None
    checkpoint_every: int = 1
    log_format: str = "jsonl"
    log_every: int = 20
    progress: bool = True
    eval_every: int = 1
    eval_max_detections: int = 100
    eval_backend: str = "native"
    early_stopping_patience: int | None = None
    early_stopping_metric: str = "AP"
    early_stopping_min_delta: float = 0.0
    find_unused_parameters: bool = False
    distributed_backend: str | None = None
    resume_from: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.milestones = tuple(self.milestones)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first option that is out of range."""

        def positive_int(name, minimum=1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {minimum}, got {value!r}")

        def non_negative(name):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ValueError(f"TrainConfig.{name} must be a number >= 0, got {value!r}")

        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.eval_backend not in ("native", "pycocotools"):
            raise ValueError(f"TrainConfig.eval_backend must be 'native' or 'pycocotools', got {self.eval_backend!r}")
        if self.log_format not in _LOG_FORMATS:
            raise ValueError(f"TrainConfig.log_format must be one of {_LOG_FORMATS}, got {self.log_format!r}")
        positive_int("epochs")
        positive_int("warmup_iters", 0)
        positive_int("checkpoint_every")
        positive_int("log_every")
        positive_int("eval_every", 0)
        positive_int("eval_max_detections")
        for name in ("lr", "momentum", "weight_decay", "gamma", "min_lr_ratio", "early_stopping_min_delta", "eps"):
            non_negative(name)
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if not 0 < self.warmup_factor <= 1:
            raise ValueError(f"TrainConfig.warmup_factor must lie in (0, 1], got {self.warmup_factor!r}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ValueError("TrainConfig.nesterov needs optimizer='sgd' and momentum > 0")
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in self.milestones) or \
                list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"TrainConfig.milestones must be increasing positive epochs, got {self.milestones!r}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"TrainConfig.grad_clip_norm must be > 0 or None, got {self.grad_clip_norm!r}")
        if self.early_stopping_patience is not None:
            positive_int("early_stopping_patience")
        if self.distributed_backend not in (None, "nccl", "gloo"):
            raise ValueError(
                f"TrainConfig.distributed_backend must be None, 'nccl' or 'gloo', got {self.distributed_backend!r}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig option(s): {unknown}")
        return cls(**values)
