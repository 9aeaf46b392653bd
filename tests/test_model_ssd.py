"""SSD: parity with torchvision (heads, VGG-16 state dict, losses, detections), batched matching and hard negative
mining, sync-free selection under torch.compile, training (empty targets, bfloat16 autocast), bad input, save/load."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from fastdet.models.ssd import (
    SSD,
    SSDHead,
    VGG16SSDFeatures,
    match_default_boxes,
    ssd300_vgg16,
    ssd300_vgg16_light,
    ssd_select_detections,
)

from detection_asserts import (
    assert_losses_and_gradients_match,
    assert_same_detections,
    make_targets,
    random_boxes,
)

tv_detection = pytest.importorskip("torchvision.models.detection")
# torchvision decides NMS on its per-category path, fastdet's semantics (see conftest.py).
pytestmark = pytest.mark.usefixtures("torchvision_per_category_nms")
from torchvision.models.detection import _utils as tv_det_utils  # noqa: E402
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator as TvDefaultBoxGenerator  # noqa: E402
from torchvision.ops import batched_nms as tv_batched_nms  # noqa: E402
from torchvision.ops import box_iou as tv_box_iou  # noqa: E402
from torchvision.ops import clip_boxes_to_image as tv_clip  # noqa: E402


def tv_ssd_with_backbone(backbone: nn.Module, num_classes: int, **kwargs):
    """torchvision's SSD class around a given backbone, with SSD300's default boxes and normalisation."""
    anchors = TvDefaultBoxGenerator([[2], [2, 3], [2, 3], [2, 3], [2], [2]],
                                    scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05], steps=[8, 16, 32, 64, 100, 300])
    return tv_detection.ssd.SSD(backbone, anchors, (300, 300), num_classes, image_mean=[0.48235, 0.45882, 0.40784],
                            image_std=[1.0 / 255.0] * 3, **kwargs)


@pytest.fixture(scope="module")
def vgg16_pair():
    torch.manual_seed(0)
    tv = tv_detection.ssd300_vgg16(weights=None, weights_backbone=None, num_classes=91)
    ours = ssd300_vgg16(num_classes=91, weights_backbone=None)
    ours.load_state_dict(tv.state_dict())
    return tv.eval(), ours.eval()


# --------------------------------------------------------------------------------------------------------------------
# parity with torchvision
# --------------------------------------------------------------------------------------------------------------------


def test_head_matches_torchvision(seed):
    torch.manual_seed(seed)
    channels, anchors = [16, 32, 8], [4, 6, 4]
    tv_head = tv_detection.ssd.SSDHead(channels, anchors, 5)
    head = SSDHead(channels, anchors, 5)
    assert [(k, v.shape) for k, v in head.state_dict().items()] == \
        [(k, v.shape) for k, v in tv_head.state_dict().items()]
    head.load_state_dict(tv_head.state_dict())
    features = [torch.randn(2, c, s, s + 1) for c, s in zip(channels, (10, 5, 1))]
    expected, actual = tv_head(features), head(features)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_state_dict_and_backbone_match_torchvision(vgg16_pair):
    tv, ours = vgg16_pair
    tv_state, state = tv.state_dict(), ours.state_dict()
    assert list(state) == list(tv_state)
    assert all(state[k].shape == tv_state[k].shape for k in tv_state)
    image = torch.rand(1, 3, 300, 300)
    with torch.no_grad():
        expected, actual = tv.backbone(image), ours.backbone(image)
    assert [v.shape[-1] for v in actual.values()] == [38, 19, 10, 5, 3, 1]
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_eval_matches_torchvision(vgg16_pair):
    tv, ours = vgg16_pair
    torch.manual_seed(1)
    images = [torch.rand(3, 150, 200), torch.rand(3, 220, 160)]
    with torch.no_grad():
        expected, actual = tv(images), ours(images)
    assert_same_detections(expected, actual, ours.detections_per_img)
    for det in actual:
        assert det["labels"].min() >= 1 and det["labels"].dtype == torch.int64


def test_losses_and_gradients_match_torchvision(seed):
    torch.manual_seed(seed)
    ours = ssd300_vgg16_light(num_classes=6)
    tv = tv_ssd_with_backbone(copy.deepcopy(ours.backbone), 6)
    ours.load_state_dict(tv.state_dict())
    sizes = [(150, 200), (120, 160), (100, 100)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    targets = make_targets(sizes, [5, 0, 2], 6, first_label=1)
    targets[0]["boxes"][1] = targets[0]["boxes"][0]  # two boxes claim the same best default box
    assert_losses_and_gradients_match(ours, tv, images, targets,
                                      ("head.classification_head.module_list.0.weight",
                                       "head.regression_head.module_list.3.weight", "backbone.extra.1.2.weight"),
                                      grad_atol=1e-6)


def test_match_default_boxes_matches_torchvision(seed):
    generator = torch.Generator().manual_seed(seed)
    default_boxes = random_boxes(400, 100, 100, generator)
    counts = [6, 0, 1, 3]
    gt = [random_boxes(n, 100, 100, generator) for n in counts]
    gt[0][3] = gt[0][1]  # identical boxes: the later one wins the shared default box
    padded = nn.utils.rnn.pad_sequence(gt, batch_first=True)
    valid = torch.arange(padded.shape[1]) < torch.tensor(counts)[:, None]
    matched = match_default_boxes(padded, valid, default_boxes, 0.5)
    matcher = tv_det_utils.SSDMatcher(0.5)
    for i, boxes in enumerate(gt):
        expected = torch.full((400,), -1) if len(boxes) == 0 else matcher(tv_box_iou(boxes, default_boxes))
        assert torch.equal(matched[i], expected), i


# --------------------------------------------------------------------------------------------------------------------
# detection selection
# --------------------------------------------------------------------------------------------------------------------


def reference_selection(cls_logits, bbox_regression, default_boxes, image_sizes, score_thresh, topk, nms_thresh,
                        limit):
    """torchvision's per-image SSD post-processing with stable sorts (ties by box index)."""
    coder = tv_det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
    results = []
    for image in range(cls_logits.shape[0]):
        scores = torch.softmax(cls_logits[image], dim=-1)
        decoded = tv_clip(coder.decode_single(bbox_regression[image], default_boxes),
                          tuple(int(v) for v in image_sizes[image].tolist()))
        boxes, kept_scores, labels = [], [], []
        for label in range(1, scores.shape[1]):
            passing = torch.where(scores[:, label] > score_thresh)[0]
            order = scores[passing, label].sort(descending=True, stable=True).indices[:topk]
            boxes.append(decoded[passing[order]])
            kept_scores.append(scores[passing[order], label])
            labels.append(torch.full((len(order),), label))
        boxes, kept_scores, labels = torch.cat(boxes), torch.cat(kept_scores), torch.cat(labels)
        assert len(boxes) < 1000  # torchvision's batched_nms stays on its stable path
        keep = tv_batched_nms(boxes, kept_scores, labels, nms_thresh)[:limit]
        results.append({"boxes": boxes[keep], "scores": kept_scores[keep], "labels": labels[keep]})
    return results


def selection_inputs(seed, batch=2, num_boxes=150, num_classes=4):
    generator = torch.Generator().manual_seed(seed)
    # Quantised logits: exact ties within a class (the cross-class order of ties is where torchvision's own order is
    # undefined, so each class gets a distinct offset).
    logits = (torch.randn(batch, num_boxes, num_classes, generator=generator) * 1.5).mul(2).round().div(2)
    logits = logits + torch.arange(num_classes) * 1e-3
    deltas = torch.randn(batch, num_boxes, 4, generator=generator)
    corner = torch.rand(num_boxes, 2, generator=generator) * 60
    default_boxes = torch.cat([corner, corner + torch.rand(num_boxes, 2, generator=generator) * 30 + 2], dim=1)
    return logits, deltas, default_boxes, torch.tensor([[64.0, 64.0], [50.0, 60.0]][:batch])


def test_selection_matches_reference_including_ties(seed):
    args = selection_inputs(seed)
    config = (0.2, 25, 0.45, 50)  # small top-k: the per-class cut falls inside tie groups
    boxes, scores, labels, num = ssd_select_detections(*args, *config)
    expected = reference_selection(*args, *config)
    assert boxes.shape == (2, 50, 4)
    for i, e in enumerate(expected):
        n = int(num[i])
        assert n == len(e["scores"]) > 0, f"seed {seed}"
        assert torch.equal(labels[i, :n], e["labels"]) and torch.equal(scores[i, :n], e["scores"])
        torch.testing.assert_close(boxes[i, :n], e["boxes"], atol=1e-4, rtol=0)
        assert (labels[i, n:] == -1).all() and (scores[i, n:] == 0).all()


def test_selection_compiles_without_graph_breaks(seed):
    args = selection_inputs(seed)
    compiled = torch.compile(ssd_select_detections, fullgraph=True, backend="aot_eager")
    expected = ssd_select_detections(*args, 0.2, 25, 0.45, 50)
    actual = compiled(*args, 0.2, 25, 0.45, 50)
    for e, a in zip(expected, actual):
        assert torch.equal(e, a)


# --------------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------------


def squares_batch():
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for boxes, labels in (([[20, 30, 120, 130], [150, 120, 260, 250]], [1, 2]), ([[60, 60, 200, 180]], [3])):
        image = torch.rand(3, 280, 280, generator=generator) * 0.2
        for (x1, y1, x2, y2), label in zip(boxes, labels):
            image[label - 1, y1:y2, x1:x2] = 1.0
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = ssd300_vgg16_light(num_classes=4).train()
    images, targets = squares_batch()
    # Random VGG weights give large logits (a first loss near 100): a small step size keeps SGD stable.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_empty_targets_train():
    torch.manual_seed(0)
    model = ssd300_vgg16_light(num_classes=4).train()
    images = [torch.rand(3, 100, 120), torch.rand(3, 128, 90)]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    losses = model(images, empty)
    # No positives means no mined negatives either (torchvision's rule): both losses are exactly zero.
    assert losses["bbox_regression"].item() == 0.0 and losses["classification"].item() == 0.0
    sum(losses.values()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    mixed = [empty[0], {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    losses = model(images, mixed)
    assert losses["bbox_regression"].item() > 0 and losses["classification"].item() > 0


def test_bfloat16_autocast_training_and_inference():
    torch.manual_seed(0)
    model = ssd300_vgg16_light(num_classes=4)
    images, targets = squares_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(model.head.regression_head.module_list[0].weight.grad).all()
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model(images)
    for det in detections:
        assert det["boxes"].dtype == torch.float32 and len(det["boxes"]) > 0
        assert ((det["boxes"] >= 0) & (det["boxes"] <= 280)).all()


def test_inputs_are_not_modified():
    model = ssd300_vgg16_light(num_classes=4).train()
    images, targets = squares_batch()
    images_before, targets_before = copy.deepcopy(images), copy.deepcopy(targets)
    model(images, targets)
    for a, b in zip(images, images_before):
        assert torch.equal(a, b)
    for a, b in zip(targets, targets_before):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


def test_trainable_backbone_layers_freeze_vgg_stages():
    def frozen(model):
        return {name for name, p in model.backbone.named_parameters() if not p.requires_grad}

    assert frozen(ssd300_vgg16_light(trainable_backbone_layers=5)) == set()
    # Stage 1 is conv1_1, conv1_2 (features.0, features.2).
    assert frozen(ssd300_vgg16_light(trainable_backbone_layers=4)) == {
        "features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias"}
    # With 0, every VGG convolution is frozen, conv5_x (extra.0.1/3/5) included; fc6/fc7 and the extras train.
    none_trainable = frozen(ssd300_vgg16_light(trainable_backbone_layers=0))
    assert {"extra.0.5.weight", "features.21.weight"} <= none_trainable
    assert not any(name.startswith(("extra.0.7", "extra.1", "scale_weight")) for name in none_trainable)


# --------------------------------------------------------------------------------------------------------------------
# bad input, save/load
# --------------------------------------------------------------------------------------------------------------------


def test_bad_input_errors():
    model = ssd300_vgg16_light(num_classes=4).train()
    images, targets = squares_batch()
    with pytest.raises(TypeError, match="images"):
        model(torch.stack(images), targets)
    with pytest.raises(ValueError, match="targets"):
        model(images)
    background = copy.deepcopy(targets)
    background[0]["labels"][0] = 0  # label 0 is the background class
    with pytest.raises(ValueError, match="labels"):
        model(images, background)
    too_large = copy.deepcopy(targets)
    too_large[1]["labels"][0] = 4
    with pytest.raises(ValueError, match="labels"):
        model(images, too_large)
    with pytest.raises(ValueError, match="size"):
        ssd300_vgg16_light(size=(256, 256))
    with pytest.raises(ValueError, match="width"):
        VGG16SSDFeatures(width=0)
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        ssd300_vgg16_light(trainable_backbone_layers=6)
    with pytest.raises(TypeError, match="anchor_generator"):
        SSD(model.backbone, object(), (300, 300), 4)
    with pytest.raises(ValueError, match="num_classes"):
        SSD(model.backbone, model.anchor_generator, (300, 300), 1)


def test_save_and_load_roundtrip():
    torch.manual_seed(0)
    model = ssd300_vgg16_light(num_classes=4).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = ssd300_vgg16_light(num_classes=4)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    restored.eval()
    images, _ = squares_batch()
    with torch.no_grad():
        a, b = model(images), restored(images)
    assert len(a[0]["boxes"]) > 0
    for x, y in zip(a, b):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(x[key], y[key])
