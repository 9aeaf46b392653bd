"""The rest of torchvision's detection zoo: each builder loads torchvision's state dict (strict) and gives the same
boxes, labels and scores on random-weight models whose scores are spread out; training losses match where sampling
is deterministic."""

from __future__ import annotations

import pytest
import torch

from detection_asserts import assert_same_detections, make_targets
from fastdet import models

tv_detection = pytest.importorskip("torchvision.models.detection")
# torchvision decides NMS on its per-category path, fastdet's semantics (see conftest.py).
pytestmark = pytest.mark.usefixtures("torchvision_per_category_nms")


def _images(seed: int, sizes=((150, 200), (220, 160), (96, 128))):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def _pair(name: str, adjust, **kwargs):
    torch.manual_seed(0)
    theirs = getattr(tv_detection, name)(weights=None, weights_backbone=None, num_classes=91, **kwargs)
    adjust(theirs)
    ours = getattr(models, name)(weights_backbone=None, num_classes=91, **kwargs)
    ours.load_state_dict(theirs.state_dict())  # strict
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in theirs.named_parameters() if p.requires_grad]
    return theirs.eval(), ours.eval()


def _spread_rcnn(model):
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.02)
        model.rpn.head.bbox_pred.weight.mul_(0.2)


def _spread_retinanet(model):
    with torch.no_grad():
        model.head.classification_head.cls_logits.weight.normal_(0, 0.03)
        model.head.classification_head.cls_logits.bias.normal_(-2.5, 0.5)


def _canonical(detections):
    # torchvision's large-input batched_nms may order exactly tied scores either way (see test_model_faster_rcnn).
    order = torch.arange(len(detections["scores"]))
    for key in [detections["boxes"][:, j] for j in (3, 2, 1, 0)] + [detections["labels"].float()]:
        order = order[torch.sort(key[order], stable=True).indices]
    order = order[torch.sort(detections["scores"][order], descending=True, stable=True).indices]
    return {k: v[order] for k, v in detections.items()}


@pytest.fixture(scope="module")
def faster_v2():
    return _pair("fasterrcnn_resnet50_fpn_v2", _spread_rcnn, min_size=96, max_size=160, rpn_post_nms_top_n_test=200,
                 box_score_thresh=0.01, box_detections_per_img=200)


def test_fasterrcnn_resnet50_fpn_v2_matches_torchvision(faster_v2, seed):
    theirs, ours = faster_v2
    images = _images(seed)
    with torch.no_grad():
        expected, actual = theirs(images), ours(images)
    for e, a in zip(expected, actual):
        e, a = _canonical(e), _canonical(a)
        assert len(a["scores"]) == len(e["scores"]) > 20
        torch.testing.assert_close(a["boxes"], e["boxes"], rtol=0, atol=1e-3)
        assert torch.equal(a["labels"], e["labels"])
        torch.testing.assert_close(a["scores"], e["scores"], rtol=0, atol=1e-4)


def test_fasterrcnn_resnet50_fpn_v2_layout():
    model = models.fasterrcnn_resnet50_fpn_v2(weights_backbone=None)
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)  # torchvision keeps BatchNorm2d in v2
    assert isinstance(model.backbone.fpn.inner_blocks[0][1], torch.nn.BatchNorm2d)
    assert len(model.rpn.head.conv) == 2


@pytest.fixture(scope="module")
def retinanet_v2():
    return _pair("retinanet_resnet50_fpn_v2", _spread_retinanet, min_size=128, max_size=192)


def test_retinanet_resnet50_fpn_v2_matches_torchvision(retinanet_v2, seed):
    theirs, ours = retinanet_v2
    images = _images(seed)
    with torch.no_grad():
        expected, actual = theirs(images), ours(images)
    assert_same_detections(expected, actual, ours.detections_per_img)


def test_retinanet_resnet50_fpn_v2_losses_match_torchvision(seed):
    theirs, ours = _pair("retinanet_resnet50_fpn_v2", _spread_retinanet, min_size=128, max_size=160)
    theirs.train(), ours.train()
    assert ours.head.regression_head._loss_type == "giou"
    g = torch.Generator().manual_seed(seed)
    sizes = [(150, 200), (140, 120)]
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    targets = make_targets(sizes, [5, 2], 91, generator=g)
    expected = theirs(images, [dict(t) for t in targets])
    actual = ours(images, [dict(t) for t in targets])
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def _blobs(generator, h, w):
    """Images with large-scale structure (smoothed noise plus a little fine noise): random MobileNets turn plain
    pixel noise into spatially constant features, i.e. massively tied scores."""
    low = torch.rand(1, 3, 6, 8, generator=generator)
    smooth = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
    return smooth * 0.7 + torch.rand(3, h, w, generator=generator) * 0.3


def _calibrate_batch_norm(model, images):
    """Running statistics from a few images (as a trained model would have), so that eval-mode batch norm keeps the
    features' spatial variation."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        batch, _ = model.transform(images)
        model.backbone(batch.tensors)
    model.eval()


def _calibrated(model):
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / (m.out_channels * m.weight[0, 0]
                                                                                   .numel() / m.groups)) ** 0.5)
    _calibrate_batch_norm(model, [_blobs(g, 160, 160) for _ in range(4)])


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_fasterrcnn_mobilenet_matches_torchvision(name, seed):
    def adjust(model):
        _calibrated(model)
        _spread_rcnn(model)
        with torch.no_grad():
            model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.3)

    theirs, ours = _pair(name, adjust, min_size=160, max_size=224, box_score_thresh=0.01, rpn_score_thresh=0.0)
    assert ours.rpn.head.cls_logits.out_channels == 15 and list(ours.backbone.body.keys())[-1] == "16"
    g = torch.Generator().manual_seed(seed)
    images = [_blobs(g, 150, 200), _blobs(g, 200, 160)]
    with torch.no_grad():
        expected, actual = theirs(images), ours(images)
    for e, a in zip(expected, actual):
        e, a = _canonical(e), _canonical(a)
        assert len(a["scores"]) == len(e["scores"]) > 20
        torch.testing.assert_close(a["boxes"], e["boxes"], rtol=0, atol=1e-3)
        assert torch.equal(a["labels"], e["labels"])
        torch.testing.assert_close(a["scores"], e["scores"], rtol=0, atol=1e-4)


def test_ssdlite_matches_torchvision(seed):
    theirs, ours = _pair("ssdlite320_mobilenet_v3_large", _calibrated)
    g = torch.Generator().manual_seed(seed)
    images = [_blobs(g, 150, 200), _blobs(g, 200, 160)]
    with torch.no_grad():
        expected, actual = theirs(images), ours(images)
    assert_same_detections(expected, actual, ours.detections_per_img)
    theirs.train(), ours.train()
    targets = make_targets([(150, 200), (200, 160)], [4, 2], 91, generator=g, first_label=1)
    expected = theirs(images, [dict(t) for t in targets])
    actual = ours(images, [dict(t) for t in targets])
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_mobilenet_backbone_matches_torchvision_classifier():
    tv_models = pytest.importorskip("torchvision.models")
    from fastdet.models.mobilenet import mobilenet_v3_large

    for reduced_tail in (False, True):
        theirs = tv_models.mobilenet_v3_large(weights=None, reduced_tail=reduced_tail).eval()
        ours = mobilenet_v3_large(reduced_tail=reduced_tail).eval()
        ours.load_state_dict(theirs.state_dict())
        x = torch.rand(2, 3, 96, 128)
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x))


def test_mobilenet_trainable_layers_and_ssdlite_heads():
    model = models.fasterrcnn_mobilenet_v3_large_fpn(weights_backbone=None, trainable_backbone_layers=2)
    trainable = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}
    assert trainable == {str(i) for i in range(13, 17)}
    with pytest.raises(ValueError, match=r"\[0, 6\]"):
        models.fasterrcnn_mobilenet_v3_large_fpn(weights_backbone=None, trainable_backbone_layers=7)
    lite = models.ssdlite320_mobilenet_v3_large(weights_backbone=None)
    lite.replace_class_heads(5)
    assert lite.head.classification_head.module_list[0][1].out_channels == 6 * 5
    lite.eval()
    with torch.no_grad():
        out = lite([torch.rand(3, 100, 120)])
    assert ((out[0]["labels"] >= 1) & (out[0]["labels"] < 5)).all()
