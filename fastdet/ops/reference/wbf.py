"""Reference weighted boxes fusion and non-maximum weighted: the algorithms of :mod:`fastdet.ops.wbf` (ensemble-boxes'
semantics) written as plain Python over one image, with float32 stores emulated through ``torch.float32`` tensors."""

from __future__ import annotations

import math

import torch

__all__ = ["weighted_boxes_fusion", "non_maximum_weighted"]


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def _iou(a, b) -> float:
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _label_groups(boxes_list, scores_list, labels_list, weights, skip_box_threshold) -> dict:
    """label -> [(weighted score, weight, model, input order, box)] of the boxes that pass ensemble-boxes'
    preparation (corners ordered, clipped to [0, 1], zero-area and below-threshold boxes dropped), each label's
    entries by decreasing weighted score (ties: the later box first)."""
    groups: dict = {}
    order = 0
    for m in range(len(boxes_list)):
        boxes = torch.as_tensor(boxes_list[m], dtype=torch.float64).reshape(-1, 4).tolist()
        scores = torch.as_tensor(scores_list[m], dtype=torch.float64).reshape(-1).tolist()
        labels = torch.as_tensor(labels_list[m]).reshape(-1).tolist()
        for (x1, y1, x2, y2), s, label in zip(boxes, scores, labels):
            if math.isnan(s) or s < skip_box_threshold or any(map(math.isnan, (x1, y1, x2, y2))):
                continue
            x1, x2 = min(x1, x2), max(x1, x2)
            y1, y2 = min(y1, y2), max(y1, y2)
            x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in (x1, y1, x2, y2))
            if (x2 - x1) * (y2 - y1) == 0.0:
                continue
            groups.setdefault(int(label), []).append((s * weights[m], weights[m], m, order, (x1, y1, x2, y2)))
            order += 1
    for entries in groups.values():
        entries.sort(key=lambda e: (-e[0], -e[3]))
    return groups


def weighted_boxes_fusion(boxes_list, scores_list, labels_list, weights=None, iou_threshold=0.55,
                          skip_box_threshold=0.0, conf_type="avg", allows_overflow=False):
    """Returns (boxes [K, 4] float64, scores [K] float64, labels [K] int64) by decreasing score."""
    if conf_type not in ("avg", "max", "box_and_model_avg", "absent_model_aware_avg"):
        raise ValueError(f"unknown conf_type {conf_type!r}")
    num_models = len(boxes_list)
    weights = [1.0] * num_models if weights is None else [float(w) for w in weights]
    groups = _label_groups(boxes_list, scores_list, labels_list, weights, skip_box_threshold)
    clusters = []  # [label, box, score, weight, members]
    for label, entries in groups.items():
        first = len(clusters)
        for e in entries:
            best, best_iou = -1, 0.0
            for c in range(first, len(clusters)):
                iou = _iou(clusters[c][1], e[4])
                if best < 0 or iou > best_iou:
                    best, best_iou = c, iou
            if best >= 0 and best_iou > iou_threshold:
                cluster = clusters[best]
                cluster[4].append(e)
                acc, conf, wsum = [0.0] * 4, 0.0, 0.0
                for member in cluster[4]:
                    acc = [_f32(a + member[0] * v) for a, v in zip(acc, member[4])]
                    conf += member[0]
                    wsum += member[1]
                cluster[1] = [_f32(a / conf) for a in acc]
                score = max(member[0] for member in cluster[4]) if conf_type == "max" else conf / len(cluster[4])
                cluster[2], cluster[3] = _f32(score), _f32(wsum)
            else:
                clusters.append([label, list(e[4]), e[0], e[1], [e]])
    total, heaviest = sum(weights), max(weights, default=1.0)
    for c in clusters:
        n = len(c[4])
        present = sorted({member[2] for member in c[4]})
        if conf_type == "box_and_model_avg":
            c[2] = c[2] * n / c[3]
            c[2] = c[2] * sum(weights[m] for m in present) / total
        elif conf_type == "absent_model_aware_avg":
            c[2] = c[2] * n / (c[3] + sum(w for m, w in enumerate(weights) if m not in present))
        elif conf_type == "max":
            c[2] = c[2] / heaviest
        elif allows_overflow:
            c[2] = c[2] * n / total
        else:
            c[2] = c[2] * min(num_models, n) / total
    ranked = sorted(range(len(clusters)), key=lambda k: (-clusters[k][2], -k))
    boxes = torch.tensor([clusters[k][1] for k in ranked], dtype=torch.float64).reshape(-1, 4)
    scores = torch.tensor([clusters[k][2] for k in ranked], dtype=torch.float64)
    labels = torch.tensor([clusters[k][0] for k in ranked], dtype=torch.int64)
    return boxes, scores, labels


def non_maximum_weighted(boxes_list, scores_list, labels_list, weights=None, iou_threshold=0.55,
                         skip_box_threshold=0.0):
    """Returns (boxes [K, 4] float32, scores [K] float32, labels [K] int64) by decreasing score."""
    num_models = len(boxes_list)
    weights = [1.0] * num_models if weights is None else [float(w) for w in weights]
    heaviest = max(weights, default=1.0)
    weights = [w / heaviest for w in weights]
    groups = _label_groups(boxes_list, scores_list, labels_list, weights, skip_box_threshold)
    fused = []  # (label, box, score)
    for label, entries in groups.items():
        clusters: list = []  # each: [first entry, members]
        for e in entries:
            best, best_iou = -1, iou_threshold
            for c, (first, _) in enumerate(clusters):
                iou = _iou(first[4], e[4])
                if iou > best_iou:
                    best, best_iou = c, iou
            if best >= 0:
                clusters[best][1].append(e)
            else:
                clusters.append([e, [e]])
        for first, members in clusters:
            acc, conf = [0.0] * 4, 0.0
            for member in members:
                weight = member[0] * (1.0 if member is first else _iou(member[4], first[4]))
                acc = [_f32(a + weight * v) for a, v in zip(acc, member[4])]
                conf += weight
            fused.append((label, [_f32(a / conf) if conf != 0 else math.nan for a in acc], _f32(first[0])))
    ranked = sorted(range(len(fused)), key=lambda k: (-fused[k][2], -k))
    boxes = torch.tensor([fused[k][1] for k in ranked], dtype=torch.float32).reshape(-1, 4)
    scores = torch.tensor([fused[k][2] for k in ranked], dtype=torch.float32)
    labels = torch.tensor([fused[k][0] for k in ranked], dtype=torch.int64)
    return boxes, scores, labels
