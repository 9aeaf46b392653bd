"""fastdet.ensemble: fusion of several detectors' outputs and horizontal-flip test-time augmentation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastdet import ops
from fastdet.ensemble import EnsembleDetector, fuse_detections


class FixedDetector(nn.Module):
    """Returns the same boxes for every image, mirrored when the image content is mirrored (a marker pixel)."""

    def __init__(self, boxes, scores, labels):
        super().__init__()
        self.boxes, self.scores, self.labels = boxes, scores, labels

    def forward(self, images):
        out = []
        for image in images:
            boxes = self.boxes
            if image[0, 0, -1] > 0.5:  # the marker moved to the right edge: the image is flipped
                w = image.shape[-1]
                boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
            out.append({"boxes": boxes.clone(), "scores": self.scores.clone(), "labels": self.labels.clone()})
        return out


def _detector(seed, n=20, size=100.0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size * 0.7
    wh = torch.rand(n, 2, generator=g) * size * 0.3 + 2
    return FixedDetector(torch.cat([xy, xy + wh], 1), torch.rand(n, generator=g), torch.randint(1, 4, (n,), generator=g))


def _images(count=2, h=60, w=100):
    images = torch.zeros(count, 3, h, w)
    images[:, 0, 0, 0] = 1.0  # marker at the left edge
    return list(images)


@pytest.mark.parametrize("method, fuse", [("wbf", ops.weighted_boxes_fusion), ("nmw", ops.non_maximum_weighted)])
def test_fusion_ensembles_match_the_op_on_normalised_boxes(method, fuse):
    models = [_detector(1), _detector(2), _detector(3)]
    images = _images()
    fused = EnsembleDetector(models, method=method, weights=[2, 1, 1], iou_threshold=0.5, max_detections=1000)(images)
    h, w = images[0].shape[-2:]
    scale = torch.tensor([w, h, w, h], dtype=torch.float64)
    for b in range(len(images)):
        eb, es, el = fuse([m.boxes.double() / scale for m in models], [m.scores.double() for m in models],
                          [m.labels for m in models], [2, 1, 1], 0.5)
        assert len(es) < sum(len(m.scores) for m in models)  # some boxes were merged
        assert torch.allclose(fused[b]["boxes"].double(), eb.double() * scale, rtol=0, atol=1e-4)
        assert torch.equal(fused[b]["scores"], es.float()) and torch.equal(fused[b]["labels"], el)


@pytest.mark.parametrize("method", ["nms", "soft-nms"])
def test_nms_ensembles_keep_scaled_scores_of_kept_boxes(method):
    models = [_detector(4), _detector(5)]
    fused = EnsembleDetector(models, method=method, iou_threshold=0.5)(_images(1))[0]
    boxes = torch.cat([m.boxes for m in models])
    scores = torch.cat([m.scores for m in models]) / 2
    labels = torch.cat([m.labels for m in models])
    if method == "nms":
        keep = ops.batched_nms(boxes, scores, labels, 0.5)
        assert torch.equal(fused["boxes"], boxes[keep]) and torch.allclose(fused["scores"], scores[keep])
    else:
        keep, values, num = ops.soft_nms_fixed(boxes.double(), scores.double(), labels, 40, 0.5, 0.5, 0.0)
        assert torch.allclose(fused["scores"], values[: int(num)].float())
    assert (fused["scores"][:-1] >= fused["scores"][1:]).all()


def test_hflip_tta_maps_boxes_back():
    model = _detector(6)
    images = _images(1, h=120, w=120)  # every box inside the image: fusion clips to it
    fused = EnsembleDetector([model], method="wbf", tta=True, iou_threshold=0.9, max_detections=1000)(images)[0]
    # the flipped view's boxes come back onto the original ones: every fused box is an original box with its score
    # (two members, two views)
    order = torch.sort(model.scores, descending=True, stable=True).indices
    assert fused["boxes"].shape == model.boxes.shape
    torch.testing.assert_close(fused["boxes"], model.boxes[order], rtol=0, atol=1e-3)
    torch.testing.assert_close(fused["scores"], model.scores[order])


def test_errors():
    with pytest.raises(ValueError, match="method must be"):
        EnsembleDetector([_detector(1)], method="vote")
    with pytest.raises(ValueError, match="weights must have"):
        EnsembleDetector([_detector(1)], weights=[1, 2])
    with pytest.raises(ValueError, match="one dict per image"):
        fuse_detections([[{}]], [(1, 1), (2, 2)])


def test_retinanet_soft_nms_method(monkeypatch):
    from fastdet.models import retinanet_resnet18_fpn

    seen = []
    original = ops.multiclass_nms

    def spy(*args, **kwargs):
        seen.append(kwargs.get("method", "hard"))
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "multiclass_nms", spy)
    torch.manual_seed(0)
    model = retinanet_resnet18_fpn(num_classes=3, min_size=96, max_size=128, score_thresh=0.3,
                                   nms_method="soft").eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128)])[0]
    assert seen == ["soft"]
    assert (out["scores"] > 0.3).all() and (out["scores"][:-1] >= out["scores"][1:]).all()
    with pytest.raises(ValueError, match="nms_method must be one of"):
        retinanet_resnet18_fpn(num_classes=3, nms_method="matrix")
