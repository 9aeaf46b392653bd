"""metrics.json (``fastdet eval``, the demo) and metrics.jsonl (the trainer) are strict JSON: a non-finite number, such
as the NaN of an undefined AP, is written as ``null``, never as the bare ``NaN`` that is not JSON (issue 11)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fastdet.cli._common import write_json
from fastdet.engine import MetricsLogger

NAN, INF = float("nan"), float("inf")


def strict_loads(text: str):
    """``json.loads`` that rejects ``NaN``, ``Infinity`` and ``-Infinity``, as every non-Python JSON parser does."""

    def reject(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=reject)


def test_strict_loads_rejects_bare_nan():
    with pytest.raises(ValueError, match="not JSON: NaN"):
        strict_loads(json.dumps({"AP": NAN}))


def test_write_json_writes_null_for_non_finite_numbers_at_any_depth(tmp_path):
    value = {
        "stats": {"AP": 0.5, "APs": NAN, "APl": INF},
        "per_class_ap": {"circle": -INF, "square": 0.25},
        "curve": [1.0, NAN, (NAN, 2)],
        "numpy": np.float32("nan"),
        "array": np.array([0.5, np.inf]),
        "tensor": torch.tensor([NAN, 1.0]),
        "scalar": torch.tensor(3),
        "images": 3,
        "name": "test",
        "flag": True,
        "none": None,
    }
    parsed = strict_loads(write_json(tmp_path / "metrics.json", value).read_text())
    assert parsed == {
        "stats": {"AP": 0.5, "APs": None, "APl": None},
        "per_class_ap": {"circle": None, "square": 0.25},
        "curve": [1.0, None, [None, 2]],
        "numpy": None,
        "array": [0.5, None],
        "tensor": [None, 1.0],
        "scalar": 3,
        "images": 3,
        "name": "test",
        "flag": True,
        "none": None,
    }


def test_write_json_fails_loudly_on_what_it_cannot_write_as_json(tmp_path, monkeypatch):
    # With the clean-up bypassed, allow_nan=False turns a NaN into an error instead of a file that is not JSON.
    import fastdet.engine.metrics_log as metrics_log

    monkeypatch.setattr(metrics_log, "json_safe", lambda value: value)
    with pytest.raises(ValueError):
        write_json(tmp_path / "metrics.json", {"AP": NAN})


def test_metrics_log_jsonl_is_strict_json(tmp_path):
    logger = MetricsLogger(str(tmp_path), "jsonl")
    logger.log({"kind": "epoch", "loss": NAN, "val_AP": INF, "lr": torch.tensor(0.1), "val_curve": [NAN, 0.5]})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = strict_loads(lines[0])
    assert record["loss"] is None and record["val_AP"] is None and record["val_curve"] == [None, 0.5]
    assert math.isclose(record["lr"], 0.1, rel_tol=1e-6)
    assert logger.read() == [record]


class _OneBoxModel(torch.nn.Module):
    """One fixed detection per image: enough for a COCO evaluation with defined and undefined statistics."""

    def forward(self, images):
        return [{"boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([1])} for _ in images]


def test_evaluation_metrics_json_is_strict_json(tmp_path):
    # 64 px images hold no large objects (area > 96^2), so APl and ARl are undefined (NaN) in this evaluation.
    from fastdet.cli._common import load_coco
    from fastdet.cli.evaluate import evaluate_and_report
    from fastdet.data import make_shapes_dataset

    paths = make_shapes_dataset(tmp_path / "data", num_images=10, image_size=(64, 64), seed=3)
    dataset = load_coco(paths["images"], paths["test"])
    evaluation = evaluate_and_report(_OneBoxModel(), dataset, torch.device("cpu"), None, tmp_path / "eval", quiet=True)
    assert math.isnan(evaluation.stats["APl"])
    metrics = strict_loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["stats"]["APl"] is None and metrics["stats"]["ARl"] is None
    assert set(metrics["stats"]) == set(evaluation.stats)
    assert metrics["images"] == len(dataset)
