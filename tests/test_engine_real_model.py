"""Smoke test: the Trainer and COCO evaluation drive a real fastdet detector (the smallest Faster R-CNN)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from fastdet.engine import TrainConfig, Trainer, collate_pairs

faster_rcnn = pytest.importorskip("fastdet.models.faster_rcnn")


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _samples(count: int):
    generator = torch.Generator().manual_seed(0)
    samples, annotations = [], []
    for index in range(count):
        image = torch.rand(3, 64, 80, generator=generator) * 0.2
        x1, y1 = 8 + 4 * index, 10 + 2 * index
        box = torch.tensor([[x1, y1, x1 + 30.0, y1 + 24.0]])
        image[:, y1:y1 + 24, x1:x1 + 30] = 0.9
        label = 1 + index % 2
        samples.append((image, {"boxes": box, "labels": torch.tensor([label]), "image_id": index + 1}))
        annotations.append({"id": index + 1, "image_id": index + 1, "category_id": 10 * label,
                            "bbox": [x1, y1, 30.0, 24.0]})
    ground_truth = {"images": [{"id": i + 1} for i in range(count)], "annotations": annotations,
                    "categories": [{"id": 10, "name": "a"}, {"id": 20, "name": "b"}]}
    return samples, ground_truth


def test_trainer_runs_faster_rcnn(tmp_path):
    torch.manual_seed(0)
    model = faster_rcnn.fasterrcnn_resnet18_fpn(num_classes=3, min_size=64, max_size=96,
                                                rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                                                rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                                                box_batch_size_per_image=32)
    samples, ground_truth = _samples(4)
    loader = DataLoader(samples, batch_size=2, collate_fn=collate_pairs)
    config = TrainConfig(epochs=1, optimizer="sgd", lr=0.005, warmup_iters=1, grad_clip_norm=10.0, device="cpu",
                         progress=False, eval_every=1, output_dir=str(tmp_path))
    trainer = Trainer(model, config, loader, loader, ground_truth, label_to_category_id={1: 10, 2: 20})
    history = trainer.fit()
    record = history[0]
    assert math.isfinite(record["loss"])
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(record)
    assert 0.0 <= record["val_AP"] <= 1.0
    assert (tmp_path / "last.pt").exists()
