"""``fastdet.eval.COCOeval``: pycocotools' COCO evaluation, computed natively, with identical numbers.

A drop-in for ``pycocotools.cocoeval.COCOeval`` for ``iouType`` ``"bbox"`` and ``"segm"``::

    from fastdet.eval import COCOeval          # instead of: from pycocotools.cocoeval import COCOeval
    E = COCOeval(coco_gt, coco_dt, "bbox")
    E.params.maxDets = [1, 10, 100]            # the same Params object (pycocotools' own class)
    E.evaluate(); E.accumulate(); E.summarize()
    E.stats, E.eval["precision"], E.eval["recall"], E.eval["scores"]

The matching (per image and category: ground truth ordered by its ignore flag, detections by score with a stable
sort and cut to ``maxDets[-1]``, the crowd rule, the greedy match at ``min(t, 1 - 1e-10)``, the stop at the first
ignored ground truth after a regular match, unmatched detections outside the area range ignored) and the accumulation
(a stable sort across images, the precision envelope, ``searchsorted(side="left")`` over ``recThrs``) run in the
native ops of :mod:`fastdet.ops.coco_eval`, parallel over (image, category) groups. Python only gathers the
annotations into flat arrays. ``stats``, ``precision``, ``recall`` and ``scores`` equal pycocotools' (the tests
compare them to 1e-12, in practice they are bit-identical).

Differences from pycocotools, all deliberate:

* ``evalImgs`` and ``ious`` (per-image dicts and IoU matrices) are not materialised; reading them raises
  :class:`AttributeError` saying so. Everything ``accumulate`` and ``summarize`` produce is there.
* the annotations of ``cocoGt``/``cocoDt`` are never modified (pycocotools writes ``ignore`` into every ground truth
  and, for ``segm``, replaces polygons by RLE in place).
* ``iouType="keypoints"`` is not supported (use pycocotools).
* a ground truth without ``iscrowd`` counts as not crowd (pycocotools raises ``KeyError``); annotation ids must be
  unique within each COCO object (pycocotools silently evaluates one of the duplicates twice).
* ``accumulate(p)`` accepts only ``p=None`` or parameters equal to the evaluated ones.
* ``summarize()`` reproduces pycocotools' quirk by default: the first statistic (AP) looks up ``maxDets == 100`` by
  value, so with custom ``maxDets`` it is -1, and ``maxDets`` needs at least 3 entries. ``COCOeval(...,
  summary="corrected")`` (or ``summarize(corrected=True)``) indexes limits by position instead: every AP and the area
  ARs use ``maxDets[-1]``, and the three AR rows use ``maxDets[0]``, ``maxDets[1]`` and ``maxDets[-1]`` (a shorter
  list repeats its last entry).
"""

from __future__ import annotations

import copy
import datetime
import time
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter

import numpy as np
import torch

__all__ = ["COCOeval"]


def _params_class():
    try:
        from pycocotools.cocoeval import Params
    except ImportError as error:  # pragma: no cover - pycocotools is a declared dependency
        raise ImportError("fastdet.eval.COCOeval needs pycocotools (for COCO and Params): pip install pycocotools") \
            from error
    return Params


@dataclass
class _Annotations:
    """One side's annotations as flat arrays, in dataset order."""

    image_ids: list  # raw ids (any hashable), or an int64 ndarray
    category_ids: list
    boxes: np.ndarray  # [N, 4] float64 xywh (zeros for segm)
    areas: np.ndarray  # [N] float64
    ids: np.ndarray  # [N] float64 (as pycocotools stores them in its match arrays)
    crowd: np.ndarray  # [N] uint8
    scores: np.ndarray | None = None  # [N] float64 (detections)
    rle: tuple[np.ndarray, np.ndarray] | None = None  # (bytes [B] uint8, index [N, 4] int64)

    def __len__(self) -> int:
        return self.areas.shape[0]

    def take(self, index: np.ndarray) -> _Annotations:
        rle = None
        if self.rle is not None:
            rle = (self.rle[0], self.rle[1][index])
        return _Annotations(
            image_ids=None, category_ids=None, boxes=self.boxes[index], areas=self.areas[index], ids=self.ids[index],
            crowd=self.crowd[index], scores=None if self.scores is None else self.scores[index], rle=rle,
        )


def _floats(values, n: int, what: str) -> np.ndarray:
    try:
        return np.fromiter(values, dtype=np.float64, count=n)
    except KeyError as error:
        raise KeyError(f"every {what} annotation needs a {error.args[0]!r} key") from None
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what} annotations hold a non-numeric value: {error}") from None


def _rle_strings(coco, annotations: list, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Compressed RLE of every annotation: (concatenated count strings, [N, 4] rows (begin, end, height, width)).

    Compressed RLE is taken as is; polygons and uncompressed RLE go through pycocotools' ``annToRLE`` (the library's
    own rasterisation, so the masks are pycocotools' bit for bit)."""
    strings = []
    sizes = np.empty((len(annotations), 2), dtype=np.int64)
    for index, ann in enumerate(annotations):
        if "segmentation" not in ann:
            raise KeyError(f"iouType 'segm' needs a 'segmentation' in every {what} annotation (annotation {index})")
        seg = ann["segmentation"]
        if not (isinstance(seg, dict) and isinstance(seg.get("counts"), (str, bytes))):
            seg = coco.annToRLE(ann)
        counts = seg["counts"]
        strings.append(counts.encode() if isinstance(counts, str) else counts)
        sizes[index] = seg["size"]
    lengths = np.fromiter(map(len, strings), dtype=np.int64, count=len(strings))
    ends = np.cumsum(lengths)
    index = np.empty((len(annotations), 4), dtype=np.int64)
    index[:, 0] = ends - lengths
    index[:, 1] = ends
    index[:, 2:] = sizes
    data = np.frombuffer(bytearray(b"".join(strings)), dtype=np.uint8)
    return data, index


def _id_array(ids: list):
    """Integer ids as an int64 array (so they are looked up vectorised); any other ids stay a list."""
    if ids and all(type(i) is int for i in (ids[0], ids[-1])):
        try:
            array = np.asarray(ids)
        except (OverflowError, ValueError):
            return ids
        if array.dtype.kind in "iu":
            return array.astype(np.int64, copy=False)
    return ids


def _annotations_of(coco, iou_type: str, detections: bool) -> _Annotations:
    """Flat arrays of a pycocotools ``COCO`` object's annotations (``dataset['annotations']``, in order)."""
    what = "detection" if detections else "ground-truth"
    anns = coco.dataset.get("annotations", [])
    n = len(anns)
    try:
        image_ids = _id_array(list(map(itemgetter("image_id"), anns)))
        category_ids = _id_array(list(map(itemgetter("category_id"), anns)))
    except KeyError as error:
        raise KeyError(f"every {what} annotation needs a {error.args[0]!r} key") from None
    areas = _floats(map(itemgetter("area"), anns), n, what)
    ids = _floats(map(itemgetter("id"), anns), n, what)
    sorted_ids = np.sort(ids)
    if (sorted_ids[1:] == sorted_ids[:-1]).any():
        raise ValueError(f"{what} annotation ids must be unique")
    if detections:
        # The crowd flag of a detection is never read (pycocotools applies only ground truth's).
        crowd = np.zeros(n, dtype=np.uint8)
        scores = _floats(map(itemgetter("score"), anns), n, what)
    else:
        crowd = np.fromiter((int(a.get("iscrowd", 0)) != 0 for a in anns), dtype=np.uint8, count=n)
        scores = None
    rle = None
    if iou_type == "bbox":
        try:
            bbs = list(map(itemgetter("bbox"), anns))
        except KeyError:
            raise KeyError(f"iouType 'bbox' needs a 'bbox' in every {what} annotation") from None
        lengths = np.fromiter(map(len, bbs), dtype=np.int64, count=n)
        if n and not (lengths == 4).all():
            raise ValueError(f"every {what} bbox must be [x, y, w, h]; annotation {int(np.argmax(lengths != 4))} "
                             f"has {int(lengths[lengths != 4][0])} values")
        boxes = np.fromiter(chain.from_iterable(bbs), dtype=np.float64, count=4 * n).reshape(n, 4)
    else:
        boxes = np.zeros((n, 4), dtype=np.float64)
        rle = _rle_strings(coco, anns, what)
    return _Annotations(image_ids, category_ids, boxes, areas, ids, crowd, scores, rle)


def _positions(values, keys) -> np.ndarray:
    """Index of each value in ``keys`` (a list of distinct hashables), -1 where absent; vectorised for integers."""
    n = len(values)
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        keys_array = np.asarray(keys)
        if keys_array.dtype.kind in "iu" and keys_array.size:
            order = np.argsort(keys_array, kind="stable")
            sorted_keys = keys_array[order]
            at = np.clip(np.searchsorted(sorted_keys, values), 0, len(keys) - 1)
            return np.where(sorted_keys[at] == values, order[at], -1)
    lookup = {key: index for index, key in enumerate(keys)}
    return np.fromiter((lookup.get(v, -1) for v in values), dtype=np.int64, count=n)


@dataclass
class _Groups:
    """Annotations grouped by (category, image) as the native ops take them."""

    gt: _Annotations
    dt: _Annotations
    gt_offsets: np.ndarray  # [S + 1]
    dt_offsets: np.ndarray  # [S + 1]
    category_offsets: np.ndarray  # [K + 1]
    dt_rows: np.ndarray  # [D'] the input detection of each grouped row
    gt_rows: np.ndarray  # [G'] the input ground truth of each grouped row


def _group_rows(image_pos: np.ndarray, cat_of: np.ndarray, cat_positions: list, use_cats: bool,
                num_images: int):
    """Rows (with repeats) and group keys of one side, sorted as pycocotools visits them.

    ``cat_of`` maps each annotation to its category value index (-1 if not evaluated); ``cat_positions[v]`` are the
    positions of value v in ``params.catIds`` (several where the list repeats a category, which pycocotools then
    evaluates once per repeat when ``useCats=0``)."""
    n = image_pos.shape[0]
    counts = np.zeros(n, dtype=np.int64)
    valid = (image_pos >= 0) & (cat_of >= 0)
    lengths = np.array([len(p) for p in cat_positions] + [0], dtype=np.int64)
    counts[valid] = lengths[cat_of[valid]]
    rows = np.repeat(np.arange(n), counts)
    flat_positions = np.array([q for p in cat_positions for q in p] + [0], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    within = np.arange(rows.shape[0]) - np.repeat(np.cumsum(counts) - counts, counts)
    cat_pos = flat_positions[starts[cat_of[rows]] + within] if rows.size else np.zeros(0, dtype=np.int64)
    img = image_pos[rows]
    if use_cats:
        order = np.lexsort((img, cat_pos))  # category-major, then image; stable: dataset order within a group
        keys = cat_pos[order] * num_images + img[order]
    else:
        order = np.lexsort((cat_pos, img))  # per image, categories in params.catIds order, then dataset order
        keys = img[order]
    return rows[order], keys


def _group(gt: _Annotations, dt: _Annotations, img_ids: list, cat_ids: list, use_cats: bool) -> _Groups:
    num_images = len(img_ids)
    distinct = list(dict.fromkeys(cat_ids))
    cat_positions = [[] for _ in distinct]
    value_index = {value: index for index, value in enumerate(distinct)}
    for position, value in enumerate(cat_ids):
        cat_positions[value_index[value]].append(position)
    sides = []
    for ann in (gt, dt):
        image_pos = _positions(ann.image_ids, img_ids)
        cat_of = _positions(ann.category_ids, distinct)
        sides.append(_group_rows(image_pos, cat_of, cat_positions, use_cats, num_images))
    (gt_rows, gt_keys), (dt_rows, dt_keys) = sides
    keys = np.sort(np.concatenate([gt_keys, dt_keys]))
    groups = keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if keys.size else keys
    gt_offsets = np.append(np.searchsorted(gt_keys, groups, side="left"), gt_keys.shape[0]).astype(np.int64)
    dt_offsets = np.append(np.searchsorted(dt_keys, groups, side="left"), dt_keys.shape[0]).astype(np.int64)
    if use_cats:
        category_offsets = np.searchsorted(groups // max(num_images, 1), np.arange(len(cat_ids) + 1), side="left")
    else:
        category_offsets = np.array([0, groups.shape[0]])
    return _Groups(gt.take(gt_rows), dt.take(dt_rows), gt_offsets, dt_offsets, category_offsets.astype(np.int64),
                   dt_rows, gt_rows)


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


@dataclass
class _Evaluated:
    groups: _Groups
    dt_order: torch.Tensor
    codes: torch.Tensor
    gt_valid: torch.Tensor
    matched_gt: torch.Tensor | None = None  # [A, T, D'] grouped ground-truth row per position, -1: none


def _native_evaluate(groups: _Groups, iou_thrs, area_rngs, max_det: int, return_matches: bool = False) -> _Evaluated:
    from fastdet.ops.coco_eval import coco_evaluate

    gt, dt = groups.gt, groups.dt
    rle = {}
    if gt.rle is not None:
        rle = {"gt_rle": (_t(gt.rle[0]), _t(gt.rle[1])), "dt_rle": (_t(dt.rle[0]), _t(dt.rle[1]))}
    outputs = coco_evaluate(
        _t(gt.boxes), _t(gt.areas), _t(gt.crowd), _t(gt.ids), _t(groups.gt_offsets),
        _t(dt.boxes), _t(dt.areas), _t(dt.scores), _t(dt.ids), _t(groups.dt_offsets),
        _t(np.asarray(iou_thrs, dtype=np.float64).reshape(-1)),
        _t(np.asarray(area_rngs, dtype=np.float64).reshape(-1, 2)),
        max_det, **rle, return_matches=return_matches,
    )
    return _Evaluated(groups, *outputs)


def _native_accumulate(evaluated: _Evaluated, max_dets, rec_thrs):
    from fastdet.ops.coco_eval import coco_accumulate

    groups = evaluated.groups
    precision, recall, scores = coco_accumulate(
        _t(groups.dt.scores), evaluated.dt_order, evaluated.codes, _t(groups.dt_offsets),
        _t(groups.category_offsets), evaluated.gt_valid, _t(np.asarray(max_dets, dtype=np.int64)),
        _t(np.asarray(rec_thrs, dtype=np.float64).reshape(-1)),
    )
    return precision.numpy(), recall.numpy(), scores.numpy()


@dataclass
class CocoMatches:
    """The native evaluator's per-detection outcome (area range "all", the largest maxDets), for curves that must
    agree with COCO's matching (:func:`fastdet.eval.f1_confidence_from_evaluation`).

    ``scores`` ``[N]`` and ``category_index`` ``[N]`` (position in the evaluation's category list) of the input
    detections; ``true_positive`` / ``counted`` ``[T, N]`` bool: matched to a regular ground truth / neither
    ignored nor beyond maxDets (so ``counted & ~true_positive`` are the false positives) at each IoU threshold;
    ``num_ground_truth`` ``[K]``: regular (not crowd) ground truth per category. ``inputs`` keeps the flat
    annotations, so that :meth:`confusion_matrix` can run the native matching again class-agnostically."""

    scores: np.ndarray
    category_index: np.ndarray
    true_positive: np.ndarray
    counted: np.ndarray
    num_ground_truth: np.ndarray
    inputs: _EvaluationInputs | None = field(default=None, repr=False)

    def confusion_matrix(self, iou_threshold: float, score_threshold: float, max_detections: int) -> np.ndarray:
        """The class-agnostic confusion matrix of the evaluated annotations; see
        :func:`fastdet.eval.confusion_matrix_from_evaluation`."""
        if self.inputs is None:
            raise ValueError("these matches do not keep the evaluated annotations")
        inputs = self.inputs
        return class_agnostic_confusion(inputs.gt, inputs.dt, inputs.img_ids, inputs.cat_ids, iou_threshold,
                                        score_threshold, max_detections)


@dataclass
class _EvaluationInputs:
    gt: _Annotations
    dt: _Annotations
    img_ids: list
    cat_ids: list


# pycocotools' area range "all": ground truth outside it is ignored, and so are unmatched detections outside it.
_AREA_ALL = (0.0, 1e5**2)


def _subset(values, index: np.ndarray):
    return values[index] if isinstance(values, np.ndarray) else [values[i] for i in index.tolist()]


def class_agnostic_confusion(gt: _Annotations, dt: _Annotations, img_ids: list, cat_ids: list, iou_threshold: float,
                             score_threshold: float, max_det: int) -> np.ndarray:
    """``[K + 1, K + 1]`` confusion counts ``[predicted, true]`` (0 the background, ``k + 1`` the category
    ``cat_ids[k]``) from one class-agnostic native evaluation: pycocotools' ``useCats=0`` matching at one IoU
    threshold, area "all", of the detections scoring at least ``score_threshold`` (each image's ``max_det`` best).

    A detection matched to a regular ground truth counts at ``[its category, the ground truth's category]``; an
    unmatched one at ``[its category, 0]``; a regular ground truth no detection matched at ``[0, its category]``.
    Crowd ground truth and the detections matched to it are ignored (neither true nor false positives), as are
    pycocotools' other ignored cases (ground truth, or an unmatched detection, of area above 1e10). Identical to
    counting pycocotools' ``evalImgs`` (``dtMatches``, ``dtIgnore``, ``gtMatches``, ``gtIgnore``), quirk included:
    a detection matched to a ground truth whose id is 0 counts as a false positive, and that ground truth as found."""
    keep = np.flatnonzero(dt.scores >= score_threshold)
    kept = _Annotations(
        image_ids=_subset(dt.image_ids, keep), category_ids=_subset(dt.category_ids, keep), boxes=dt.boxes[keep],
        areas=dt.areas[keep], ids=dt.ids[keep], crowd=dt.crowd[keep], scores=dt.scores[keep],
        rle=None if dt.rle is None else (dt.rle[0], dt.rle[1][keep]),
    )
    groups = _group(gt, kept, list(img_ids), list(cat_ids), use_cats=False)
    evaluated = _native_evaluate(groups, [iou_threshold], [_AREA_ALL], int(max_det), return_matches=True)
    size = len(cat_ids) + 1
    distinct = list(dict.fromkeys(cat_ids))
    first_position = np.array([list(cat_ids).index(c) for c in distinct], dtype=np.int64)
    gt_label = first_position[_positions(gt.category_ids, distinct)[groups.gt_rows]] + 1  # per grouped gt row
    order = evaluated.dt_order.numpy()
    dt_label = first_position[_positions(kept.category_ids, distinct)[groups.dt_rows[order]]] + 1  # per position
    codes = evaluated.codes[0, 0].numpy()
    matched = evaluated.matched_gt[0, 0].numpy()
    evaluated_flag = (codes & 4) != 0  # within max_det
    counted = evaluated_flag & ((codes & 2) == 0)  # and not ignored
    # "matched" as pycocotools reads dtMatches (bit 0: a ground truth of id 0 reads as no match, so the detection
    # is a false positive) and gtMatches (set by any evaluated detection that took the ground truth)
    true = np.where((codes & 1) != 0, gt_label[np.maximum(matched, 0)], 0)
    found = np.zeros(gt_label.shape[0], dtype=bool)
    found[matched[evaluated_flag & (matched >= 0)]] = True
    lo, hi = _AREA_ALL
    # pycocotools' ignore test, written its way (a NaN area is not ignored)
    regular = ~((groups.gt.crowd != 0) | (groups.gt.areas < lo) | (groups.gt.areas > hi))
    missed = regular & ~found
    predicted = np.concatenate([dt_label[counted], np.zeros(int(missed.sum()), dtype=np.int64)])
    true = np.concatenate([true[counted], gt_label[missed]])
    counts = np.bincount(predicted * size + true, minlength=size * size)
    return counts.reshape(size, size).astype(np.int64)


def _matches(evaluated: _Evaluated, scores: np.ndarray, category_index: np.ndarray, area_index: int,
             num_categories: int) -> CocoMatches:
    groups = evaluated.groups
    n = scores.shape[0]
    codes = evaluated.codes[area_index].numpy()  # [T, D'] at group-sorted positions
    original = groups.dt_rows[evaluated.dt_order.numpy()]  # input detection at each position
    evaluated_flag = (codes & 4) != 0
    counted = np.zeros((codes.shape[0], n), dtype=bool)
    true_positive = np.zeros((codes.shape[0], n), dtype=bool)
    counted[:, original] = evaluated_flag & ((codes & 2) == 0)
    true_positive[:, original] = counted[:, original] & ((codes & 1) != 0)
    group_category = np.repeat(np.arange(num_categories), np.diff(groups.category_offsets))
    valid = evaluated.gt_valid[area_index].numpy()
    num_gt = np.bincount(group_category, weights=valid, minlength=num_categories).astype(np.int64)
    return CocoMatches(scores, category_index, true_positive, counted, num_gt)


def evaluate_result_rows(coco_gt, rows: np.ndarray, max_dets: list[int]):
    """The fast path of :func:`fastdet.eval.evaluate_detections`: bbox evaluation of result rows ``[N, 7]``
    (``image_id, x, y, w, h, score, category_id``) with default parameters and ``maxDets = max_dets``, exactly as
    ``COCOeval`` would evaluate ``coco_gt.loadRes(rows)`` but without building per-detection dicts.
    Returns ``(params, precision, recall, scores, matches)`` with :class:`CocoMatches`."""
    p = _params_class()(iouType="bbox")
    p.imgIds = list(np.unique(sorted(coco_gt.getImgIds())))
    p.catIds = list(np.unique(sorted(coco_gt.getCatIds())))
    p.maxDets = sorted(max_dets)
    _check_params(p)
    gt = _annotations_of(coco_gt, "bbox", detections=False)
    n = rows.shape[0]
    boxes = np.ascontiguousarray(rows[:, 1:5], dtype=np.float64)
    dt = _Annotations(
        image_ids=rows[:, 0].astype(np.int64), category_ids=rows[:, 6].astype(np.int64), boxes=boxes,
        areas=boxes[:, 2] * boxes[:, 3], ids=np.arange(1, n + 1, dtype=np.float64), crowd=np.zeros(n, np.uint8),
        scores=np.ascontiguousarray(rows[:, 5], dtype=np.float64),
    )
    groups = _group(gt, dt, list(p.imgIds), list(p.catIds), True)
    evaluated = _native_evaluate(groups, p.iouThrs, p.areaRng, int(p.maxDets[-1]))
    precision, recall, scores = _native_accumulate(evaluated, p.maxDets, p.recThrs)
    category_index = _positions(dt.category_ids, list(p.catIds))
    matches = _matches(evaluated, dt.scores, category_index, list(p.areaRngLbl).index("all"), len(p.catIds))
    matches.inputs = _EvaluationInputs(gt, dt, list(p.imgIds), list(p.catIds))
    return p, precision, recall, scores, matches


def _check_params(p) -> None:
    if p.iouType not in ("bbox", "segm"):
        raise ValueError(f"fastdet.eval.COCOeval evaluates iouType 'bbox' and 'segm', got {p.iouType!r} "
                         "(use pycocotools for keypoints)")
    max_dets = list(p.maxDets)
    if not max_dets or any(isinstance(m, bool) or int(m) != m or m < 0 for m in max_dets):
        raise ValueError(f"params.maxDets must be non-negative integers, got {p.maxDets!r}")
    area = np.asarray(p.areaRng, dtype=np.float64)
    if area.ndim != 2 or area.shape[1] != 2:
        raise ValueError(f"params.areaRng must be a list of [min, max] pairs, got {p.areaRng!r}")
    if len(p.areaRngLbl) != area.shape[0]:
        raise ValueError(f"params.areaRngLbl must name each of the {area.shape[0]} area ranges, got {p.areaRngLbl!r}")


def summarize_stats(precision, recall, params, corrected: bool = False, printer=print) -> np.ndarray:
    """pycocotools' 12 detection statistics from accumulated arrays (see the module docstring for ``corrected``)."""
    max_dets = list(params.maxDets)
    if corrected:
        top = max_dets[-1]
        ar_limits = [max_dets[min(0, len(max_dets) - 1)], max_dets[min(1, len(max_dets) - 1)], top]
        ap_limit = top
    else:
        top = max_dets[2]
        ar_limits = [max_dets[0], max_dets[1], max_dets[2]]
        ap_limit = 100
    iou_thrs = np.asarray(params.iouThrs)

    def one(ap, iou_thr=None, area="all", limit=100):
        title = "Average Precision" if ap else "Average Recall"
        kind = "(AP)" if ap else "(AR)"
        iou = f"{iou_thrs[0]:0.2f}:{iou_thrs[-1]:0.2f}" if iou_thr is None else f"{iou_thr:0.2f}"
        a_index = [i for i, label in enumerate(params.areaRngLbl) if label == area]
        if corrected:
            m_index = [len(max_dets) - 1 - max_dets[::-1].index(limit)] if limit in max_dets else []
        else:
            m_index = [i for i, m in enumerate(max_dets) if m == limit]
        s = precision if ap else recall
        if iou_thr is not None:
            s = s[np.where(iou_thr == iou_thrs)[0]]
        s = s[:, :, :, a_index, m_index] if ap else s[:, :, a_index, m_index]
        mean = -1 if len(s[s > -1]) == 0 else np.mean(s[s > -1])
        printer(f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | maxDets={limit:>3d} ] = {mean:0.3f}")
        return mean

    stats = np.zeros((12,))
    stats[0] = one(1, limit=ap_limit)
    stats[1] = one(1, iou_thr=0.5, limit=top)
    stats[2] = one(1, iou_thr=0.75, limit=top)
    stats[3] = one(1, area="small", limit=top)
    stats[4] = one(1, area="medium", limit=top)
    stats[5] = one(1, area="large", limit=top)
    stats[6] = one(0, limit=ar_limits[0])
    stats[7] = one(0, limit=ar_limits[1])
    stats[8] = one(0, limit=ar_limits[2])
    stats[9] = one(0, area="small", limit=top)
    stats[10] = one(0, area="medium", limit=top)
    stats[11] = one(0, area="large", limit=top)
    return stats


class COCOeval:
    """Drop-in for ``pycocotools.cocoeval.COCOeval`` (``bbox`` and ``segm``), computed by fastdet's native ops.

    Args:
        cocoGt, cocoDt: pycocotools ``COCO`` objects (ground truth, and results as from ``COCO.loadRes``). Not
            modified.
        iouType: ``"bbox"`` or ``"segm"`` (pycocotools' default is ``"segm"``).
        summary: ``"pycocotools"`` (default: ``summarize()`` exactly as pycocotools, quirks included) or
            ``"corrected"`` (limits indexed by position; see the module docstring).
        verbose: print pycocotools' progress lines (``summarize()`` always prints its table, as pycocotools does).

    Attributes follow pycocotools: ``params`` (pycocotools' own ``Params``), ``eval`` (``params``, ``counts``,
    ``date``, ``precision`` ``[T, R, K, A, M]``, ``recall`` ``[T, K, A, M]``, ``scores`` ``[T, R, K, A, M]``),
    ``stats`` (12 values after ``summarize()``). ``evalImgs`` and ``ious`` are not materialised. ``timings``
    holds the seconds of the last run's stages: ``load`` (gathering the annotations into arrays), ``evaluate``
    (native matching) and ``accumulate``.
    """

    def __init__(self, cocoGt=None, cocoDt=None, iouType: str = "segm", *, summary: str = "pycocotools",
                 verbose: bool = True):
        if summary not in ("pycocotools", "corrected"):
            raise ValueError(f"summary must be 'pycocotools' or 'corrected', got {summary!r}")
        if iouType not in ("bbox", "segm"):
            raise ValueError(f"iouType must be 'bbox' or 'segm' (fastdet.eval.COCOeval does not evaluate keypoints), "
                             f"got {iouType!r}")
        self.cocoGt = cocoGt
        self.cocoDt = cocoDt
        self.params = _params_class()(iouType=iouType)
        self.summary = summary
        self.verbose = verbose
        self.eval = {}
        self.stats = []
        self._evaluated: _Evaluated | None = None
        self._paramsEval = None
        self.timings: dict[str, float] = {}
        if cocoGt is not None:
            self.params.imgIds = sorted(cocoGt.getImgIds())
            self.params.catIds = sorted(cocoGt.getCatIds())

    def _log(self, text: str) -> None:
        if self.verbose:
            print(text)

    @property
    def evalImgs(self):  # noqa: N802 - pycocotools' name
        raise AttributeError("fastdet.eval.COCOeval does not materialise evalImgs (per-image dicts); use "
                             "pycocotools.cocoeval.COCOeval where they are needed")

    @property
    def ious(self):
        raise AttributeError("fastdet.eval.COCOeval does not materialise the per-image IoU matrices (ious)")

    def evaluate(self) -> None:
        """Match detections to ground truth for every image, category and area range (pycocotools' evaluate)."""
        tic = time.perf_counter()
        self._log("Running per image evaluation...")
        p = self.params
        if p.useSegm is not None:
            p.iouType = "segm" if p.useSegm == 1 else "bbox"
            self._log(f"useSegm (deprecated) is not None. Running {p.iouType} evaluation")
        self._log(f"Evaluate annotation type *{p.iouType}*")
        _check_params(p)
        if self.cocoGt is None or self.cocoDt is None:
            raise ValueError("COCOeval needs cocoGt and cocoDt to evaluate")
        p.imgIds = list(np.unique(p.imgIds))
        if p.useCats:
            p.catIds = list(np.unique(p.catIds))
        p.maxDets = sorted(p.maxDets)
        self.params = p
        gt = _annotations_of(self.cocoGt, p.iouType, detections=False)
        dt = _annotations_of(self.cocoDt, p.iouType, detections=True)
        # with useCats=0 the list is used as given: its order (and any repeats) shape pycocotools' per-image lists
        groups = _group(gt, dt, list(p.imgIds), list(p.catIds), bool(p.useCats))
        load = time.perf_counter()
        self._evaluated = _native_evaluate(groups, p.iouThrs, p.areaRng, int(p.maxDets[-1]))
        self._dt = dt
        self._paramsEval = copy.deepcopy(p)
        toc = time.perf_counter()
        self.timings = {"load": load - tic, "evaluate": toc - load}
        self._log(f"DONE (t={toc - tic:0.2f}s).")

    def matches(self) -> CocoMatches:
        """A fastdet extra: every detection's outcome per IoU threshold (area "all", the largest maxDets) as
        :class:`CocoMatches`, in the order of ``cocoDt``'s annotations (``cocoDt.dataset["annotations"]``), for
        F1-confidence curves with COCO's matching (:func:`fastdet.eval.f1_confidence_from_evaluation`). Needs
        :meth:`evaluate` first and ``useCats=1``."""
        if self._evaluated is None:
            raise RuntimeError("Please run evaluate() first")
        pe = self._paramsEval
        if not pe.useCats:
            raise ValueError("matches() needs an evaluation with useCats=1 (per-category matching)")
        category_index = _positions(self._dt.category_ids, list(pe.catIds))
        return _matches(self._evaluated, self._dt.scores, category_index, list(pe.areaRngLbl).index("all"),
                        len(pe.catIds))

    def accumulate(self, p=None) -> None:
        """Precision/recall/score arrays over images (pycocotools' accumulate)."""
        self._log("Accumulating evaluation results...")
        tic = time.perf_counter()
        if self._evaluated is None:
            raise RuntimeError("Please run evaluate() first")
        pe = self._paramsEval
        if p is not None and p is not self.params:
            same = (list(p.imgIds) == list(pe.imgIds) and list(p.catIds) == list(pe.catIds)
                    and sorted(p.maxDets) == list(pe.maxDets) and np.array_equal(p.areaRng, pe.areaRng)
                    and p.useCats == pe.useCats and np.array_equal(p.iouThrs, pe.iouThrs))
            if not same:
                raise NotImplementedError("fastdet.eval.COCOeval.accumulate(p) needs p equal to the evaluated "
                                          "parameters (pycocotools' subset accumulation is not supported)")
        p = self.params if p is None else p
        precision, recall, scores = _native_accumulate(self._evaluated, pe.maxDets, p.recThrs)
        if not p.useCats:
            p.catIds = [-1]
        T, R, K, A, M = precision.shape
        self.eval = {
            "params": p,
            "counts": [T, R, K, A, M],
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
            "precision": precision,
            "recall": recall,
            "scores": scores,
        }
        toc = time.perf_counter()
        self.timings["accumulate"] = toc - tic
        self._log(f"DONE (t={toc - tic:0.2f}s).")

    def summarize(self, corrected: bool | None = None) -> None:
        """Print the 12 standard statistics and store them in ``stats`` (pycocotools' layout and values; with
        ``corrected`` (default: the constructor's ``summary``), limits are taken by position)."""
        if not self.eval:
            raise RuntimeError("Please run accumulate() first")
        if corrected is None:
            corrected = self.summary == "corrected"
        self.stats = summarize_stats(self.eval["precision"], self.eval["recall"], self.params, corrected=corrected)

    def __str__(self) -> str:
        self.summarize()
        return ""
