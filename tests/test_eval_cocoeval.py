"""fastdet.eval.COCOeval against pycocotools' COCOeval (the oracle) and faster-coco-eval (a cross-check).

Every case draws fresh data (random and adversarial: empty images, crowd-only images, categories without detections
or without ground truth, tied scores, IoU exactly at a threshold, custom maxDets and area ranges, useCats=0, segm with
polygons, compressed and uncompressed RLE and crowd masks) and requires precision, recall, scores and stats to agree
to 1e-12.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval as ReferenceCOCOeval

import fastdet
from fastdet.eval import COCOeval, evaluate_detections

pytestmark = pytest.mark.skipif(not fastdet.extension_available, reason="fastdet's native extension is not built")

H, W = 60, 80
ARRAYS = ("precision", "recall", "scores")


def _coco(images, categories, annotations) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _results(gt: COCO, detections: list) -> COCO:
    """cocoDt as loadRes builds it; also for zero detections (where loadRes raises)."""
    if detections:
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes(copy.deepcopy(detections))
    return _coco(copy.deepcopy(gt.dataset["images"]), copy.deepcopy(gt.dataset["categories"]), [])


def _polygon(rng, x, y, w, h):
    return [[x, y, x + w, y + rng.uniform(0, h), x + rng.uniform(0, w), y + h, x, y + rng.uniform(0, h)]]


def _rle(polygon, compressed=True):
    rle = mask_utils.merge(mask_utils.frPyObjects(polygon, H, W))
    if compressed:
        return {"size": rle["size"], "counts": rle["counts"].decode()}
    column = mask_utils.decode(rle).flatten(order="F")
    change = np.flatnonzero(np.diff(column)) + 1
    bounds = np.concatenate([[0], change, [column.size]])
    runs = np.diff(bounds).tolist()
    if column[0] == 1:
        runs = [0] + runs
    return {"size": [H, W], "counts": runs}


def random_dataset(seed, *, images=30, categories=4, gt_per_image=6, dt_per_image=12, crowd=0.1, ties=False,
                   segm=False, integer_boxes=0.3):
    """(ground-truth COCO, detection list) with boxes that overlap often (detections jitter ground truth)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 3 * c + 2, "name": f"c{c}"} for c in range(categories)]
    imgs = [{"id": 10 * i + 7, "height": H, "width": W} for i in range(images)]
    anns, dets = [], []
    for img in imgs:
        objects = []
        for _ in range(rng.integers(0, gt_per_image + 1)):
            w, h = rng.uniform(2, W / 2), rng.uniform(2, H / 2)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            if rng.random() < integer_boxes:
                x, y, w, h = (float(v) for v in np.round([x, y, w, h]))
            cat = cats[rng.integers(categories)]["id"]
            ann = {"id": len(anns) + 1, "image_id": img["id"], "category_id": cat, "bbox": [x, y, w, h],
                   "area": float(w * h * rng.uniform(0.4, 1.0)), "iscrowd": int(rng.random() < crowd)}
            if segm:
                polygon = _polygon(rng, x, y, w, h)
                kind = rng.integers(3)
                ann["segmentation"] = (polygon if kind == 0 and not ann["iscrowd"]
                                       else _rle(polygon, compressed=kind == 1))
            anns.append(ann)
            objects.append((x, y, w, h, cat))
        for _ in range(rng.integers(0, dt_per_image + 1)):
            if objects and rng.random() < 0.7:
                x, y, w, h, cat = objects[rng.integers(len(objects))]
                x, y = x + rng.normal(0, 0.15 * w), y + rng.normal(0, 0.15 * h)
                w, h = w * np.exp(rng.normal(0, 0.2)), h * np.exp(rng.normal(0, 0.2))
                if rng.random() < 0.2:
                    cat = cats[rng.integers(categories)]["id"]
            else:
                w, h = rng.uniform(2, W / 2), rng.uniform(2, H / 2)
                x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
                cat = cats[rng.integers(categories)]["id"]
            score = float(np.round(rng.random(), 1)) if ties else float(rng.random())
            det = {"image_id": img["id"], "category_id": cat, "score": score}
            if segm:
                det["segmentation"] = _rle(_polygon(rng, max(x, 0), max(y, 0), w, h))
            else:
                det["bbox"] = [float(x), float(y), float(w), float(h)]
            dets.append(det)
    return _coco(imgs, cats, anns), dets


def compare(gt: COCO, detections, iou_type="bbox", tweak=None, summarize=True):
    """Run both evaluators with the same parameters; assert identical arrays and stats. Returns (ours, theirs)."""
    dt = _results(gt, detections)
    theirs = ReferenceCOCOeval(copy.deepcopy(gt), copy.deepcopy(dt), iou_type)
    ours = COCOeval(gt, dt, iou_type, verbose=False)
    for evaluator in (theirs, ours):
        if tweak is not None:
            tweak(evaluator.params)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs.evaluate()
        theirs.accumulate()
        ours.evaluate()
        ours.accumulate()
        if summarize:
            theirs.summarize()
            ours.summarize()
    for key in ARRAYS:
        assert ours.eval[key].shape == theirs.eval[key].shape, key
        np.testing.assert_allclose(ours.eval[key], theirs.eval[key], rtol=0, atol=1e-12, err_msg=key)
    if summarize:
        np.testing.assert_allclose(ours.stats, theirs.stats, rtol=0, atol=1e-12)
    assert ours.eval["counts"] == theirs.eval["counts"]
    return ours, theirs


@pytest.mark.parametrize("seed", range(4))
def test_random_bbox(seed):
    gt, dets = random_dataset(seed)
    ours, _ = compare(gt, dets)
    assert (ours.eval["precision"] > 0).any()  # the data really matches something


@pytest.mark.parametrize("seed", range(3))
def test_random_segm_polygons_rle_crowd(seed):
    gt, dets = random_dataset(100 + seed, segm=True, crowd=0.2)
    ours, _ = compare(gt, dets, "segm")
    assert (ours.eval["precision"] > 0).any()


def test_segm_mask_size_mismatch_and_empty_masks():
    gt, dets = random_dataset(7, segm=True, images=6)
    # A detection whose RLE has another image size (pycocotools' IoU is -1 there) and an empty mask.
    other = mask_utils.encode(np.asfortranarray(np.ones((H + 2, W), dtype=np.uint8)))
    dets.append({"image_id": gt.dataset["images"][0]["id"], "category_id": 2, "score": 0.5,
                 "segmentation": {"size": other["size"], "counts": other["counts"].decode()}})
    empty = mask_utils.encode(np.asfortranarray(np.zeros((H, W), dtype=np.uint8)))
    dets.append({"image_id": gt.dataset["images"][1]["id"], "category_id": 2, "score": 0.7,
                 "segmentation": {"size": empty["size"], "counts": empty["counts"].decode()}})
    compare(gt, dets, "segm")


@pytest.mark.parametrize("seed", range(2))
def test_tied_scores(seed):
    gt, dets = random_dataset(200 + seed, ties=True)
    compare(gt, dets)


def test_empty_images_crowd_only_images_and_missing_categories():
    gt, dets = random_dataset(300, categories=6)
    images = gt.dataset["images"]
    anns = gt.dataset["annotations"]
    # image 0: nothing at all; image 1: only crowd ground truth (and detections on it); image 2: detections only
    anns = [a for a in anns if a["image_id"] not in (images[0]["id"], images[2]["id"])]
    for a in anns:
        if a["image_id"] == images[1]["id"]:
            a["iscrowd"] = 1
    dets = [d for d in dets if d["image_id"] != images[0]["id"]]
    # category 2 (id 8): ground truth but no detections; category 5 (id 17): detections but no ground truth
    dets = [d for d in dets if d["category_id"] != 8]
    anns = [a for a in anns if a["category_id"] != 17]
    dets.append({"image_id": images[3]["id"], "category_id": 17, "bbox": [1.0, 2.0, 10.0, 12.0], "score": 0.9})
    gt = _coco(images, gt.dataset["categories"], anns)
    ours, _ = compare(gt, dets)
    k_no_dets = ours.params.catIds.index(8)
    k_no_gt = ours.params.catIds.index(17)
    assert (ours.eval["precision"][:, :, k_no_gt] == -1).all()
    assert (ours.eval["recall"][:, k_no_dets, 0] == 0).all()


def test_no_detections_at_all():
    gt, _ = random_dataset(301)
    ours, _ = compare(gt, [])
    assert (ours.eval["precision"] <= 0).all()


def test_iou_exactly_at_thresholds():
    # IoU of [0, 0, 10, 10] and [0, 0, w, 10] is w / 10: exactly 0.5, 0.75, 0.95 and 1.0 for these widths.
    cats = [{"id": 1, "name": "a"}]
    imgs = [{"id": i, "height": H, "width": W} for i in range(4)]
    anns = [{"id": i + 1, "image_id": i, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "area": 100.0,
             "iscrowd": 0} for i in range(4)]
    dets = [{"image_id": i, "category_id": 1, "bbox": [0.0, 0.0, w, 10.0], "score": 0.5}
            for i, w in enumerate([5.0, 7.5, 9.5, 10.0])]
    compare(_coco(imgs, cats, anns), dets)


def test_degenerate_boxes_and_zero_ids():
    gt, dets = random_dataset(302, images=8)
    anns = gt.dataset["annotations"]
    anns[0]["id"] = 0  # pycocotools reads a match to ground-truth id 0 as "no match"; so must we
    anns[1]["bbox"] = [5.0, 5.0, 0.0, 4.0]
    anns[2]["area"] = 0.0
    dets.append({"image_id": anns[1]["image_id"], "category_id": anns[1]["category_id"],
                 "bbox": [5.0, 5.0, 0.0, 4.0], "score": 0.3})
    dets.append({"image_id": anns[0]["image_id"], "category_id": anns[0]["category_id"],
                 "bbox": list(anns[0]["bbox"]), "score": 0.99})
    dets.append({"image_id": anns[3]["image_id"], "category_id": anns[3]["category_id"],
                 "bbox": [-5.0, -3.0, 12.0, 9.0], "score": 0.4})
    gt = _coco(gt.dataset["images"], gt.dataset["categories"], anns)
    compare(gt, dets)


@pytest.mark.parametrize("max_dets", [[1, 5, 300], [3, 10, 2], [0, 1, 10], [1, 10, 100, 2]])
def test_custom_max_dets(max_dets):
    gt, dets = random_dataset(400, dt_per_image=20)
    compare(gt, dets, tweak=lambda p: setattr(p, "maxDets", list(max_dets)))


def test_custom_area_ranges():
    def tweak(p):
        p.areaRng = [[0, 1e10], [50, 200], [200, 200.5], [0, 30], [100, 50]]
        p.areaRngLbl = ["all", "small", "medium", "large", "empty"]

    gt, dets = random_dataset(401)
    compare(gt, dets, tweak=tweak)


@pytest.mark.parametrize("cat_ids", [None, [5, 2], [5, 2, 5]])
def test_use_cats_0(cat_ids):
    def tweak(p):
        p.useCats = 0
        if cat_ids is not None:
            p.catIds = list(cat_ids)

    gt, dets = random_dataset(402, ties=True)
    compare(gt, dets, tweak=tweak)


def test_image_and_category_subsets_and_thresholds():
    gt, dets = random_dataset(403)

    def tweak(p):
        p.imgIds = [17, 7, 47, 47, 99999]
        p.catIds = [8, 2]
        p.iouThrs = np.array([0.1, 0.5, 1.0])
        p.recThrs = np.array([0.5, 0.2, 0.9, 0.0])  # unsorted: pycocotools stops at the first index past the end

    compare(gt, dets, tweak=tweak, summarize=False)


def test_inputs_are_not_modified():
    gt, dets = random_dataset(404, segm=True)
    dt = _results(gt, dets)
    before = repr((gt.dataset, dt.dataset))  # repr: loadRes stores numpy boxes for segm
    evaluator = COCOeval(gt, dt, "segm", verbose=False)
    evaluator.evaluate()
    evaluator.accumulate()
    assert repr((gt.dataset, dt.dataset)) == before


def test_summarize_quirk_by_default_and_corrected_switch():
    gt, dets = random_dataset(405, dt_per_image=20)
    ours, theirs = compare(gt, dets, tweak=lambda p: setattr(p, "maxDets", [1, 10, 50]))
    assert ours.stats[0] == -1 == theirs.stats[0]  # pycocotools' hard-coded maxDets=100 lookup
    with contextlib.redirect_stdout(io.StringIO()):
        ours.summarize(corrected=True)
    precision = ours.eval["precision"][:, :, :, 0, -1]
    assert ours.stats[0] == pytest.approx(precision[precision > -1].mean(), abs=1e-12)
    np.testing.assert_allclose(ours.stats[1:], theirs.stats[1:], rtol=0, atol=1e-12)
    corrected = COCOeval(gt, _results(gt, dets), "bbox", summary="corrected", verbose=False)
    corrected.params.maxDets = [1, 10, 50]
    with contextlib.redirect_stdout(io.StringIO()):
        corrected.evaluate()
        corrected.accumulate()
        corrected.summarize()
    assert corrected.stats[0] == ours.stats[0]


def test_faster_coco_eval_cross_check():
    faster = pytest.importorskip("faster_coco_eval", reason="faster-coco-eval not installed (test extra)")
    gt, dets = random_dataset(500, images=40)
    fgt = faster.COCO(copy.deepcopy(gt.dataset))
    fdt = fgt.loadRes(copy.deepcopy(dets))
    reference = faster.COCOeval_faster(fgt, fdt, "bbox")
    reference.evaluate()
    reference.accumulate()
    ours = COCOeval(gt, _results(gt, dets), "bbox", verbose=False)
    ours.evaluate()
    ours.accumulate()
    for key in ("precision", "recall"):
        np.testing.assert_allclose(ours.eval[key], reference.eval[key], rtol=0, atol=1e-12, err_msg=key)


def test_evaluate_detections_backends_agree():
    gt, dets = random_dataset(501, images=25)
    per_image = {}
    for d in dets:
        per_image.setdefault(d["image_id"], []).append(d)
    detections = []
    for image_id, items in per_image.items():
        xywh = torch.tensor([d["bbox"] for d in items], dtype=torch.float64)
        detections.append({"image_id": image_id, "boxes": torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                           "scores": torch.tensor([d["score"] for d in items]),
                           "labels": torch.tensor([d["category_id"] for d in items])})
    native = evaluate_detections(gt, detections, max_detections=50)
    reference = evaluate_detections(gt, detections, max_detections=50, backend="pycocotools")
    for key in ARRAYS:
        np.testing.assert_allclose(getattr(native, key), getattr(reference, key), rtol=0, atol=1e-12)
    assert native.stats == pytest.approx(reference.stats, abs=1e-12, nan_ok=True)
    with pytest.raises(ValueError, match="backend"):
        evaluate_detections(gt, detections, backend="fast")


def test_bad_arguments_raise_clear_errors():
    gt, dets = random_dataset(502, images=3)
    dt = _results(gt, dets)
    with pytest.raises(ValueError, match="keypoints"):
        COCOeval(gt, dt, "keypoints")
    evaluator = COCOeval(gt, dt, "bbox", verbose=False)
    with pytest.raises(RuntimeError, match="evaluate"):
        evaluator.accumulate()
    with pytest.raises(AttributeError, match="evalImgs"):
        evaluator.evalImgs
    evaluator.params.maxDets = [1, -2]
    with pytest.raises(ValueError, match="maxDets"):
        evaluator.evaluate()
    broken = copy.deepcopy(gt.dataset)
    del broken["annotations"][0]["area"]
    with pytest.raises(KeyError, match="area"):
        COCOeval(_coco(broken["images"], broken["categories"], broken["annotations"]), dt, "bbox",
                 verbose=False).evaluate()


def _op_inputs():
    f64 = torch.float64
    return dict(
        gt_boxes=torch.tensor([[0.0, 0, 10, 10], [20, 20, 5, 5]], dtype=f64),
        gt_areas=torch.tensor([100.0, 25], dtype=f64),
        gt_crowd=torch.tensor([0, 1], dtype=torch.uint8), gt_ids=torch.tensor([1.0, 2], dtype=f64),
        gt_offsets=torch.tensor([0, 2]),
        dt_boxes=torch.tensor([[0.0, 0, 9, 10], [20, 20, 2, 2], [50, 50, 3, 3]], dtype=f64),
        dt_areas=torch.tensor([90.0, 4, 9], dtype=f64), dt_scores=torch.tensor([0.5, 0.9, 0.1], dtype=f64),
        dt_ids=torch.tensor([1.0, 2, 3], dtype=f64), dt_offsets=torch.tensor([0, 3]),
        iou_thresholds=torch.tensor([0.5, 0.95], dtype=f64),
        area_ranges=torch.tensor([[0.0, 1e10], [0, 50]], dtype=f64), max_dets=2,
    )


def test_ops_match_hand_computed_case_and_pass_opcheck():
    from fastdet.ops import coco_accumulate, coco_evaluate

    args = _op_inputs()
    order, codes, valid = coco_evaluate(**args)
    assert order.tolist() == [1, 0, 2]  # score order
    # threshold 0.5, all areas: detection 1 matches the crowd box (ignored), detection 0 matches gt 1 (IoU 0.9);
    # detection 2 is past max_dets=2.
    assert codes[0, 0].tolist() == [4 | 1 | 2, 4 | 1, 0]
    assert codes[0, 1].tolist() == [4 | 1 | 2, 4, 0]  # at 0.95 only the crowd match remains
    assert valid.tolist() == [[1], [0]]
    precision, recall, scores = coco_accumulate(args["dt_scores"], order, codes, args["dt_offsets"],
                                                torch.tensor([0, 1]), valid, torch.tensor([1, 2]),
                                                torch.linspace(0, 1, 11, dtype=torch.float64))
    assert recall[0, 0, 0].tolist() == [0.0, 1.0] and recall[1, 0, 0].tolist() == [0.0, 0.0]
    assert (precision[:, :, 0, 1] == -1).all()  # no regular ground truth below area 50
    # the matched ground-truth rows behind those codes: position 0 took the crowd box (row 1) at both thresholds and in
    # both area ranges (matched but ignored), position 1 took row 0 at 0.5 only, position 2 is past max_dets
    order_m, codes_m, valid_m, matched = coco_evaluate(**args, return_matches=True)
    assert torch.equal(order_m, order) and torch.equal(codes_m, codes) and torch.equal(valid_m, valid)
    assert matched.dtype == torch.int64 and matched.shape == (2, 2, 3)
    assert matched[:, 0].tolist() == [[1, 0, -1]] * 2 and matched[:, 1].tolist() == [[1, -1, -1]] * 2
    assert torch.equal(matched >= 0, (codes & 1) != 0)  # no ground-truth id is 0 here
    ops = torch.ops.fastdet
    torch.library.opcheck(ops.coco_evaluate.default, tuple(args.values()))
    torch.library.opcheck(ops.coco_evaluate.default, (*args.values(), None, None, None, None, True))
    torch.library.opcheck(ops.coco_accumulate.default, (args["dt_scores"], order, codes, args["dt_offsets"],
                                                         torch.tensor([0, 1]), valid, torch.tensor([1, 2]),
                                                         torch.linspace(0, 1, 11, dtype=torch.float64)))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(gt_boxes=torch.zeros(2, 4, dtype=torch.float32)), "gt_boxes must be a float64"),
        (dict(gt_areas=torch.zeros(3, dtype=torch.float64)), "gt_areas must have 2 entries"),
        (dict(dt_offsets=torch.tensor([0, 1, 3])), "gt_offsets and dt_offsets"),
        (dict(dt_offsets=torch.tensor([0, 4])), "dt_offsets must start at 0 and end at 3"),
        (dict(gt_offsets=torch.tensor([1, 2])), "gt_offsets must start at 0"),
        (dict(area_ranges=torch.zeros(2, 3, dtype=torch.float64)), "area_ranges must have rank 2"),
        (dict(max_dets=-1), "max_dets must be non-negative"),
        (dict(gt_rle_bytes=torch.zeros(3, dtype=torch.uint8)), "given together"),
    ],
)
def test_op_bad_input(change, message):
    args = {**_op_inputs(), **change}
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fastdet.coco_evaluate(*[args.pop(k) for k in list(_op_inputs())], **args)


def test_op_rle_index_out_of_range():
    args = _op_inputs()
    rle = dict(gt_rle_bytes=torch.zeros(2, dtype=torch.uint8), gt_rle_index=torch.tensor([[0, 5, 4, 4]] * 2),
               dt_rle_bytes=torch.zeros(2, dtype=torch.uint8), dt_rle_index=torch.tensor([[0, 1, 4, 4]] * 3))
    with pytest.raises(RuntimeError, match="gt_rle_index row 0"):
        torch.ops.fastdet.coco_evaluate(*args.values(), **rle)


def test_f1_from_evaluation_matches_pycocotools_eval_imgs():
    from fastdet.eval import f1_confidence_from_evaluation

    gt, dets = random_dataset(503, images=30, categories=3)
    per_image = {}
    for d in dets:
        per_image.setdefault(d["image_id"], []).append(d)
    detections = [
        {"image_id": image_id,
         "boxes": torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]
                                for d in items], dtype=torch.float64),
         "scores": torch.tensor([d["score"] for d in items], dtype=torch.float64),
         "labels": torch.tensor([d["category_id"] for d in items])}
        for image_id, items in per_image.items()
    ]
    evaluation = evaluate_detections(gt, detections, max_detections=5)
    curves = f1_confidence_from_evaluation(evaluation, iou_threshold=0.75, num_points=11)
    # Oracle: pycocotools' own per-image outcomes (evalImgs) at IoU 0.75, area "all", maxDets 5.
    reference = ReferenceCOCOeval(copy.deepcopy(gt), _results(gt, dets), "bbox")
    reference.params.maxDets = [1, 5]
    with contextlib.redirect_stdout(io.StringIO()):
        reference.evaluate()
    t = 5
    cat_ids = reference.params.catIds
    for k, cat in enumerate(cat_ids):
        entries = [e for e in reference.evalImgs if e is not None and e["category_id"] == cat and e["aRng"] == [0,
                   1e10]]
        scores = np.concatenate([np.asarray(e["dtScores"]) for e in entries] + [np.zeros(0)])
        matched = np.concatenate([e["dtMatches"][t] != 0 for e in entries] + [np.zeros(0, bool)])
        ignored = np.concatenate([e["dtIgnore"][t].astype(bool) for e in entries] + [np.zeros(0, bool)])
        num_gt = sum(int((e["gtIgnore"] == 0).sum()) for e in entries)
        assert curves.num_ground_truth[k] == num_gt
        for j, c in enumerate(curves.confidence):
            keep = (scores >= c) & ~ignored
            tp, detected = int((keep & matched).sum()), int(keep.sum())
            expected_recall = tp / num_gt if num_gt else np.nan
            np.testing.assert_equal(curves.recall[k, j], expected_recall)
            np.testing.assert_equal(curves.precision[k, j], tp / detected if detected else np.nan)
    with pytest.raises(ValueError, match="native"):
        f1_confidence_from_evaluation(evaluate_detections(gt, detections, backend="pycocotools"))


def test_string_image_ids():
    gt, dets = random_dataset(504, images=12)
    images = [dict(img, id=f"img{img['id']}") for img in gt.dataset["images"]]
    anns = [dict(a, image_id=f"img{a['image_id']}") for a in gt.dataset["annotations"]]
    dets = [dict(d, image_id=f"img{d['image_id']}") for d in dets]
    compare(_coco(images, gt.dataset["categories"], anns), dets)


def test_nan_scores_and_non_finite_boxes():
    gt, dets = random_dataset(505, images=12)
    dets[0]["score"] = float("nan")
    dets[3]["score"] = float("nan")
    dets[5]["bbox"] = [float("nan"), 1.0, 5.0, 5.0]
    dets[7]["bbox"] = [1.0, 1.0, float("inf"), 5.0]
    compare(gt, dets, summarize=False)


def test_train_config_eval_backend():
    from fastdet.engine import TrainConfig

    assert TrainConfig().eval_backend == "native"
    with pytest.raises(ValueError, match="eval_backend"):
        TrainConfig(eval_backend="fast")


def _reference_confusion(gt: COCO, detections: list, score_threshold: float, max_det: int, iou: float = 0.5):
    """The confusion matrix from pycocotools' own per-image outcomes (evalImgs) with useCats=0 at one IoU threshold,
    area "all": dtMatches names each detection's ground truth by id, gtMatches each ground truth's detection."""
    kept = [d for d in detections if d["score"] >= score_threshold]
    dt = _results(gt, kept)
    reference = ReferenceCOCOeval(copy.deepcopy(gt), dt, "bbox")
    p = reference.params
    p.useCats, p.iouThrs, p.maxDets, p.areaRng, p.areaRngLbl = 0, np.array([iou]), [max_det], [[0, 1e10]], ["all"]
    with contextlib.redirect_stdout(io.StringIO()):
        reference.evaluate()
    label = {c: k + 1 for k, c in enumerate(sorted(gt.getCatIds()))}
    gt_label = {a["id"]: label[a["category_id"]] for a in gt.dataset["annotations"]}
    dt_label = {a["id"]: label[a["category_id"]] for a in dt.dataset["annotations"]}
    matrix = np.zeros((len(label) + 1,) * 2, dtype=np.int64)
    for e in reference.evalImgs:
        if e is None:
            continue
        for j, dt_id in enumerate(e["dtIds"]):
            if not e["dtIgnore"][0, j]:
                g = int(e["dtMatches"][0, j])
                matrix[dt_label[dt_id], gt_label[g] if g else 0] += 1
        for j, gt_id in enumerate(e["gtIds"]):
            if not e["gtIgnore"][j] and e["gtMatches"][0, j] == 0:
                matrix[0, gt_label[gt_id]] += 1
    return matrix


def _xyxy_detections(detections: list) -> tuple[list, list]:
    """Per-image model-style detections (xyxy), and the same detections as result dicts with the xywh boxes
    evaluate_detections derives from them (so both evaluators see bit-identical boxes)."""
    per_image = {}
    for d in detections:
        per_image.setdefault(d["image_id"], []).append(d)
    model_style, results = [], []
    for image_id, items in per_image.items():
        boxes = torch.tensor([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]
                              for d in items], dtype=torch.float64)
        model_style.append({"image_id": image_id, "boxes": boxes,
                            "scores": torch.tensor([d["score"] for d in items], dtype=torch.float64),
                            "labels": torch.tensor([d["category_id"] for d in items])})
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
        results += [dict(d, bbox=b) for d, b in zip(items, xywh.tolist())]
    return model_style, results


@pytest.mark.parametrize("seed, ties, crowd, score_threshold, max_det, iou", [
    (601, False, 0.1, 0.25, 100, 0.5), (602, True, 0.3, 0.3, 7, 0.5), (603, True, 0.5, 0.0, 3, 0.5),
    (604, False, 0.2, 0.5, 100, 0.75),
])
def test_confusion_matrix_from_evaluation_matches_pycocotools_use_cats_0(seed, ties, crowd, score_threshold, max_det,
                                                                          iou):
    from fastdet.eval import confusion_matrix_from_evaluation

    gt, dets = random_dataset(seed, images=40, categories=4, crowd=crowd, ties=ties)
    # an image with only crowd ground truth (and detections on it), one with detections and no ground truth, one
    # empty, one with undetected ground truth of NaN area (missed) and of area 2e10 (ignored) and a detected one of
    # id 0 (pycocotools' quirk: its detection reads as unmatched in dtMatches, a false positive, and it as found)
    extra = [{"id": 9001, "height": H, "width": W}, {"id": 9002, "height": H, "width": W},
             {"id": 9003, "height": H, "width": W}, {"id": 9004, "height": H, "width": W}]
    cat = gt.dataset["categories"][0]["id"]
    # and, in the images of the random set, pycocotools' area rule for range "all": a ground truth recorded with an
    # area above 1e10 is ignored (so is the detection matched to it), one with a NaN area is not; an unmatched
    # detection of area above 1e10 is ignored
    first, second = gt.dataset["images"][0]["id"], gt.dataset["images"][1]["id"]
    anns = gt.dataset["annotations"] + [
        {"id": 50001, "image_id": 9001, "category_id": cat, "bbox": [0.0, 0.0, 40.0, 40.0], "area": 1600.0,
         "iscrowd": 1},
        {"id": 50002, "image_id": first, "category_id": cat, "bbox": [60.0, 40.0, 15.0, 15.0], "area": 2e10,
         "iscrowd": 0},
        {"id": 50003, "image_id": second, "category_id": cat, "bbox": [60.0, 40.0, 15.0, 15.0], "area": float("nan"),
         "iscrowd": 0},
        {"id": 50004, "image_id": 9004, "category_id": cat, "bbox": [1.0, 1.0, 9.0, 9.0], "area": float("nan"),
         "iscrowd": 0},
        {"id": 50005, "image_id": 9004, "category_id": cat, "bbox": [30.0, 30.0, 9.0, 9.0], "area": 2e10,
         "iscrowd": 0},
        {"id": 0, "image_id": 9004, "category_id": cat, "bbox": [50.0, 5.0, 10.0, 10.0], "area": 100.0, "iscrowd": 0}]
    dets = dets + [{"image_id": 9001, "category_id": cat, "bbox": [1.0, 1.0, 10.0, 10.0], "score": 0.9},
                   {"image_id": 9001, "category_id": gt.dataset["categories"][1]["id"], "bbox": [5.0, 5.0, 9.0, 9.0],
                    "score": 0.9},
                   {"image_id": 9002, "category_id": cat, "bbox": [3.0, 3.0, 8.0, 8.0], "score": 0.8},
                   {"image_id": 9002, "category_id": cat, "bbox": [0.0, 0.0, 2e5, 1e5], "score": 0.7},
                   {"image_id": first, "category_id": cat, "bbox": [60.0, 40.0, 15.0, 15.0], "score": 0.99},
                   {"image_id": second, "category_id": cat, "bbox": [60.0, 40.0, 15.0, 15.0], "score": 0.99},
                   {"image_id": 9004, "category_id": cat, "bbox": [50.0, 5.0, 10.0, 10.0], "score": 0.95}]
    gt = _coco(gt.dataset["images"] + extra, gt.dataset["categories"], anns)
    model_style, results = _xyxy_detections(dets)
    evaluation = evaluate_detections(gt, model_style, max_detections=max_det)
    ours = confusion_matrix_from_evaluation(evaluation, iou_threshold=iou, score_threshold=score_threshold)
    expected = _reference_confusion(gt, results, score_threshold, max_det, iou)
    np.testing.assert_array_equal(ours, expected)
    assert ours.dtype == np.int64 and ours[0, 0] == 0
    # every regular ground truth is counted once (found or missed); crowd never, nor the quirky id 0
    regular = [a for a in anns if not (a["iscrowd"] or a["area"] > 1e10 or a["id"] == 0)]
    assert ours[:, 1:].sum() == len(regular)
    # an explicit limit overrides the evaluation's
    np.testing.assert_array_equal(
        confusion_matrix_from_evaluation(evaluation, iou, score_threshold, max_detections=2),
        _reference_confusion(gt, results, score_threshold, 2, iou))


def test_confusion_matrix_from_evaluation_hand_built_crowd_is_ignored():
    from fastdet.eval import confusion_matrix, confusion_matrix_from_evaluation

    gt = _coco(
        [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
        [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "area": 100.0, "iscrowd": 0},
         {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50.0, 50.0, 40.0, 40.0], "area": 1600.0, "iscrowd": 1},
         {"id": 3, "image_id": 2, "category_id": 2, "bbox": [0.0, 0.0, 10.0, 10.0], "area": 100.0, "iscrowd": 0}],
    )
    detections = [{"image_id": 1,
                   "boxes": torch.tensor([[0.0, 0, 10, 10], [55, 55, 65, 65], [20, 20, 30, 30], [0, 0, 10, 10]]),
                   "scores": torch.tensor([0.9, 0.8, 0.7, 0.1]), "labels": torch.tensor([2, 1, 1, 1])}]
    evaluation = evaluate_detections(gt, detections)
    matrix = confusion_matrix_from_evaluation(evaluation)
    # [2, 1]: a "b" box on the "a" object; the box inside the crowd region is neither TP nor FP; [1, 0]: the box on
    # nothing; the 0.1 box is below the score threshold; [0, 2]: image 2's missed "b"
    np.testing.assert_array_equal(matrix, [[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    # the class-agnostic matcher of the pycocotools path, given the crowd-free targets, counts the crowd box as FP
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([2])}]
    detections2 = detections + [{"image_id": 2, "boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                                 "labels": torch.zeros(0, dtype=torch.long)}]
    np.testing.assert_array_equal(confusion_matrix(detections2, targets, 2), [[0, 0, 1], [2, 0, 0], [0, 1, 0]])
    with pytest.raises(ValueError, match="native"):
        confusion_matrix_from_evaluation(evaluate_detections(gt, detections, backend="pycocotools"))
    for bad in (dict(iou_threshold=1.5), dict(iou_threshold=float("nan")), dict(score_threshold=float("inf")),
                dict(max_detections=0), dict(max_detections=2.5)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            confusion_matrix_from_evaluation(evaluation, **bad)
