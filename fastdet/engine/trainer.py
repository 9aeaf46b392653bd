"""The training loop for any detector following torchvision's detection contract.

Contract: in training mode ``model(images, targets=targets)`` returns a dict of scalar losses (summed for the backward
pass); in eval mode ``model(images)`` returns one dict per image with ``boxes`` (xyxy, original image pixels),
``scores`` and ``labels``. ``images`` is a list of ``[C, H, W]`` tensors, ``targets`` a list of dicts of tensors.

Multi-GPU and multi-node runs use torch's own launcher and DistributedDataParallel: start the script with
``torchrun --nproc_per_node=N ...`` and the Trainer initialises the process group from the environment, wraps the
model, sets the sampler's epoch, averages logged losses over ranks, and writes checkpoints and logs from rank 0.
"""

from __future__ import annotations

import math
import os
import random
import time
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from fastdet.engine.config import TrainConfig
from fastdet.engine.distributed import DistributedContext, distributed_context, init_distributed, seed_everything
from fastdet.engine.metrics_log import MetricsLogger
from fastdet.engine.schedule import WarmupSchedule

__all__ = ["NonFiniteLossError", "Trainer", "build_optimizer"]

CHECKPOINT_VERSION = 1

# Parameters of these layers are scales and offsets of normalised activations: excluded from weight decay unless
# TrainConfig.decay_norm_and_bias is set.
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, nn.RMSNorm)


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; raised before the backward pass, so the weights are still the last good ones."""


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters of ``model``, with normalisation-layer parameters and biases in a
    group without weight decay unless ``config.decay_norm_and_bias``."""
    norm_parameters = {
        id(p) for module in model.modules() if isinstance(module, _NORM_TYPES) for p in module.parameters(False)
    }
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exempt = name.endswith("bias") or id(parameter) in norm_parameters
        (no_decay if exempt and not config.decay_norm_and_bias else decay).append(parameter)
    if not decay and not no_decay:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def _resolve_device(spec: str | None, context: DistributedContext) -> torch.device:
    if spec is None:
        return torch.device("cuda", context.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"TrainConfig.device must be a torch device string such as 'cpu' or 'cuda', got {spec!r}") \
            from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device is {spec!r} but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", context.local_rank)
    return device


def _loader_length(loader, name: str) -> int:
    try:
        length = len(loader)
    except TypeError:
        raise ValueError(f"{name} must have a length (a DataLoader over a map-style dataset)") from None
    if length == 0:
        raise ValueError(f"{name} is empty")
    return length


def _sampler_of(loader):
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        return sampler
    batch_sampler = getattr(loader, "batch_sampler", None)
    inner = getattr(batch_sampler, "sampler", None)
    return inner if isinstance(inner, DistributedSampler) else None


def _component_key(name: str) -> str:
    """Log key of one loss term: torchvision-style names (``loss_classifier``) as they are, others prefixed."""
    return name if name.startswith("loss_") else f"loss_{name}"


def _numpy_rng_state() -> dict:
    name, keys, position, has_gauss, cached = np.random.get_state()
    # as tensors and plain numbers, so checkpoints load with torch.load(weights_only=True)
    return {"bit_generator": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_rng_state(state: dict) -> None:
    np.random.set_state((state["bit_generator"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached_gaussian"]))


class Trainer:
    """Train a detector with the options of a :class:`TrainConfig`.

    Args:
        model: a detector following the contract in the module docstring. It is moved to the configured device and
            trained in place (the Trainer's purpose); under torchrun it is wrapped in DistributedDataParallel, and
            :attr:`model` stays the unwrapped module.
        config: the options.
        train_loader: yields ``(images, targets)``; must have a length. Under torchrun build it with
            :func:`fastdet.engine.build_data_loader` so each rank reads its own share.
        val_loader: yields ``(images, targets)`` with an ``image_id`` per target, for COCO evaluation every
            ``config.eval_every`` epochs. A loader over the whole set is run on rank 0 only; a loader whose
            DistributedSampler shards it over the ranks is run on every rank and the detections gathered on rank 0.
        ground_truth: COCO ground truth for ``val_loader`` (dict, JSON path or pycocotools COCO).
        label_to_category_id: model label -> dataset category id, for the evaluation.

    After :meth:`fit`, :attr:`history` holds one record per epoch (mean losses, learning rate, throughput, and the
    ``val_*`` statistics of epochs that were evaluated) and :attr:`last_evaluation` the last CocoEvaluation (rank 0).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, train_loader, val_loader=None, ground_truth=None,
                 label_to_category_id: Mapping[int, int] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        config.validate()
        if (val_loader is None) != (ground_truth is None):
            raise ValueError("val_loader and ground_truth must be given together (evaluation needs both)")
        self.config = config
        self.iters_per_epoch = _loader_length(train_loader, "train_loader")
        self.device = _resolve_device(config.device, distributed_context())
        self.context = init_distributed(self.device, config.distributed_backend)
        seed_everything(config.seed + self.context.rank)
        if config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False

        self.model = model.to(self.device)
        if self.context.enabled:
            self.train_model = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=config.find_unused_parameters,
            )
            if _sampler_of(train_loader) is None:
                warnings.warn("distributed training with a train_loader that has no DistributedSampler: every rank "
                              "reads the whole dataset; build it with fastdet.engine.build_data_loader",
                              stacklevel=2)
        else:
            self.train_model = self.model
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.ground_truth = ground_truth
        self.label_to_category_id = label_to_category_id

        self.optimizer = build_optimizer(self.model, config)
        self.schedule = WarmupSchedule(
            total_iters=config.epochs * self.iters_per_epoch, kind=config.schedule, warmup_iters=config.warmup_iters,
            warmup_factor=config.warmup_factor, milestones=[m * self.iters_per_epoch for m in config.milestones],
            gamma=config.gamma, min_lr_ratio=config.min_lr_ratio,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)

        self.epoch = 0  # completed epochs
        self.iteration = 0  # completed optimiser steps
        self.best_metric: float | None = None
        self.evaluations_without_improvement = 0
        self.history: list[dict] = []
        self.last_evaluation = None
        self._resumed_from: str | None = None
        self.logger = None
        if config.output_dir is not None and self.context.is_main:
            self.logger = MetricsLogger(config.output_dir, config.log_format)

    # ------------------------------------------------------------------ training

    def fit(self) -> list[dict]:
        """Train until ``config.epochs`` epochs are complete or early stopping triggers; returns :attr:`history`."""
        config = self.config
        if config.resume_from is not None and self._resumed_from is None:
            self.resume(config.resume_from)
        for epoch in range(self.epoch, config.epochs):
            record = self._train_one_epoch(epoch)
            self.epoch = epoch + 1
            stop, improved = False, False
            if self._evaluation_due():
                stats = self.evaluate()
                record.update({f"val_{name}": value for name, value in stats.items()})
                stop, improved = self._track_metric(stats)
            self.history.append(record)
            if self.logger is not None:
                self.logger.log({"kind": "epoch", **record})
            if config.output_dir is not None:
                last = self.epoch == config.epochs or stop
                if self.epoch % config.checkpoint_every == 0 or last:
                    self.save_checkpoint(os.path.join(config.output_dir, "last.pt"))
                if improved:
                    self.save_checkpoint(os.path.join(config.output_dir, "best.pt"))
            if stop:
                if self.context.is_main and config.progress:
                    print(f"early stopping after epoch {self.epoch}: {config.early_stopping_metric} has not improved "
                          f"for {self.evaluations_without_improvement} evaluations (best {self.best_metric:.4f})")
                break
        if self.context.enabled:
            dist.barrier()
        return self.history

    def _evaluation_due(self) -> bool:
        every = self.config.eval_every
        return self.val_loader is not None and every > 0 and (self.epoch % every == 0 or
                                                               self.epoch == self.config.epochs)

    def _to_device(self, batch, batch_index: int):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"train_loader must yield (images, targets) pairs; batch {batch_index} is a "
                             f"{type(batch).__name__}")
        images, targets = batch
        if isinstance(images, torch.Tensor):
            images = images.to(self.device, non_blocking=True)
        else:
            images = [image.to(self.device, non_blocking=True) for image in images]
        moved = []
        for target in targets:
            if not isinstance(target, Mapping):
                raise ValueError(f"targets must be dicts (batch {batch_index} has a {type(target).__name__})")
            moved.append({key: value.to(self.device, non_blocking=True) if isinstance(value, torch.Tensor) else value
                          for key, value in target.items()})
        return images, moved

    def _losses(self, images, targets) -> dict[str, torch.Tensor]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp):
            # By keyword: detectors on external proposals (Fast R-CNN, SPP-Net) take proposals second.
            losses = self.train_model(images, targets=targets)
        if not isinstance(losses, Mapping) or not losses:
            raise TypeError(
                "in training mode the model must return a non-empty dict of losses (torchvision's detection "
                f"contract), got {type(losses).__name__}"
            )
        checked = {}
        for name in sorted(losses):  # one order on every rank, for the all-reduce
            value = losses[name]
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise TypeError(f"loss {name!r} must be a scalar tensor, got {type(value).__name__} "
                                f"{tuple(getattr(value, 'shape', ()))}")
            checked[str(name)] = value.reshape(()).float()
        return checked

    def _train_one_epoch(self, epoch: int) -> dict:
        from tqdm.auto import tqdm

        config = self.config
        sampler = _sampler_of(self.train_loader)
        if sampler is not None:
            sampler.set_epoch(epoch)
        self.train_model.train()
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        bar = tqdm(total=self.iters_per_epoch, desc=f"epoch {epoch + 1}/{config.epochs}", dynamic_ncols=True,
                   disable=not (config.progress and self.context.is_main), leave=False)
        sums: dict[str, float] = {}
        steps, images_seen = 0, 0
        epoch_start = window_start = time.perf_counter()
        window_images = 0
        try:
            for batch_index, batch in enumerate(self.train_loader):
                images, targets = self._to_device(batch, batch_index)
                losses = self._losses(images, targets)
                total = torch.stack(list(losses.values())).sum()
                logged = torch.stack([total.detach(), *[v.detach() for v in losses.values()]])
                if self.context.enabled:
                    dist.all_reduce(logged)  # every rank sees the same values, so every rank raises together
                    logged /= self.context.world_size
                values = dict(zip(["loss", *[_component_key(name) for name in losses]], logged.tolist()))
                if not all(math.isfinite(v) for v in values.values()):
                    raise NonFiniteLossError(
                        f"non-finite loss at epoch {epoch + 1}, iteration {batch_index + 1} of the epoch "
                        f"(global step {self.iteration + 1}): " + ", ".join(f"{k}={v}" for k, v in values.items())
                        + ". Lower the learning rate, add warmup or gradient clipping, or check the targets "
                        "(degenerate or out-of-image boxes)."
                    )
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
                grad_norm = None
                if config.grad_clip_norm is not None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.iteration += 1

                batch_images = (len(images) if not isinstance(images, torch.Tensor) else images.shape[0]) \
                    * self.context.world_size
                steps += 1
                images_seen += batch_images
                window_images += batch_images
                for key, value in values.items():
                    sums[key] = sums.get(key, 0.0) + value
                lr = self.optimizer.param_groups[0]["lr"]
                bar.update(1)
                if steps % config.log_every == 0 or steps == self.iters_per_epoch:
                    now = time.perf_counter()
                    throughput = window_images / max(now - window_start, 1e-9)
                    window_start, window_images = now, 0
                    bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{throughput:.1f}",
                                    refresh=False)
                    if self.logger is not None:
                        record = {"kind": "train", "epoch": epoch + 1, "iteration": self.iteration, "lr": lr,
                                  **values, "images_per_s": throughput}
                        if grad_norm is not None:
                            record["grad_norm"] = float(grad_norm)
                        self.logger.log(record)
        finally:
            bar.close()
        if steps == 0:
            raise ValueError("train_loader yielded no batches")
        elapsed = time.perf_counter() - epoch_start
        record = {"epoch": epoch + 1, "iteration": self.iteration, "lr": self.optimizer.param_groups[0]["lr"]}
        record.update({key: value / steps for key, value in sums.items()})
        record.update({"time_s": elapsed, "images_per_s": images_seen / max(elapsed, 1e-9)})
        return record

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, float]:
        """COCO evaluation of the current model on ``val_loader``; returns the statistics on every rank (the
        full :class:`fastdet.eval.CocoEvaluation` is kept in :attr:`last_evaluation` on rank 0)."""
        from fastdet.eval import collect_detections, evaluate_detections

        if self.val_loader is None:
            raise ValueError("evaluate() needs the Trainer's val_loader and ground_truth")
        sampler = _sampler_of(self.val_loader)
        sharded = self.context.enabled and sampler is not None and sampler.num_replicas > 1
        detections = None
        if sharded:
            local = collect_detections(self.model, self.val_loader, self.device, amp=self.config.amp)
            gathered = [None] * self.context.world_size if self.context.is_main else None
            dist.gather_object(local, gathered, dst=0)
            if self.context.is_main:
                # a DistributedSampler pads the last round with repeated samples: keep one copy per image
                unique = {}
                for part in gathered:
                    for detection in part:
                        unique.setdefault(detection["image_id"], detection)
                detections = list(unique.values())
        elif self.context.is_main:
            detections = collect_detections(self.model, self.val_loader, self.device, amp=self.config.amp)
        stats = None
        if self.context.is_main:
            self.last_evaluation = evaluate_detections(
                self.ground_truth, detections, self.label_to_category_id,
                max_detections=self.config.eval_max_detections, backend=self.config.eval_backend,
            )
            stats = dict(self.last_evaluation.stats)
            if self.config.progress:
                print(f"evaluation after epoch {self.epoch}:\n{self.last_evaluation.summary}")
            if detections and all("segmentation" in d for d in detections):  # a mask model: mask AP too
                from fastdet.eval.segm import evaluate_segmentation

                segm = evaluate_segmentation(self.ground_truth, detections, self.label_to_category_id,
                                             max_detections=self.config.eval_max_detections,
                                             backend=self.config.eval_backend)
                stats.update({f"segm_{name}": value for name, value in segm.stats.items()})
                if self.config.progress:
                    print(f"mask (segm) evaluation:\n{segm.summary}")
        if self.context.enabled:
            box = [stats]
            dist.broadcast_object_list(box, src=0)
            stats = box[0]
        return stats

    def _track_metric(self, stats: dict[str, float]) -> tuple[bool, bool]:
        """Update the best metric; returns (stop early, improved)."""
        name = self.config.early_stopping_metric
        if name not in stats:
            raise ValueError(f"TrainConfig.early_stopping_metric {name!r} is not an evaluation statistic; "
                             f"choose one of {sorted(stats)}")
        value = stats[name]
        improved = value == value and (self.best_metric is None
                                       or value > self.best_metric + self.config.early_stopping_min_delta)
        if improved:
            self.best_metric = float(value)
            self.evaluations_without_improvement = 0
        else:
            self.evaluations_without_improvement += 1
        patience = self.config.early_stopping_patience
        return patience is not None and self.evaluations_without_improvement >= patience, improved

    # ------------------------------------------------------------------ checkpoints

    def _rng_state(self) -> dict:
        state = {"python": random.getstate(), "numpy": _numpy_rng_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "iters_per_epoch": self.iters_per_epoch,
            "best_metric": self.best_metric,
            "evaluations_without_improvement": self.evaluations_without_improvement,
            "history": self.history,
            "config": self.config.to_dict(),
            "world_size": self.context.world_size,
        }

    def save_checkpoint(self, path: str) -> None:
        """Write a checkpoint (model, optimiser, scheduler, epoch, iteration, best metric, history, config, and the
        RNG states of every rank). Under torchrun every rank must call it (the RNG states are gathered); rank 0
        writes. The file is written to a temporary name and renamed, so a crash never leaves a truncated
        checkpoint."""
        rng = self._rng_state()
        if self.context.enabled:
            states = [None] * self.context.world_size if self.context.is_main else None
            dist.gather_object(rng, states, dst=0)
        else:
            states = [rng]
        if not self.context.is_main:
            return
        checkpoint = self.state_dict()
        checkpoint["rng_states"] = states
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        temporary = f"{path}.tmp"
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)

    def resume(self, path: str) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`; :meth:`fit` then continues with the next epoch.

        With the same configuration, data and world size, the continued run is bit-identical to an uninterrupted
        one on the same machine: weights, optimiser moments, schedule position and every RNG are restored. The
        learning-rate schedule follows the current configuration (so ``epochs`` may be raised to train longer)."""
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint {path!r} does not exist")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(checkpoint, dict) or checkpoint.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{path!r} is not a fastdet training checkpoint (version {CHECKPOINT_VERSION})")
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        current_schedule = dict(self.schedule.__dict__)
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        # LambdaLR.load_state_dict overwrites the schedule object's fields with the saved ones; keep the current
        # configuration's schedule and recompute the learning rates at the restored position
        self.schedule.__dict__.update(current_schedule)
        position = self.scheduler.last_epoch
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * self.schedule(position)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if checkpoint["iters_per_epoch"] != self.iters_per_epoch:
            warnings.warn(f"the checkpoint was written with {checkpoint['iters_per_epoch']} iterations per epoch, "
                          f"the train_loader now has {self.iters_per_epoch}", stacklevel=2)
        self.epoch = int(checkpoint["epoch"])
        self.iteration = int(checkpoint["iteration"])
        self.best_metric = checkpoint["best_metric"]
        self.evaluations_without_improvement = int(checkpoint["evaluations_without_improvement"])
        self.history = list(checkpoint["history"])
        states = checkpoint["rng_states"]
        if len(states) == self.context.world_size:
            self._set_rng_state(states[self.context.rank])
        else:
            warnings.warn(f"the checkpoint holds RNG states of {len(states)} processes, this run has "
                          f"{self.context.world_size}; reseeding instead, so the continuation is not bit-identical",
                          stacklevel=2)
            seed_everything(self.config.seed + self.context.rank + self.epoch * 1000003)
        self._resumed_from = path

    def _set_rng_state(self, state: dict) -> None:
        random.setstate(state["python"])
        _set_numpy_rng_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            cuda_states = state["cuda"]
            if len(cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda_states)
