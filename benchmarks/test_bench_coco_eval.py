"""COCO evaluation (issue 14): ``evaluate()`` + ``accumulate()`` of fastdet's native ``COCOeval`` against
pycocotools' and faster-coco-eval's, side by side in one run, on the same synthetic results.

Sizes: bbox on 5,000 images x 100 detections x 80 classes (issue 14's size); segm on 500 images x 100 masks. With
``--benchmark-disable`` (the CI smoke run) every body runs once on 40 images, so the smoke run stays fast.
Loading the results (``COCO.loadRes``) is timed on its own, and fastdet's share of ``evaluate()`` spent gathering the
annotations into arrays is recorded in ``extra_info["load_seconds"]``. The end-to-end fast path from model outputs
(``fastdet.eval.evaluate_detections`` on tensors, no JSON and no loadRes) is timed too.

These entries carry ``coco_impl`` (not ``impl``) in ``extra_info``: ``benchmarks/report.py``'s op table does not
list them; their numbers are kept by hand in RESULTS.md's "COCO evaluator" section.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io

import numpy as np
import pytest
import torch

IMPLS = ("fastdet", "pycocotools", "faster_coco_eval")
BBOX_IMAGES, SEGM_IMAGES, SMOKE_IMAGES = 5000, 500, 40
DETS_PER_IMAGE, CLASSES = 100, 80
HEIGHT, WIDTH = 480, 640


@functools.lru_cache(maxsize=4)
def synthetic(images: int, segm: bool, seed: int = 0):
    """(ground-truth dataset dict, result list, per-image detection tensors) shaped like a detector's COCO output.

    1-15 objects per image (log-uniform 8-300 px sides, 80 classes, 1% crowd); 100 detections per image, 60% of them
    jittered copies of an object (80% with its class), the rest random boxes of random classes; uniform scores."""
    rng = np.random.default_rng(seed)
    images_list = [{"id": i + 1, "height": HEIGHT, "width": WIDTH, "file_name": f"{i}.jpg"} for i in range(images)]
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(CLASSES)]
    n_obj = rng.integers(1, 16, images)
    obj_img = np.repeat(np.arange(images), n_obj)
    n = obj_img.shape[0]
    size = np.exp(rng.uniform(np.log(8), np.log(300), (n, 2)))
    xy = rng.uniform(0, 1, (n, 2)) * (np.array([WIDTH, HEIGHT]) - size).clip(1)
    obj_cls = rng.integers(1, CLASSES + 1, n)
    crowd = rng.random(n) < 0.01
    annotations = []
    for i in range(n):
        x, y, w, h = float(xy[i, 0]), float(xy[i, 1]), float(size[i, 0]), float(size[i, 1])
        ann = {"id": i + 1, "image_id": int(obj_img[i]) + 1, "category_id": int(obj_cls[i]), "bbox": [x, y, w, h],
               "area": w * h, "iscrowd": int(crowd[i])}
        if segm:
            ann["segmentation"] = [[x, y, x + w, y + 0.2 * h, x + 0.8 * w, y + h, x + 0.1 * w, y + 0.9 * h]]
        annotations.append(ann)
    first = np.concatenate([[0], np.cumsum(n_obj)[:-1]])
    d_img = np.repeat(np.arange(images), DETS_PER_IMAGE)
    m = d_img.shape[0]
    near = rng.random(m) < 0.6
    owner = first[d_img] + (rng.random(m) * n_obj[d_img]).astype(np.int64)
    jitter = np.exp(0.15 * rng.standard_normal((m, 2)))
    d_size = np.where(near[:, None], size[owner] * jitter, np.exp(rng.uniform(np.log(8), np.log(300), (m, 2))))
    d_xy = np.where(near[:, None], xy[owner] + 0.1 * size[owner] * rng.standard_normal((m, 2)),
                    rng.uniform(0, 1, (m, 2)) * np.array([WIDTH, HEIGHT]))
    d_cls = np.where(near & (rng.random(m) < 0.8), obj_cls[owner], rng.integers(1, CLASSES + 1, m))
    d_score = rng.random(m)
    results = []
    for j in range(m):
        x, y, w, h = float(d_xy[j, 0]), float(d_xy[j, 1]), float(d_size[j, 0]), float(d_size[j, 1])
        det = {"image_id": int(d_img[j]) + 1, "category_id": int(d_cls[j]), "score": float(d_score[j])}
        if segm:
            det["segmentation"] = [[x, y, x + w, y, x + w, y + h, x + 0.3 * w, y + 0.7 * h]]
        else:
            det["bbox"] = [x, y, w, h]
        results.append(det)
    if segm:
        from pycocotools import mask as mask_utils

        # Results carry RLE (what loadRes expects for segm); rasterised once here, not timed.
        polygons = [det.pop("segmentation")[0] for det in results]
        rles = mask_utils.frPyObjects(polygons, HEIGHT, WIDTH)
        for det, rle in zip(results, rles):
            det["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    dataset = {"images": images_list, "categories": categories, "annotations": annotations}
    xyxy = np.concatenate([d_xy, d_xy + d_size], axis=1).reshape(images, DETS_PER_IMAGE, 4)
    tensors = [
        {"image_id": i + 1, "boxes": torch.from_numpy(xyxy[i]).float(),
         "scores": torch.from_numpy(d_score.reshape(images, -1)[i]).float(),
         "labels": torch.from_numpy(d_cls.reshape(images, -1)[i])}
        for i in range(images)
    ]
    return dataset, results, tensors


def _quiet(fn):
    def call():
        with contextlib.redirect_stdout(io.StringIO()):
            return fn()
    return call


def _cocos(impl: str, dataset, results):
    """(gt, dt) COCO objects of ``impl``'s own COCO class, built outside the timed region."""
    if impl == "faster_coco_eval":
        faster = pytest.importorskip("faster_coco_eval", reason="faster-coco-eval not installed (test extra)")
        gt = faster.COCO(copy.deepcopy(dataset))
        return gt, gt.loadRes(copy.deepcopy(results))
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(results))
    return gt, dt


def _evaluator(impl: str):
    if impl == "fastdet":
        from fastdet.eval import COCOeval

        return functools.partial(COCOeval, verbose=False)
    if impl == "faster_coco_eval":
        return pytest.importorskip("faster_coco_eval").COCOeval_faster
    from pycocotools.cocoeval import COCOeval

    return COCOeval


def _run(benchmark, fn, impl: str, **info):
    benchmark.extra_info.update(coco_impl=impl, **info)
    if benchmark.disabled:
        return benchmark.pedantic(fn)
    # pycocotools at the full size takes minutes a call: one timed round; the native evaluators get a warm-up and 3.
    slow = impl == "pycocotools"
    return benchmark.pedantic(fn, rounds=1 if slow else 3, iterations=1, warmup_rounds=0 if slow else 1)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("impl", IMPLS)
def test_coco_evaluate_accumulate(benchmark, impl, iou_type):
    images = SMOKE_IMAGES if benchmark.disabled else (BBOX_IMAGES if iou_type == "bbox" else SEGM_IMAGES)
    dataset, results, _ = synthetic(images, iou_type == "segm")
    gt, dt = _cocos(impl, dataset, results)
    make = _evaluator(impl)
    benchmark.group = f"coco evaluate+accumulate {iou_type} {images} images"
    seen = {}

    def run():
        # The COCO objects are reused across rounds: pycocotools' evaluate() rewrites their annotations in place
        # (ignore flags, segm polygons to RLE), which changes neither a repeated run's result nor its cost.
        evaluator = make(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        seen["load"] = getattr(evaluator, "timings", {}).get("load")
        return evaluator

    evaluator = _run(benchmark, _quiet(run), impl, iou_type=iou_type, images=images,
                     detections=len(results), classes=CLASSES)
    if seen.get("load") is not None:
        benchmark.extra_info["load_seconds"] = seen["load"]
    assert evaluator.eval["precision"].shape[2] == CLASSES


@pytest.mark.parametrize("impl", ["pycocotools", "faster_coco_eval"])
def test_coco_load_results(benchmark, impl):
    """``COCO.loadRes`` of the bbox results (fastdet's COCOeval takes pycocotools' COCO objects, so this is the load
    its users pay too; fastdet's own array gathering is in the evaluate entries' ``load_seconds``)."""
    images = SMOKE_IMAGES if benchmark.disabled else BBOX_IMAGES
    dataset, results, _ = synthetic(images, False)
    gt, _ = _cocos(impl, dataset, results[:1])
    # loadRes completes the dicts in place (id, area), the same on every call, so one copy serves all rounds.
    mine = copy.deepcopy(results)
    benchmark.group = f"coco loadRes bbox {images} images"
    _run(benchmark, _quiet(lambda: gt.loadRes(mine)), impl, images=images, detections=len(results))


def test_coco_evaluate_detections_tensors(benchmark):
    """The fast path from model outputs: ``fastdet.eval.evaluate_detections`` on per-image tensors (no JSON, no
    loadRes, no per-detection dicts), end to end."""
    from fastdet.eval import evaluate_detections

    images = SMOKE_IMAGES if benchmark.disabled else BBOX_IMAGES
    dataset, _, tensors = synthetic(images, False)
    benchmark.group = f"coco evaluate_detections bbox {images} images"
    result = _run(benchmark, lambda: evaluate_detections(dataset, tensors), "fastdet", images=images)
    assert result.precision.shape[2] == CLASSES
