"""fastdet.eval curves: confusion matrix and F1 on hand-built cases, PR curves from pycocotools, PNG output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdet.eval import (
    confusion_matrix,
    evaluate_detections,
    f1_confidence_curves,
    match_detections,
    plot_confusion_matrix,
    plot_f1_confidence,
    plot_precision_recall,
    precision_recall_curves,
    targets_from_coco,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _det(rows):
    rows = torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)
    return {"boxes": rows[:, :4], "scores": rows[:, 4], "labels": rows[:, 5].long()}


def _gt(rows):
    rows = torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)
    return {"boxes": rows[:, :4], "labels": rows[:, 4].long()}


A, B, C, D = (0, 0, 50, 50), (100, 100, 160, 150), (300, 300, 340, 360), (10, 200, 90, 260)


def test_confusion_matrix_hand_built():
    detections = [
        _det([(*A, 0.9, 1),     # correct
              (*B, 0.8, 1),     # class 2 object predicted as class 1
              (*C, 0.9, 2),     # nothing there: false positive
              (*A, 0.1, 2)]),   # below the score threshold: ignored
        _det([]),
    ]
    targets = [_gt([(*A, 1), (*B, 2)]), _gt([(*D, 2)])]  # D is missed
    matrix = confusion_matrix(detections, targets, num_classes=2, iou_threshold=0.5, score_threshold=0.25)
    expected = np.zeros((3, 3), dtype=np.int64)
    expected[1, 1] = 1  # [predicted, true]
    expected[1, 2] = 1
    expected[2, 0] = 1
    expected[0, 2] = 1
    np.testing.assert_array_equal(matrix, expected)
    # lowering the score threshold adds the duplicate on A: A is already taken by the better match, so it is a FP
    low = confusion_matrix(detections, targets, num_classes=2, score_threshold=0.0)
    expected[2, 0] += 1
    np.testing.assert_array_equal(low, expected)


def test_confusion_matrix_iou_threshold():
    shifted = (0, 0, 50, 70)  # IoU with A: 2500 / 3500 = 0.714
    detections, targets = [_det([(*shifted, 0.9, 1)])], [_gt([(*A, 1)])]
    assert confusion_matrix(detections, targets, 1, iou_threshold=0.7)[1, 1] == 1
    matrix = confusion_matrix(detections, targets, 1, iou_threshold=0.75)
    np.testing.assert_array_equal(matrix, [[0, 1], [1, 0]])


def test_matching_prefers_highest_iou_and_is_one_to_one(seed):
    generator = torch.Generator().manual_seed(seed)
    # many images at once: each image's detections are jittered copies of its own ground truth
    counts = torch.randint(0, 6, (40,), generator=generator)
    gt_boxes = torch.rand(int(counts.sum()), 2, generator=generator) * 500
    gt_boxes = torch.cat([gt_boxes, gt_boxes + 30 + torch.rand(gt_boxes.shape[0], 2, generator=generator) * 60], 1)
    det_boxes = gt_boxes + torch.randn(gt_boxes.shape, generator=generator) * 2
    labels = torch.ones(gt_boxes.shape[0], dtype=torch.long)
    matched = match_detections(det_boxes, labels, counts, gt_boxes, labels, counts, 0.5, class_aware=True)
    # jitter of 2 px on 30+ px boxes keeps each detection closest to its own object
    assert torch.equal(matched, torch.arange(gt_boxes.shape[0])), f"seed={seed}"
    # two detections on one object: the better one wins, the other is unmatched
    two = match_detections(torch.tensor([[0.0, 0, 10, 12], [0.0, 0, 10, 10]]), torch.ones(2, dtype=torch.long),
                           torch.tensor([2]), torch.tensor([[0.0, 0, 10, 10]]), torch.ones(1, dtype=torch.long),
                           torch.tensor([1]), 0.5, class_aware=True)
    assert two.tolist() == [-1, 0]


def test_f1_confidence_hand_built():
    # scores exactly representable in float32 and on the threshold grid, so the ">=" at a threshold is tested
    detections = [_det([(*A, 0.9, 1), (*C, 0.5, 1), (*B, 0.25, 1)])]
    targets = [_gt([(*A, 1), (*B, 1)])]
    curves = f1_confidence_curves(detections, targets, num_classes=1, num_points=21)
    at = {round(float(c), 2): i for i, c in enumerate(curves.confidence)}
    # threshold 0.5: A (TP) and C (FP, score exactly 0.5) kept -> P 1/2, R 1/2, F1 1/2
    i = at[0.5]
    assert curves.precision[0, i] == pytest.approx(0.5) and curves.recall[0, i] == pytest.approx(0.5)
    assert curves.f1[0, i] == pytest.approx(0.5)
    # threshold 0.55: only A -> P 1, R 1/2, F1 2/3
    i = at[0.55]
    assert curves.precision[0, i] == pytest.approx(1.0) and curves.f1[0, i] == pytest.approx(2 / 3)
    # threshold 0.25: all three -> P 2/3, R 1, F1 0.8
    i = at[0.25]
    assert curves.precision[0, i] == pytest.approx(2 / 3) and curves.recall[0, i] == pytest.approx(1.0)
    assert curves.f1[0, i] == pytest.approx(0.8)
    # threshold 0.95: nothing kept -> precision undefined, recall 0, F1 0
    i = at[0.95]
    assert math.isnan(curves.precision[0, i]) and curves.recall[0, i] == 0 and curves.f1[0, i] == 0
    assert curves.best_f1 == pytest.approx(0.8) and curves.best_threshold == pytest.approx(0.0)
    np.testing.assert_allclose(curves.mean_f1, curves.f1[0])


def test_f1_class_aware_and_missing_classes():
    detections = [_det([(*A, 0.9, 2)])]  # right box, wrong class
    targets = [_gt([(*A, 1)])]
    curves = f1_confidence_curves(detections, targets, num_classes=3)
    assert curves.f1[0, 0] == 0 and curves.f1[1, 0] == 0  # a miss for class 1, a false positive for class 2
    assert np.isnan(curves.f1[2]).all()  # class 3: no detections, no ground truth
    assert curves.num_ground_truth.tolist() == [1, 0, 0]


def test_bad_inputs():
    with pytest.raises(ValueError, match="same images"):
        confusion_matrix([_det([])], [], 1)
    with pytest.raises(ValueError, match="1..num_classes"):
        confusion_matrix([_det([(*A, 0.9, 0)])], [_gt([])], 1)
    with pytest.raises(ValueError, match="1..num_classes"):
        confusion_matrix([_det([])], [_gt([(*A, 3)])], 2)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix([_det([])], [_gt([])], 0)
    with pytest.raises(ValueError, match="lacks the key"):
        f1_confidence_curves([{"boxes": torch.zeros(0, 4)}], [_gt([])], 1)
    with pytest.raises(ValueError, match="iou_threshold"):
        confusion_matrix([_det([])], [_gt([])], 1, iou_threshold=1.5)


def _coco():
    return {
        "images": [{"id": 5}, {"id": 9}],
        "categories": [{"id": 11, "name": "car"}, {"id": 12, "name": "bike"}],
        "annotations": [
            {"id": 1, "image_id": 9, "category_id": 12, "bbox": [100, 100, 60, 50]},
            {"id": 2, "image_id": 5, "category_id": 11, "bbox": [0, 0, 50, 50]},
            {"id": 3, "image_id": 9, "category_id": 11, "bbox": [0, 0, 50, 50], "iscrowd": 1},
        ],
    }


def test_targets_from_coco():
    targets = targets_from_coco(_coco(), [9, 5, 7], label_to_category_id={1: 11, 2: 12})
    assert torch.equal(targets[0]["boxes"], torch.tensor([[100.0, 100, 160, 150]]))  # xyxy, crowd left out
    assert targets[0]["labels"].tolist() == [2]
    assert targets[1]["labels"].tolist() == [1]
    assert targets[2]["boxes"].shape == (0, 4)


def test_pr_curves_and_pngs(tmp_path):
    coco = _coco()
    mapping = {1: 11, 2: 12}
    detections = [{"image_id": 5, **_det([(0, 0, 50, 50, 0.9, 1)])},
                  {"image_id": 9, **_det([(300, 300, 340, 360, 0.8, 2)])}]
    evaluation = evaluate_detections(coco, detections, label_to_category_id=mapping)
    curves = precision_recall_curves(evaluation, iou_threshold=0.5)
    assert curves.precision.shape == (2, 101) and curves.recall.shape == (101,)
    np.testing.assert_allclose(curves.precision[0], 1.0)  # car: found at full precision
    np.testing.assert_allclose(curves.precision[1], 0.0)  # bike: missed
    assert curves.average_precision.tolist() == pytest.approx([1.0, 0.0])
    np.testing.assert_allclose(curves.mean_precision, 0.5)
    with pytest.raises(ValueError, match="iou_threshold"):
        precision_recall_curves(evaluation, iou_threshold=0.52)

    targets = targets_from_coco(coco, [5, 9], label_to_category_id=mapping)
    f1 = f1_confidence_curves(detections, targets, num_classes=2)
    matrix = confusion_matrix(detections, targets, num_classes=2)
    paths = [
        plot_precision_recall(curves, tmp_path / "plots" / "pr.png"),
        plot_f1_confidence(f1, tmp_path / "f1.png", class_names=["car", "bike"]),
        plot_confusion_matrix(matrix, tmp_path / "confusion.png", class_names=["car", "bike"]),
        plot_confusion_matrix(matrix, tmp_path / "confusion_counts.png", normalize=False),
    ]
    for path in paths:
        with open(path, "rb") as handle:
            data = handle.read()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000, path
    with pytest.raises(ValueError, match="class_names"):
        plot_confusion_matrix(matrix, tmp_path / "bad.png", class_names=["car"])
