"""``nms_method="soft"`` / ``"soft_linear"`` on every detector family (issue 16): the detector hands the same
candidates to :func:`fastdet.ops.multiclass_nms` whatever the method (only ``method`` changes; soft-NMS itself is
checked against ensemble-boxes in test_soft_nms.py), and the detections show soft-NMS's behaviour: the best detection
scores hard NMS's best score, and same-class boxes overlapping above the threshold survive with decayed scores. (Two
zero-area boxes have an undefined IoU, which soft-NMS turns into a NaN score and drops, as ensemble-boxes does; hard NMS
keeps them, as torchvision does, so the soft output may hold fewer boxes.)"""

from __future__ import annotations

import pytest
import torch

from fastdet import models, ops
from fastdet.models.postprocess import NMS_METHODS

# builder, keyword arguments for a tiny, detection-rich random model, and the attribute holding the NMS threshold
CASES = {
    "fasterrcnn_resnet18_fpn": (dict(num_classes=4, min_size=96, max_size=96, box_score_thresh=0.0,
                                     box_nms_thresh=0.3, rpn_post_nms_top_n_test=100), "roi_heads.nms_thresh"),
    "maskrcnn_resnet18_fpn": (dict(num_classes=3, min_size=64, max_size=64, box_score_thresh=0.0,
                                   box_nms_thresh=0.3, rpn_post_nms_top_n_test=60), "roi_heads.nms_thresh"),
    "ssd300_vgg16_light": (dict(num_classes=4, score_thresh=0.0, nms_thresh=0.3, topk_candidates=50,
                                detections_per_img=1000), "nms_thresh"),
    "yolo_n": (dict(num_classes=4, image_size=96, nms_threshold=0.3), "nms_threshold"),
    "fcos_resnet50_fpn": (dict(num_classes=4, weights_backbone=None, min_size=96, max_size=96, score_thresh=0.0,
                               nms_thresh=0.3, topk_candidates=40, detections_per_img=300), "nms_thresh"),
}


def _build(name: str, nms_method: str):
    kwargs, _ = CASES[name]
    torch.manual_seed(0)
    return getattr(models, name)(nms_method=nms_method, **kwargs).eval()


def _same_class_overlap(det, threshold: float) -> bool:
    for label in det["labels"].unique():
        boxes = det["boxes"][det["labels"] == label]
        iou = ops.box_iou(boxes, boxes).fill_diagonal_(0)
        if (iou > threshold).any():
            return True
    return False


@pytest.mark.parametrize("name", sorted(CASES))
def test_soft_nms_method_on_every_detector(name, monkeypatch):
    calls = []
    original = ops.multiclass_nms

    def spy(boxes, scores, *args, **kwargs):
        calls.append((boxes.clone(), scores.clone(), args, kwargs.get("method", "hard")))
        return original(boxes, scores, *args, **kwargs)

    monkeypatch.setattr(ops, "multiclass_nms", spy)
    import fastdet.models.heads.roi_heads as roi_heads
    import fastdet.models.heads.yolo_head as yolo_head

    monkeypatch.setattr(roi_heads, "multiclass_nms", spy)  # imported by name there
    monkeypatch.setattr(yolo_head, "multiclass_nms", spy)
    images = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(1))]
    outputs = {}
    for method in ("hard", "soft"):
        model = _build(name, method)
        assert model.nms_method == method if hasattr(model, "nms_method") else model.roi_heads.nms_method == method
        with torch.no_grad():
            outputs[method] = model(images)[0]
    (hard_boxes, hard_scores, hard_args, m1), (soft_boxes, soft_scores, soft_args, m2) = calls[-2:]
    assert (m1, m2) == ("hard", "soft")
    # the same candidates and thresholds; only the method differs
    assert torch.equal(hard_boxes, soft_boxes) and torch.equal(hard_scores.nan_to_num(), soft_scores.nan_to_num())
    assert hard_args == soft_args
    hard, soft = outputs["hard"], outputs["soft"]
    threshold = eval("model." + CASES[name][1], {"model": model})
    assert len(hard["scores"]) > 0 and len(soft["scores"]) > 0
    # the best candidate is never decayed (random models may tie at the top, so compare the score)
    assert soft["scores"][0] == hard["scores"][0]
    assert (soft["scores"][:-1] >= soft["scores"][1:]).all()
    assert not _same_class_overlap(hard, threshold)
    assert _same_class_overlap(soft, threshold), "soft-NMS keeps overlapping boxes with decayed scores"
    if name.startswith("maskrcnn"):
        assert soft["masks"].shape[0] == len(soft["scores"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_unknown_nms_method_is_refused(name):
    kwargs, _ = CASES[name]
    with pytest.raises(ValueError, match="nms_method must be one of"):
        getattr(models, name)(nms_method="matrix", **kwargs)


def test_soft_linear_is_accepted_everywhere():
    assert NMS_METHODS == ("hard", "soft", "soft_linear")
    model = _build("yolo_n", "soft_linear")
    with torch.no_grad():
        out = model([torch.rand(3, 96, 96)])[0]
    assert (out["scores"][:-1] >= out["scores"][1:]).all()
