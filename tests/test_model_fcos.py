"""FCOS: torchvision state-dict compatibility, detection parity, training targets and losses (centre sampling,
centerness, GIoU) equal to torchvision's, empty images, fine-tuning heads, bad input."""

from __future__ import annotations

import pytest
import torch

from detection_asserts import assert_same_detections, make_targets
from fastdet.models import backbones
from fastdet.models.fcos import FCOS, fcos_assign_targets, fcos_resnet50_fpn, linear_box_decode, linear_box_encode

tv_detection = pytest.importorskip("torchvision.models.detection")
# torchvision decides NMS on its per-category path, fastdet's semantics (see conftest.py).
pytestmark = pytest.mark.usefixtures("torchvision_per_category_nms")
from torchvision.models.detection import _utils as tv_utils  # noqa: E402

SMALL = dict(min_size=128, max_size=192)


def spread_scores(model, generator) -> None:
    """Random init scores every pair near sqrt(0.01 * 0.5) < 0.2: no detections. Spread the class logits, centerness
    and distances so that hundreds of pairs pass and the boxes differ."""
    head = model.head
    with torch.no_grad():
        cls = head.classification_head.cls_logits
        cls.weight.copy_(torch.randn(cls.weight.shape, generator=generator) * 0.03)
        cls.bias.copy_(torch.randn(cls.bias.shape, generator=generator) * 0.5 - 1.5)
        reg = head.regression_head.bbox_reg
        reg.weight.copy_(torch.randn(reg.weight.shape, generator=generator) * 0.05)
        reg.bias.fill_(1.0)
        ctr = head.regression_head.bbox_ctrness
        ctr.weight.copy_(torch.randn(ctr.weight.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    tv = tv_detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, **SMALL)
    spread_scores(tv, torch.Generator().manual_seed(0))
    ours = fcos_resnet50_fpn(weights_backbone=None, num_classes=91, **SMALL)
    ours.load_state_dict(tv.state_dict())  # strict
    return tv.eval(), ours.eval()


def test_state_dict_and_trainable_parameters_are_torchvisions(pair):
    tv, ours = pair
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in tv.named_parameters() if p.requires_grad]
    # torchvision's pretrained layout (frozen batch norm, 3 trainable stages) loads the same state dict.
    frozen = fcos_resnet50_fpn(weights_backbone=None, norm_layer="FrozenBatchNorm2d", trainable_backbone_layers=3)
    frozen.load_state_dict(tv.state_dict())
    assert isinstance(frozen.backbone.body.layer1[0].bn1, backbones.FrozenBatchNorm2d)


@pytest.mark.parametrize("score_thresh, detections_per_img, topk", [(0.2, 100, 1000), (0.3, 300, 50)])
def test_detections_match_torchvision(pair, seed, score_thresh, detections_per_img, topk):
    tv, ours = pair
    for model in (tv, ours):
        model.score_thresh, model.detections_per_img, model.topk_candidates = score_thresh, detections_per_img, topk
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 150, 200, generator=g), torch.rand(3, 220, 160, generator=g),
              torch.rand(3, 96, 128, generator=g)]
    with torch.no_grad():
        expected, actual = tv(images), ours(images)
    assert_same_detections(expected, actual, detections_per_img)


def test_linear_box_coding_matches_torchvision(seed):
    g = torch.Generator().manual_seed(seed)
    anchors = torch.rand(50, 2, generator=g) * 100
    anchors = torch.cat([anchors, anchors + torch.rand(50, 2, generator=g) * 30 + 1], dim=1)
    boxes = torch.rand(50, 2, generator=g) * 100
    boxes = torch.cat([boxes, boxes + torch.rand(50, 2, generator=g) * 60 + 1], dim=1)
    coder = tv_utils.BoxLinearCoder(normalize_by_size=True)
    codes = coder.encode(anchors, boxes)
    assert torch.equal(linear_box_encode(anchors, boxes), codes)
    assert torch.equal(linear_box_decode(codes, anchors), coder.decode(codes, anchors))


def _tv_matched_idxs(tv, targets, anchors, points_per_level):
    """torchvision's per-image assignment (its compute_loss' first half), called through a stub head."""
    captured = {}

    class Capture(torch.nn.Module):
        def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
            captured["matched"] = matched_idxs
            return {}

    head, tv.head = tv.head, Capture()
    try:
        tv.compute_loss(targets, {}, [anchors] * len(targets), points_per_level)
    finally:
        tv.head = head
    return torch.stack(captured["matched"])


def test_assignment_matches_torchvision(pair, seed):
    tv, _ = pair
    g = torch.Generator().manual_seed(seed)
    sizes = [(160, 192), (160, 192), (160, 192)]
    targets = make_targets(sizes, [12, 0, 5], 91, generator=g)
    # A point on a box edge and a box nested in another (the smaller one wins).
    targets[2]["boxes"][0] = torch.tensor([8.0, 8, 120, 120])
    targets[2]["boxes"][1] = torch.tensor([16.0, 16, 40, 40])
    feature_sizes = [(20, 24), (10, 12), (5, 6), (3, 3), (2, 2)]
    anchors = torch.cat([torch.stack(torch.meshgrid(torch.arange(w) * s, torch.arange(h) * s, indexing="xy"), -1)
                         .reshape(-1, 2).float() for (h, w), s in zip(feature_sizes, (8, 16, 32, 64, 128))])
    half = torch.cat([torch.full((h * w, 1), s / 2) for (h, w), s in zip(feature_sizes, (8, 16, 32, 64, 128))])
    anchors = torch.cat([anchors - half, anchors + half], dim=1)
    points = [h * w for h, w in feature_sizes]
    expected = _tv_matched_idxs(tv, targets, anchors, points)
    from fastdet.models.detection_utils import pad_targets

    padded = pad_targets(targets)
    actual = fcos_assign_targets(padded.boxes, padded.valid, anchors, points, tv.center_sampling_radius)
    assert torch.equal(actual, expected)
    assert (actual >= 0).sum() > 10 and (actual[1] == -1).all()


def test_losses_and_gradients_match_torchvision(seed):
    torch.manual_seed(seed)
    tv = tv_detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=7, **SMALL)
    spread_scores(tv, torch.Generator().manual_seed(seed))
    ours = fcos_resnet50_fpn(weights_backbone=None, num_classes=7, **SMALL)
    ours.load_state_dict(tv.state_dict())
    tv.train(), ours.train()
    g = torch.Generator().manual_seed(seed + 1)
    sizes = [(150, 200), (180, 140)]
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    targets = make_targets(sizes, [6, 3], 7, generator=g)
    expected = tv(images, [dict(t) for t in targets])
    actual = ours(images, [dict(t) for t in targets])
    assert set(actual) == set(expected) == {"classification", "bbox_regression", "bbox_ctrness"}
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    sum(expected.values()).backward()
    sum(actual.values()).backward()
    for name in ("head.classification_head.cls_logits.weight", "head.regression_head.bbox_reg.weight",
                 "head.regression_head.bbox_ctrness.weight", "head.regression_head.conv.0.weight",
                 "backbone.fpn.layer_blocks.0.0.weight"):
        torch.testing.assert_close(ours.get_parameter(name).grad, tv.get_parameter(name).grad, rtol=1e-4,
                                   atol=1e-6, msg=name)


def _light(num_classes=4):
    backbone = backbones.resnet_fpn_backbone(18, trainable_layers=5, returned_layers=[2, 3, 4], out_channels=32,
                                             extra_blocks=backbones.LastLevelP6P7(32, 32))
    from fastdet.models.fcos import FCOSHead

    head = FCOSHead(32, 1, num_classes, num_convs=2)
    head.classification_head.conv[1] = torch.nn.GroupNorm(8, 32)
    head.classification_head.conv[4] = torch.nn.GroupNorm(8, 32)
    head.regression_head.conv[1] = torch.nn.GroupNorm(8, 32)
    head.regression_head.conv[4] = torch.nn.GroupNorm(8, 32)
    return FCOS(backbone, num_classes, min_size=64, max_size=96, head=head)


def test_empty_images_train_as_background_and_steps_lower_the_loss():
    torch.manual_seed(0)
    model = _light().train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 70, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 12, 50, 60]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    losses = []
    for _ in range(5):
        loss = sum(model(images, targets).values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    out = model(images, empty)
    assert out["bbox_regression"] == 0 and out["bbox_ctrness"] == 0 and out["classification"] > 0


def test_replace_class_heads_and_bad_input():
    model = _light(num_classes=91)
    model.replace_class_heads(3)
    assert model.head.classification_head.cls_logits.out_channels == 3 and model.num_classes == 3
    model.eval()
    with torch.no_grad():
        detections = model([torch.rand(3, 64, 64)])
    assert ((detections[0]["labels"] >= 0) & (detections[0]["labels"] < 3)).all()
    model.train()
    with pytest.raises(ValueError, match="labels"):
        model([torch.rand(3, 64, 64)], [{"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match="one anchor per location"):
        FCOS(model.backbone, 3, anchor_generator=__import__("fastdet").ops.AnchorGenerator(((8, 16),), ((1.0,),)))
    with pytest.raises(ValueError, match="topk_candidates"):
        FCOS(model.backbone, 3, topk_candidates=0)
