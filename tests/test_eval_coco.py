"""fastdet.eval COCO metrics: hand-computed cases, pycocotools parity, and the pitfalls the wrapper handles."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fastdet.eval import STAT_NAMES, collect_detections, evaluate_detections, evaluate_model

# COCO's 101 recall thresholds: AP of a curve with precision 1 up to recall r and 0 beyond is (#thresholds <= r)/101
RECALL_POINTS = 101


def _dataset(boxes_per_image, categories=((1, "cat"),), with_optional_fields=True):
    """A COCO dict from {image_id: [(x1, y1, x2, y2, category_id), ...]}."""
    images = [{"id": image_id, "width": 640, "height": 480} for image_id in boxes_per_image]
    annotations = []
    for image_id, boxes in boxes_per_image.items():
        for x1, y1, x2, y2, category in boxes:
            ann = {"image_id": image_id, "category_id": category, "bbox": [x1, y1, x2 - x1, y2 - y1]}
            if with_optional_fields:
                ann.update({"id": len(annotations) + 1, "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
            annotations.append(ann)
    dataset = {"images": images, "annotations": annotations,
               "categories": [{"id": cid, "name": name} for cid, name in categories]}
    if with_optional_fields:
        dataset["info"] = {"description": "test"}
    return dataset


def _detection(image_id, rows):
    """rows: [(x1, y1, x2, y2, score, label), ...]."""
    rows = torch.tensor(rows, dtype=torch.float64).reshape(-1, 6)
    return {"image_id": image_id, "boxes": rows[:, :4], "scores": rows[:, 4], "labels": rows[:, 5].long()}


# objects of every COCO area range: small < 32^2 <= medium < 96^2 <= large
OBJECTS = {
    1: [(10, 10, 30, 30, 1), (100, 100, 160, 160, 1), (200, 100, 400, 300, 1)],
    2: [(50, 60, 70, 75, 1), (300, 200, 360, 270, 1)],
    3: [(0, 0, 120, 110, 1), (400, 300, 420, 325, 1)],
}


def test_perfect_detections_score_one():
    gt = _dataset(OBJECTS)
    dets = [_detection(i, [(*b[:4], 0.9 - 0.1 * k, 1) for k, b in enumerate(boxes)]) for i, boxes in OBJECTS.items()]
    result = evaluate_detections(gt, dets)
    assert set(result.stats) == set(STAT_NAMES)
    for name in STAT_NAMES:
        # AR@1 keeps one detection per image: 3 of the 3 + 2 + 2 objects are found
        expected = 3 / 7 if name == "AR1" else 1.0
        assert result.stats[name] == pytest.approx(expected), name
    assert result.per_class_ap == {"cat": pytest.approx(1.0)}
    assert result.precision.shape == (10, 101, 1, 4, 3)
    assert "Average Precision" in result.summary and "maxDets=100" in result.summary


def test_half_the_objects_at_full_precision():
    boxes = [(0, 0, 50, 50, 1), (100, 0, 150, 50, 1), (0, 100, 50, 150, 1), (100, 100, 150, 150, 1)]
    gt = _dataset({7: boxes})
    result = evaluate_detections(gt, [_detection(7, [(*boxes[0][:4], 0.9, 1), (*boxes[2][:4], 0.8, 1)])])
    # recall thresholds 0.00 .. 0.50 (51 of them) have precision 1, the rest 0
    assert result.stats["AP"] == pytest.approx(51 / RECALL_POINTS)
    assert result.stats["AP50"] == pytest.approx(51 / RECALL_POINTS)
    assert result.stats["AR100"] == pytest.approx(0.5)
    assert result.stats["AR1"] == pytest.approx(0.25)


def test_false_positive_between_true_positives():
    boxes = [(0, 0, 50, 50, 1), (100, 0, 150, 50, 1)]
    gt = _dataset({1: boxes})
    det = _detection(1, [(*boxes[0][:4], 0.9, 1), (300, 300, 350, 350, 0.8, 1), (*boxes[1][:4], 0.7, 1)])
    result = evaluate_detections(gt, [det])
    # precision after each detection: 1, 1/2, 2/3 at recall 1/2, 1/2, 1; interpolated: 1 up to recall 0.5 (51
    # thresholds), 2/3 from there to 1 (50 thresholds)
    assert result.stats["AP"] == pytest.approx((51 + 50 * 2 / 3) / RECALL_POINTS)


def test_image_without_annotations_contributes_false_positives():
    gt = _dataset({1: [(10, 10, 60, 60, 1)], 2: []})
    dets = [_detection(1, [(10, 10, 60, 60, 0.5, 1)]), _detection(2, [(0, 0, 40, 40, 0.9, 1)])]
    result = evaluate_detections(gt, dets)
    # the false positive ranks first: precision 0 then 1/2 at recall 1, so every threshold reads 1/2
    assert result.stats["AP"] == pytest.approx(0.5)


def test_category_id_mapping():
    gt = _dataset({1: [(0, 0, 50, 50, 7), (60, 60, 120, 130, 3)]}, categories=((3, "dog"), (7, "person")))
    det = _detection(1, [(0, 0, 50, 50, 0.9, 1), (60, 60, 120, 130, 0.8, 2)])
    mapping = {1: 7, 2: 3}
    result = evaluate_detections(gt, [det], label_to_category_id=mapping)
    assert result.stats["AP"] == pytest.approx(1.0)
    assert result.per_class_ap == {"dog": pytest.approx(1.0), "person": pytest.approx(1.0)}
    assert result.category_ids == [3, 7]
    swapped = evaluate_detections(gt, [det], label_to_category_id={1: 3, 2: 7})
    assert swapped.stats["AP"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="not ground-truth categories.*label_to_category_id"):
        evaluate_detections(gt, [det])  # labels 1, 2 are not category ids
    with pytest.raises(ValueError, match=r"labels \[2\]"):
        evaluate_detections(gt, [det], label_to_category_id={1: 7})


def test_per_class_ap_and_empty_class():
    gt = _dataset({1: [(0, 0, 50, 50, 1), (60, 60, 120, 130, 2)]}, categories=((1, "a"), (2, "b"), (3, "c")))
    result = evaluate_detections(gt, [_detection(1, [(0, 0, 50, 50, 0.9, 1)])])
    assert result.per_class_ap["a"] == pytest.approx(1.0)
    assert result.per_class_ap["b"] == pytest.approx(0.0)
    assert math.isnan(result.per_class_ap["c"])  # no ground truth: undefined, and left out of the mean
    assert result.stats["AP"] == pytest.approx(0.5)


@pytest.mark.parametrize("detections", [[], [_detection(1, [])]])
def test_empty_detections_give_zero(detections):
    gt = _dataset(OBJECTS)
    result = evaluate_detections(gt, detections)
    assert result.num_detections == 0
    for name in STAT_NAMES:
        assert result.stats[name] == 0.0, name


def test_custom_max_detections():
    boxes = [(0, 0, 50, 50, 1), (100, 0, 150, 50, 1), (0, 100, 50, 150, 1)]
    gt = _dataset({1: boxes})
    det = _detection(1, [(*b[:4], 0.9 - 0.1 * k, 1) for k, b in enumerate(boxes)])
    result = evaluate_detections(gt, [det], max_detections=2)
    # only the two best detections count: recall 2/3; thresholds 0.00 .. 0.66 (67 of them) at precision 1
    assert result.stats["AP"] == pytest.approx(67 / RECALL_POINTS)
    assert result.stats["AR2"] == pytest.approx(2 / 3)
    assert result.max_detections == [1, 2]
    assert "AR100" not in result.stats and "AR10" not in result.stats
    large = evaluate_detections(gt, [det], max_detections=300)
    assert large.stats["AP"] == pytest.approx(1.0) and large.stats["AR300"] == pytest.approx(1.0)
    assert "maxDets=300" in large.summary
    with pytest.raises(ValueError, match="max_detections"):
        evaluate_detections(gt, [det], max_detections=0)


def test_matches_pycocotools_summarize(seed):
    generator = np.random.default_rng(seed)
    objects = {}
    for image_id in range(1, 9):
        count = int(generator.integers(0, 12))
        xy = generator.uniform(0, 400, (count, 2))
        wh = generator.uniform(4, 200, (count, 2))
        cats = generator.integers(1, 4, count)
        objects[image_id] = [(*xy[i], *(xy[i] + wh[i]), int(cats[i])) for i in range(count)]
    gt = _dataset(objects, categories=((1, "a"), (2, "b"), (3, "c")))
    dets, results = [], []
    for image_id, boxes in objects.items():
        rows = [(x1 + generator.normal(0, 6), y1 + generator.normal(0, 6), x2 + generator.normal(0, 6),
                 y2 + generator.normal(0, 6), float(generator.uniform()), c) for x1, y1, x2, y2, c in boxes]
        for _ in range(int(generator.integers(0, 130))):  # more than 100 per image on some images
            x, y = generator.uniform(0, 500, 2)
            rows.append((x, y, x + generator.uniform(5, 150), y + generator.uniform(5, 150),
                         float(generator.uniform()), int(generator.integers(1, 4))))
        dets.append(_detection(image_id, rows))
        for x1, y1, x2, y2, score, label in rows:
            results.append({"image_id": image_id, "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score})
    ours = evaluate_detections(gt, dets)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    reference = [np.nan if v == -1 else v for v in evaluator.stats]
    np.testing.assert_allclose([ours.stats[n] for n in STAT_NAMES], reference, rtol=1e-6, atol=1e-9,
                               err_msg=f"seed={seed}")
    np.testing.assert_allclose(ours.precision, evaluator.eval["precision"], atol=1e-9)


def test_missing_optional_fields_and_input_untouched():
    gt = _dataset({1: [(0, 0, 50, 50, 1)], 2: [(20, 20, 200, 100, 1)]}, with_optional_fields=False)
    before = copy.deepcopy(gt)
    dets = [_detection(1, [(0, 0, 50, 50, 0.9, 1)]), _detection(2, [(20, 20, 200, 100, 0.9, 1)])]
    before_dets = copy.deepcopy(dets)
    result = evaluate_detections(gt, dets)
    assert result.stats["AP"] == pytest.approx(1.0)
    assert result.stats["APl"] == pytest.approx(1.0)  # the filled-in area decides the range: 180 x 80 is large
    assert gt == before
    for a, b in zip(dets, before_dets):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_accepts_path_and_coco_object(tmp_path):
    gt = _dataset(OBJECTS)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    dets = [_detection(i, [(*b[:4], 0.5, 1) for b in boxes]) for i, boxes in OBJECTS.items()]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(path))
    annotations_before = copy.deepcopy(coco.dataset["annotations"])
    for source in (str(path), path, coco):
        assert evaluate_detections(source, dets).stats["AP"] == pytest.approx(1.0)
    assert coco.dataset["annotations"] == annotations_before  # pycocotools' "ignore" flag not written into it


def test_bad_inputs():
    gt = _dataset(OBJECTS)
    with pytest.raises(TypeError, match="ground_truth"):
        evaluate_detections(42, [])
    with pytest.raises(ValueError, match="does not exist"):
        evaluate_detections("/nonexistent/gt.json", [])
    with pytest.raises(ValueError, match="image ids not in ground_truth"):
        evaluate_detections(gt, [_detection(99, [(0, 0, 5, 5, 0.5, 1)])])
    with pytest.raises(ValueError, match="lacks the key"):
        evaluate_detections(gt, [{"image_id": 1, "boxes": torch.zeros(0, 4)}])
    with pytest.raises(ValueError, match="must match"):
        evaluate_detections(gt, [{"image_id": 1, "boxes": torch.zeros(2, 4), "scores": torch.zeros(1),
                                  "labels": torch.ones(2, dtype=torch.long)}])
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        evaluate_detections(gt, [{"image_id": 1, "boxes": torch.zeros(3), "scores": torch.zeros(0),
                                  "labels": torch.zeros(0, dtype=torch.long)}])
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_detections(gt, [_detection(1, [(0, 0, float("nan"), 5, 0.5, 1)])])
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_detections(gt, [], iou_type="segm")
    with pytest.raises(TypeError, match="detections"):
        evaluate_detections(gt, {"image_id": 1})


class _OracleDetector(torch.nn.Module):
    """Returns the ground-truth boxes of each image id encoded in the image's first pixel."""

    def __init__(self, objects):
        super().__init__()
        self.objects = objects
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, images, targets=None):
        outputs = []
        for image in images:
            boxes = self.objects[int(image[0, 0, 0].item())]
            rows = torch.tensor([b[:4] for b in boxes], dtype=torch.float32).reshape(-1, 4) * self.scale
            outputs.append({"boxes": rows, "scores": torch.linspace(0.9, 0.5, len(boxes)),
                            "labels": torch.tensor([b[4] for b in boxes], dtype=torch.long)})
        return outputs


def test_evaluate_model_runs_in_eval_mode_without_grad():
    gt = _dataset(OBJECTS)
    model = _OracleDetector(OBJECTS)
    model.train()

    def image(image_id):
        out = torch.zeros(3, 8, 8)
        out[0, 0, 0] = image_id
        return out

    ids = list(OBJECTS)
    loader = [([image(i) for i in ids[:2]], [{"image_id": torch.tensor(i)} for i in ids[:2]]),
              ([image(ids[2])], [{"image_id": ids[2]}])]
    result = evaluate_model(model, loader, gt, "cpu")
    assert result.stats["AP"] == pytest.approx(1.0)
    assert model.training  # restored
    detections = collect_detections(model, loader, "cpu")
    assert [d["image_id"] for d in detections] == ids
    assert not detections[0]["boxes"].requires_grad
    with pytest.raises(ValueError, match="image_id"):
        evaluate_model(model, [([image(1)], [{}])], gt, "cpu")


class _DetectorOnProposalTable(torch.nn.Module):
    """Like R-CNN / Fast R-CNN on a proposals file: it needs the images' ids and returns its table's boxes."""

    needs_image_ids = True

    def __init__(self, objects):
        super().__init__()
        self.objects = objects

    def forward(self, images, targets=None, *, image_ids=None):
        assert image_ids is not None and len(image_ids) == len(images)
        return [{"boxes": torch.tensor([b[:4] for b in self.objects[i]], dtype=torch.float32).reshape(-1, 4),
                 "scores": torch.linspace(0.9, 0.5, len(self.objects[i])),
                 "labels": torch.tensor([b[4] for b in self.objects[i]], dtype=torch.long)} for i in image_ids]


def test_models_that_need_image_ids_get_them():
    ids = list(OBJECTS)
    loader = [([torch.zeros(3, 8, 8)] * 2, [{"image_id": torch.tensor(i)} for i in ids[:2]]),
              ([torch.zeros(3, 8, 8)], [{"image_id": ids[2]}])]
    result = evaluate_model(_DetectorOnProposalTable(OBJECTS), loader, _dataset(OBJECTS), "cpu")
    assert result.stats["AP"] == pytest.approx(1.0)
