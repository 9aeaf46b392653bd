"""Mask AP (fastdet.eval.segm) against pycocotools' own COCOeval on the same data, and masks drawn by predict's
visualiser."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch

from fastdet.data.masks import encode_mask
from fastdet.eval import evaluate_segmentation, masks_to_rles
from fastdet.visualize import draw_detections

pytest.importorskip("pycocotools")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

H, W = 40, 60


def _ellipse(cx, cy, rx, ry):
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    return (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).astype(np.uint8)


def _ground_truth():
    masks = [_ellipse(15, 12, 10, 8), _ellipse(40, 25, 12, 10), _ellipse(30, 30, 5, 4)]
    annotations = []
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        box = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
        annotations.append({"id": i + 1, "image_id": 1, "category_id": 1 + i % 2, "bbox": box, "iscrowd": 0,
                            "area": float(m.sum()), "segmentation": encode_mask(m)})
    gt = {"images": [{"id": 1, "width": W, "height": H, "file_name": "a.png"}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": annotations}
    return gt, masks


def test_masks_to_rles_round_trip():
    probs = torch.rand(3, 1, H, W)
    rles = masks_to_rles(probs)
    from pycocotools import mask as mask_api

    for p, rle in zip(probs, rles):
        decoded = mask_api.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded, (p[0] > 0.5).numpy().astype(np.uint8))
    assert masks_to_rles(probs[:0]) == []


def test_segm_ap_matches_pycocotools(seed):
    gt, masks = _ground_truth()
    g = torch.Generator().manual_seed(seed)
    # detections: each true mask slightly eroded/dilated (soft probabilities), plus a false positive
    probs, labels, boxes = [], [], []
    for ann, m in zip(gt["annotations"], masks):
        noise = torch.rand(H, W, generator=g) * 0.3
        probs.append(torch.from_numpy(m).float() * 0.7 + noise)
        labels.append(ann["category_id"])
        x, y, w, h = ann["bbox"]
        boxes.append([x, y, x + w, y + h])
    probs.append(torch.from_numpy(_ellipse(50, 8, 6, 5)).float())
    labels.append(1)
    boxes.append([44.0, 3.0, 56.0, 13.0])
    scores = torch.rand(len(labels), generator=g) * 0.9
    scores[-1] = 0.95  # the false positive ranks first: AP < 1
    detection = {"image_id": 1, "boxes": torch.tensor(boxes), "scores": scores, "labels": torch.tensor(labels),
                 "segmentation": masks_to_rles(torch.stack(probs)[:, None])}
    ours = evaluate_segmentation(gt, [detection])
    # pycocotools directly
    coco_gt = COCO()
    coco_gt.dataset = gt
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        results = [{"image_id": 1, "category_id": int(c), "segmentation": rle, "score": float(s)}
                   for c, rle, s in zip(labels, detection["segmentation"], scores.tolist())]
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ours.stats["AP"] == pytest.approx(ev.stats[0]) and ours.stats["AP50"] == pytest.approx(ev.stats[1])
    assert ours.stats["AR100"] == pytest.approx(ev.stats[8])
    assert 0 < ours.stats["AP"] < 1


def test_segmentation_is_required():
    gt, _ = _ground_truth()
    with pytest.raises(ValueError, match="segmentation"):
        evaluate_segmentation(gt, [{"image_id": 1, "boxes": torch.zeros(1, 4), "scores": torch.ones(1),
                                    "labels": torch.ones(1, dtype=torch.int64)}])


def test_draw_detections_paints_masks():
    image = torch.zeros(3, H, W)
    mask = torch.zeros(1, 1, H, W)
    mask[0, 0, 10:20, 10:30] = 0.9
    drawn = np.asarray(draw_detections(image, torch.tensor([[5.0, 5, 35, 25]]), torch.tensor([1]),
                                       torch.tensor([0.9]), masks=mask, min_side=1))
    plain = np.asarray(draw_detections(image, torch.tensor([[5.0, 5, 35, 25]]), torch.tensor([1]),
                                       torch.tensor([0.9]), min_side=1))
    assert (drawn[16:20, 12:28] != plain[16:20, 12:28]).any(axis=-1).all()  # below the label
    assert (drawn[30:, 40:] == plain[30:, 40:]).all()
    with pytest.raises(ValueError, match="image-sized"):
        draw_detections(image, torch.zeros(1, 4), torch.tensor([1]), masks=torch.zeros(1, 1, 5, 5))


def test_native_and_pycocotools_segm_agree_and_native_gives_f1_curves(seed):
    from fastdet.eval import f1_confidence_from_evaluation, precision_recall_curves

    gt, masks = _ground_truth()
    g = torch.Generator().manual_seed(seed)
    detections = []
    for image_id in (1,):
        probs = torch.rand(12, 1, H, W, generator=g) * 0.4
        for k, m in enumerate(masks):  # some detections near the true masks, the rest noise
            probs[k, 0] += torch.from_numpy(m).float() * 0.5
        labels = torch.randint(1, 3, (12,), generator=g)
        boxes = torch.tensor([[0.0, 0.0, W, H]]).repeat(12, 1)
        detections.append({"image_id": image_id, "boxes": boxes, "scores": torch.rand(12, generator=g),
                           "labels": labels, "segmentation": masks_to_rles(probs)})
    native = evaluate_segmentation(gt, detections)
    reference = evaluate_segmentation(gt, detections, backend="pycocotools")
    for name, value in reference.stats.items():
        assert native.stats[name] == pytest.approx(value, abs=1e-12, nan_ok=True), (name, f"seed={seed}")
    np.testing.assert_allclose(native.precision, reference.precision, atol=1e-12)
    assert reference.matches is None and native.matches is not None
    f1 = f1_confidence_from_evaluation(native)
    assert f1.f1.shape[0] == 2 and np.nanmax(f1.f1) <= 1
    # the F1 curve at the lowest confidence counts every counted detection: its recall is the evaluated recall at 0.5
    true_positive = native.matches.true_positive[0]
    for k in range(2):
        tp = int(true_positive[native.matches.category_index == k].sum())
        assert f1.recall[k, 0] == pytest.approx(tp / native.matches.num_ground_truth[k])
    assert precision_recall_curves(native).precision.shape == (2, 101)
    with pytest.raises(ValueError, match="backend"):
        evaluate_segmentation(gt, detections, backend="nope")
