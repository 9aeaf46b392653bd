"""fastdet.engine.Trainer on a toy detector: loss goes down, exact resume, schedules, early stopping, logs, NaN."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastdet.engine import (
    MetricsLogger,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    WarmupSchedule,
    build_data_loader,
    build_optimizer,
    collate_pairs,
)

IMAGE_SIZE = 16


@pytest.fixture(autouse=True)
def _single_thread():
    # the tensors here are tiny: intra-op threads only add synchronisation waits (10x slower on a shared CPU)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class BoxDataset(Dataset):
    """One bright rectangle per 16x16 image; the target is its box. Random flips draw from numpy and Python's
    generators (so a resumed run must restore both)."""

    def __init__(self, length: int = 32, augment: bool = True):
        self.length = length
        self.augment = augment
        generator = torch.Generator().manual_seed(1234)
        corner = torch.randint(0, 8, (length, 2), generator=generator)
        size = torch.randint(4, 8, (length, 2), generator=generator)
        self.boxes = torch.cat([corner, corner + size], 1).float()

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        x1, y1, x2, y2 = self.boxes[index].long().tolist()
        image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE)
        image[:, y1:y2, x1:x2] = 1.0
        box = self.boxes[index].clone()
        if self.augment and np.random.rand() < 0.5:
            image = image.flip(-1)
            box = torch.tensor([IMAGE_SIZE - box[2], box[1], IMAGE_SIZE - box[0], box[3]])
        if self.augment and random.random() < 0.5:
            image = image.flip(-2)
            box = torch.tensor([box[0], IMAGE_SIZE - box[3], box[2], IMAGE_SIZE - box[1]])
        return image, {"boxes": box[None], "labels": torch.ones(1, dtype=torch.long), "image_id": index + 1}

    def coco(self):
        boxes = self.boxes.tolist()
        return {
            "images": [{"id": i + 1, "width": IMAGE_SIZE, "height": IMAGE_SIZE} for i in range(self.length)],
            "categories": [{"id": 1, "name": "box"}],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1,
                             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]} for i, b in enumerate(boxes)],
        }


class ToyDetector(nn.Module):
    """Predicts one box per image (centre and size as fractions of the image); L1 loss in training mode, a list of
    detection dicts in eval mode. Dropout makes the forward pass consume torch's RNG."""

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Dropout(dropout), nn.Linear(128, 4),
        )
        self.recorded_losses: list[float] = []
        self.seen_image_ids: list[int] = []
        self.nan_at_step: int | None = None
        self.crash_at_step: int | None = None
        self.steps = 0

    def _boxes(self, images):
        batch = torch.stack(list(images))
        height, width = batch.shape[-2:]
        cx, cy, w, h = torch.sigmoid(self.body(batch)).unbind(-1)
        scale = batch.new_tensor([width, height, width, height])
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * scale, scale

    def forward(self, images, targets=None):
        boxes, scale = self._boxes(images)
        if not self.training:
            return [{"boxes": b[None], "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.long)}
                    for b in boxes]
        self.steps += 1
        if self.crash_at_step == self.steps:
            raise RuntimeError("simulated crash")
        self.seen_image_ids.extend(int(t["image_id"]) for t in targets)
        target = torch.stack([t["boxes"][0] for t in targets])
        loss_box = (boxes / scale - target / scale).abs().mean()
        predicted_size = (boxes[:, 2:] - boxes[:, :2]) / scale[2:]
        loss_size = (predicted_size - (target[:, 2:] - target[:, :2]) / scale[2:]).abs().mean()
        if self.nan_at_step == self.steps:
            loss_box = loss_box * float("nan")
        self.recorded_losses.append(float((loss_box + loss_size).detach()))
        return {"loss_box": loss_box, "loss_size": loss_size}


def _loader(dataset, batch_size=8, shuffle=True):
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_pairs)


def _config(**overrides):
    values = dict(epochs=3, optimizer="adamw", lr=0.01, weight_decay=1e-4, schedule="cosine", warmup_iters=4,
                  progress=False, eval_every=0, device="cpu", seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def test_short_run_lowers_the_loss():
    torch.manual_seed(0)
    model = ToyDetector(dropout=0.0)
    dataset = BoxDataset(32, augment=False)
    trainer = Trainer(model, _config(epochs=8, lr=0.03, warmup_iters=2), _loader(dataset))
    history = trainer.fit()
    assert len(history) == 8 and trainer.iteration == 8 * 4
    first, last = history[0]["loss"], history[-1]["loss"]
    assert last < 0.6 * first, (first, last)
    assert set(history[0]) >= {"epoch", "iteration", "lr", "loss", "loss_box", "loss_size", "images_per_s"}


def _run_with_crash(tmp_path, crash_at_step=None, resume=False):
    torch.manual_seed(7 if resume else 0)  # a resumed run starts from different weights: the checkpoint must win
    model = ToyDetector()
    model.crash_at_step = crash_at_step
    config = _config(epochs=4, grad_clip_norm=1.0, output_dir=str(tmp_path), log_every=2)
    trainer = Trainer(model, config, _loader(BoxDataset(24)))
    if resume:
        trainer.resume(str(tmp_path / "last.pt"))
    return trainer, model


def test_resume_continues_bit_identically(tmp_path):
    uninterrupted, model_a = _run_with_crash(tmp_path / "a")
    history_a = uninterrupted.fit()

    crashed, _ = _run_with_crash(tmp_path / "b", crash_at_step=2 * 3 + 1)  # the first step of epoch 3
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    resumed, model_b = _run_with_crash(tmp_path / "b", resume=True)
    assert resumed.epoch == 2 and resumed.iteration == 6
    history_b = resumed.fit()

    assert model_b.recorded_losses == model_a.recorded_losses[6:]  # exact float equality, step by step
    for key in ("loss", "lr", "iteration"):
        assert [r[key] for r in history_b] == [r[key] for r in history_a], key
    for name, value in model_a.state_dict().items():
        assert torch.equal(value, model_b.state_dict()[name]), name


def test_warmup_and_cosine_values():
    schedule = WarmupSchedule(total_iters=100, kind="cosine", warmup_iters=10, warmup_factor=0.1, min_lr_ratio=0.0)
    assert schedule(0) == pytest.approx(0.1)
    assert schedule(5) == pytest.approx((0.1 * 0.5 + 0.5) * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert schedule(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))
    assert schedule(50) == pytest.approx(0.5)
    assert schedule(100) == pytest.approx(0.0) and schedule(150) == pytest.approx(0.0)
    floor = WarmupSchedule(total_iters=100, min_lr_ratio=0.2)
    assert floor(100) == pytest.approx(0.2) and floor(50) == pytest.approx(0.6)
    step = WarmupSchedule(total_iters=100, kind="step", milestones=[30, 60], gamma=0.1)
    assert [step(i) for i in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    constant = WarmupSchedule(total_iters=10, kind="constant", warmup_iters=4, warmup_factor=0.2)
    assert [constant(i) for i in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_trainer_steps_the_schedule_per_iteration():
    model = ToyDetector()
    config = _config(epochs=2, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, schedule="step",
                     milestones=(1,), gamma=0.5, warmup_iters=3, warmup_factor=0.25)
    trainer = Trainer(model, config, _loader(BoxDataset(16)))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.25)
    history = trainer.fit()
    # 2 iterations per epoch, so the epoch-1 milestone is iteration 2: after epoch 1 the position is 2 (warmup
    # 0.25 * 1/3 + 2/3 = 0.75, milestone reached), after epoch 2 it is 4 (warmup over)
    assert history[0]["lr"] == pytest.approx(0.1 * 0.75 * 0.5)
    assert history[1]["lr"] == pytest.approx(0.1 * 0.5)
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.defaults["nesterov"]


def test_no_weight_decay_on_norm_and_bias():
    model = ToyDetector()
    optimizer = build_optimizer(model, _config(weight_decay=0.05))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model.body[0].weight), id(model.body[6].weight)}
    assert len(no_decay["params"]) == 4  # conv bias, BN weight and bias, linear bias
    everything = build_optimizer(model, _config(weight_decay=0.05, decay_norm_and_bias=True))
    assert len(everything.param_groups) == 1 and len(everything.param_groups[0]["params"]) == 6


def test_early_stopping_and_checkpoints(tmp_path):
    dataset = BoxDataset(16, augment=False)
    model = ToyDetector(dropout=0.0)
    # a learning rate too small to change the predictions: AP stays flat, so patience runs out after 1 + 2 evals
    config = _config(epochs=10, lr=1e-12, warmup_iters=0, eval_every=1, early_stopping_patience=2,
                     output_dir=str(tmp_path))
    trainer = Trainer(model, config, _loader(dataset), _loader(dataset, shuffle=False), dataset.coco())
    history = trainer.fit()
    assert len(history) == 3
    assert trainer.evaluations_without_improvement == 2
    assert all("val_AP" in record for record in history)
    assert trainer.best_metric == pytest.approx(history[0]["val_AP"])
    assert trainer.last_evaluation is not None
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert best["epoch"] == 1 and last["epoch"] == 3 and last["best_metric"] == trainer.best_metric


def test_early_stopping_metric_must_exist():
    dataset = BoxDataset(8, augment=False)
    config = _config(epochs=1, eval_every=1, early_stopping_metric="mAP")
    trainer = Trainer(ToyDetector(), config, _loader(dataset), _loader(dataset, shuffle=False), dataset.coco())
    with pytest.raises(ValueError, match="early_stopping_metric 'mAP'"):
        trainer.fit()


@pytest.mark.parametrize("log_format", ["jsonl", "csv"])
def test_metrics_log_written(tmp_path, log_format):
    dataset = BoxDataset(16, augment=False)
    config = _config(epochs=2, log_every=1, eval_every=2, output_dir=str(tmp_path), log_format=log_format)
    Trainer(ToyDetector(), config, _loader(dataset), _loader(dataset, shuffle=False), dataset.coco()).fit()
    records = MetricsLogger(str(tmp_path), log_format).read()
    kinds = [r["kind"] for r in records]
    assert kinds == ["train", "train", "epoch", "train", "train", "epoch"]
    assert "val_AP" in records[-1] and float(records[-1]["val_AP"]) >= 0
    assert float(records[0]["loss"]) > 0 and float(records[0]["images_per_s"]) > 0
    if log_format == "jsonl":
        with open(tmp_path / "metrics.jsonl") as handle:
            assert all(json.loads(line) for line in handle)


def test_nan_loss_raises_with_the_step():
    model = ToyDetector()
    model.nan_at_step = 3
    trainer = Trainer(model, _config(epochs=2), _loader(BoxDataset(16)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, iteration 1 .*global step 3.*loss_box=nan"):
        trainer.fit()
    assert trainer.iteration == 2
    assert all(torch.isfinite(v.float()).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it did train before


def test_bfloat16_autocast_trains():
    model = ToyDetector()
    trainer = Trainer(model, _config(epochs=1, amp=True), _loader(BoxDataset(16)))
    history = trainer.fit()
    assert math.isfinite(history[0]["loss"])
    assert model.body[0].weight.dtype == torch.float32


def test_build_data_loader_shards_and_reshuffles():
    from fastdet.engine import DistributedContext

    dataset = BoxDataset(10, augment=False)
    shards = [build_data_loader(dataset, 2, seed=3, context=DistributedContext(rank, 2, rank)) for rank in (0, 1)]
    seen = [[int(t["image_id"]) for _, targets in loader for t in targets] for loader in shards]
    assert sorted(seen[0] + seen[1]) == list(range(1, 11))
    shards[0].sampler.set_epoch(1)
    assert [int(t["image_id"]) for _, targets in shards[0] for t in targets] != seen[0]
    with pytest.raises(ValueError, match="batch_size"):
        build_data_loader(dataset, 0)


def test_bad_arguments():
    dataset = BoxDataset(8)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="adam")
    with pytest.raises(ValueError, match="milestones"):
        TrainConfig(milestones=(5, 2))
    with pytest.raises(ValueError, match="nesterov"):
        TrainConfig(optimizer="adamw", nesterov=True)
    with pytest.raises(ValueError, match="together"):
        Trainer(ToyDetector(), _config(), _loader(dataset), val_loader=_loader(dataset))
    with pytest.raises(TypeError, match="TrainConfig"):
        Trainer(ToyDetector(), {"epochs": 1}, _loader(dataset))
    with pytest.raises(ValueError, match="empty"):
        Trainer(ToyDetector(), _config(), [])

    class ReturnsList(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(()))

        def forward(self, images, targets=None):
            return [self.weight]

    with pytest.raises(TypeError, match="dict of losses"):
        Trainer(ReturnsList(), _config(), _loader(dataset)).fit()
    assert TrainConfig.from_dict(_config().to_dict()) == _config()
    with pytest.raises(ValueError, match="unknown TrainConfig"):
        TrainConfig.from_dict({"epochz": 3})
