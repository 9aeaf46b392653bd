"""RetinaNet: parity with torchvision (heads, state dicts, losses, detections), batched matching, sync-free selection
under torch.compile, training (including empty targets and bfloat16 autocast), bad input, save/load."""

from __future__ import annotations

import copy
import io
from functools import partial

import pytest
import torch
from torch import nn

from fastdet.models.retinanet import (
    RetinaNet,
    RetinaNetHead,
    match_anchors,
    retinanet_resnet18_fpn,
    retinanet_resnet50_fpn,
    retinanet_select_detections,
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
import torchvision  # noqa: E402
from torchvision.models.detection.backbone_utils import BackboneWithFPN as TvBackboneWithFPN  # noqa: E402
from torchvision.ops import batched_nms as tv_batched_nms  # noqa: E402
from torchvision.ops import clip_boxes_to_image as tv_clip  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelP6P7 as TvLastLevelP6P7  # noqa: E402

SMALL = dict(min_size=128, max_size=192)


def perturb_for_detections(model: nn.Module) -> None:
    """Random init scores every anchor at the prior 0.01 (nothing passes 0.05) and predicts near-zero deltas: spread
    the logits and deltas so that thousands of pairs pass and the boxes differ."""
    with torch.no_grad():
        model.head.classification_head.cls_logits.weight.mul_(5)
        model.head.classification_head.cls_logits.bias.normal_(-2.5, 0.5)
        model.head.regression_head.bbox_reg.weight.mul_(3)


@pytest.fixture(scope="module")
def resnet50_pair():
    torch.manual_seed(0)
    tv = tv_detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91, **SMALL)
    perturb_for_detections(tv)
    ours = retinanet_resnet50_fpn(num_classes=91, norm_layer=nn.BatchNorm2d, **SMALL)
    ours.load_state_dict(tv.state_dict())
    return tv.eval(), ours.eval()


def tv_resnet18_retinanet(num_classes, **kwargs):
    body = torchvision.models.resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    backbone = TvBackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], 128,
                                 extra_blocks=TvLastLevelP6P7(128, 128))
    return tv_detection.RetinaNet(backbone, num_classes, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# parity with torchvision
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [None, "group"])
def test_head_matches_torchvision(seed, norm):
    torch.manual_seed(seed)
    norm_layer = partial(nn.GroupNorm, 8) if norm else None
    tv_head = tv_detection.retinanet.RetinaNetHead(32, 9, 7, norm_layer=norm_layer)
    head = RetinaNetHead(32, 9, 7, norm_layer=norm_layer)
    assert [(k, v.shape) for k, v in head.state_dict().items()] == \
        [(k, v.shape) for k, v in tv_head.state_dict().items()]
    head.load_state_dict(tv_head.state_dict())
    features = [torch.randn(2, 32, s, s + 3) for s in (16, 8, 4)]
    expected, actual = tv_head(features), head(features)
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)


def test_head_loads_version1_checkpoint():
    # torchvision's published RetinaNet weights predate the nested conv.{i}.0 names (version 1: conv.0, conv.2, ...).
    tv_head = tv_detection.retinanet.RetinaNetHead(16, 9, 3)
    v1 = {}
    for key, value in tv_head.state_dict().items():
        for i in range(4):
            key = key.replace(f"conv.{i}.0.", f"conv.{2 * i}.")
        v1[key] = value
    assert "classification_head.conv.6.weight" in v1
    head = RetinaNetHead(16, 9, 3)
    head.load_state_dict(v1)  # a plain dict carries no version metadata, as an old checkpoint file
    for key, value in tv_head.state_dict().items():
        assert torch.equal(head.state_dict()[key], value), key


def test_state_dict_matches_torchvision(resnet50_pair):
    tv, ours = resnet50_pair
    tv_state, state = tv.state_dict(), ours.state_dict()
    assert list(state) == list(tv_state)
    assert all(state[k].shape == tv_state[k].shape for k in tv_state)
    # torchvision's pretrained layout (FrozenBatchNorm2d) loads the same state dict unchanged.
    frozen = retinanet_resnet50_fpn(num_classes=91, norm_layer="FrozenBatchNorm2d", **SMALL)
    assert set(frozen.state_dict()) == {k for k in tv_state if not k.endswith("num_batches_tracked")}
    frozen.load_state_dict(tv_state)


def test_eval_matches_torchvision(resnet50_pair):
    tv, ours = resnet50_pair
    torch.manual_seed(1)
    images = [torch.rand(3, 150, 200), torch.rand(3, 220, 160), torch.rand(3, 96, 128)]
    with torch.no_grad():
        expected, actual = tv(images), ours(images)
    assert_same_detections(expected, actual, ours.detections_per_img)
    for det in actual:
        assert det["labels"].dtype == torch.int64 and det["boxes"].dtype == torch.float32


@pytest.mark.parametrize("loss_type", ["l1", "giou"])
def test_losses_and_gradients_match_torchvision(seed, loss_type):
    torch.manual_seed(seed)
    tv = tv_resnet18_retinanet(5, min_size=96, max_size=128)
    tv.head.regression_head._loss_type = loss_type
    ours = retinanet_resnet18_fpn(num_classes=5, trainable_backbone_layers=5, norm_layer=nn.BatchNorm2d,
                                  bbox_loss_type=loss_type, min_size=96, max_size=128)
    ours.load_state_dict(tv.state_dict())
    sizes = [(150, 200), (120, 160), (100, 100)]
    images = [torch.rand(3, h, w) for h, w in sizes]
    targets = make_targets(sizes, [4, 0, 2], 5)
    targets[0]["boxes"][1] = targets[0]["boxes"][0]  # two boxes on the same spot compete for the same anchors
    assert_losses_and_gradients_match(ours, tv, images, targets,
                                      ("head.classification_head.cls_logits.weight",
                                       "head.regression_head.bbox_reg.weight", "backbone.fpn.layer_blocks.0.0.weight"),
                                      grad_atol=1e-7)


def test_match_anchors_matches_torchvision_matcher(seed):
    generator = torch.Generator().manual_seed(seed)
    anchors = random_boxes(300, 100, 100, generator)
    counts = [5, 0, 1, 3]
    gt = [random_boxes(n, 100, 100, generator) for n in counts]
    gt[0][2] = anchors[7]  # an exact hit
    padded = nn.utils.rnn.pad_sequence(gt, batch_first=True)
    valid = torch.arange(padded.shape[1]) < torch.tensor(counts)[:, None]
    matched = match_anchors(padded, valid, anchors, 0.5, 0.4, allow_low_quality_matches=True)
    matcher = tv_det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    for i, boxes in enumerate(gt):
        if len(boxes) == 0:
            expected = torch.full((300,), -1)
        else:
            expected = matcher(tv_detection.retinanet.box_ops.box_iou(boxes, anchors))
        assert torch.equal(matched[i], expected), i


# --------------------------------------------------------------------------------------------------------------------
# detection selection
# --------------------------------------------------------------------------------------------------------------------


def reference_selection(cls_logits, bbox_regression, anchors, image_sizes, score_thresh, topk, nms_thresh, limit):
    """torchvision's per-image RetinaNet post-processing with every tie broken by position (stable sorts)."""
    coder = tv_det_utils.BoxCoder((1.0, 1.0, 1.0, 1.0))
    results = []
    for image in range(cls_logits[0].shape[0]):
        boxes, scores, labels = [], [], []
        for logits_l, deltas_l, anchors_l in zip(cls_logits, bbox_regression, anchors):
            num_classes = logits_l.shape[-1]
            flat = logits_l[image].sigmoid().flatten()
            passing = torch.where(flat > score_thresh)[0]
            order = flat[passing].sort(descending=True, stable=True).indices[:topk]
            pairs = passing[order]
            anchor_idx = pairs // num_classes
            decoded = coder.decode_single(deltas_l[image][anchor_idx], anchors_l[anchor_idx])
            boxes.append(tv_clip(decoded, tuple(int(v) for v in image_sizes[image].tolist())))
            scores.append(flat[pairs])
            labels.append(pairs % num_classes)
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        assert len(boxes) < 1000  # keeps torchvision's batched_nms on its stable path (ties by index)
        keep = tv_batched_nms(boxes, scores, labels, nms_thresh)[:limit]
        results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return results


def selection_inputs(seed, batch=2, num_classes=4):
    generator = torch.Generator().manual_seed(seed)
    grids = [(8, 8), (4, 4), (2, 2)]
    # Logits quantised to a coarse grid: many exact score ties, within and across levels and classes.
    cls_logits = [(torch.randn(batch, h * w * 9, num_classes, generator=generator) * 1.5 - 1.5).mul(4).round().div(4)
                  for h, w in grids]
    deltas = [torch.randn(batch, h * w * 9, 4, generator=generator) * 0.3 for h, w in grids]
    anchors = []
    for h, w in grids:
        corner = torch.rand(h * w * 9, 2, generator=generator) * 60
        anchors.append(torch.cat([corner, corner + torch.rand(h * w * 9, 2, generator=generator) * 30 + 2], dim=1))
    image_sizes = torch.tensor([[64.0, 64.0], [50.0, 60.0]][:batch])
    return cls_logits, deltas, anchors, image_sizes


def test_selection_matches_reference_including_ties(seed):
    args = selection_inputs(seed)
    config = (0.05, 60, 0.5, 80)  # small top-k: the per-level cut falls inside tie groups
    boxes, scores, labels, num = retinanet_select_detections(*args, *config)
    expected = reference_selection(*args, *config)
    assert boxes.shape == (2, 80, 4) and scores.shape == (2, 80) and labels.shape == (2, 80)
    for i, e in enumerate(expected):
        n = int(num[i])
        assert n == len(e["scores"]), f"seed {seed}"
        assert torch.equal(labels[i, :n], e["labels"]) and torch.equal(scores[i, :n], e["scores"])
        torch.testing.assert_close(boxes[i, :n], e["boxes"], atol=1e-4, rtol=0)
        assert (labels[i, n:] == -1).all() and (scores[i, n:] == 0).all() and (boxes[i, n:] == 0).all()


def test_selection_compiles_without_graph_breaks(seed):
    # fullgraph=True fails on any graph break, e.g. a host synchronisation (.item(), .tolist(), data-dependent shape).
    args = selection_inputs(seed)
    compiled = torch.compile(retinanet_select_detections, fullgraph=True, backend="aot_eager")
    expected = retinanet_select_detections(*args, 0.05, 60, 0.5, 80)
    actual = compiled(*args, 0.05, 60, 0.5, 80)
    for e, a in zip(expected, actual):
        assert torch.equal(e, a)


# --------------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------------


def light_model(num_classes=3, **kwargs):
    return retinanet_resnet18_fpn(num_classes=num_classes, trainable_backbone_layers=5, fpn_channels=32,
                                  min_size=64, max_size=64, **kwargs)


def squares_batch():
    """Two images with bright squares on dark noise: boxes that a few steps can start to fit."""
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for boxes, labels in (([[10, 20, 60, 70], [70, 60, 120, 120]], [1, 2]), ([[30, 30, 100, 90]], [0])):
        image = torch.rand(3, 128, 128, generator=generator) * 0.2
        for (x1, y1, x2, y2), label in zip(boxes, labels):
            image[label, y1:y2, x1:x2] = 1.0
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = light_model().train()
    images, targets = squares_batch()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.97 * losses[0], losses


def test_empty_targets_train():
    torch.manual_seed(0)
    model = light_model().train()
    images = [torch.rand(3, 100, 120), torch.rand(3, 128, 90)]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    losses = model(images, empty)
    assert losses["bbox_regression"].item() == 0.0
    assert losses["classification"].item() > 0  # every anchor is a background example
    sum(losses.values()).backward()
    grad = model.head.classification_head.cls_logits.bias.grad
    assert torch.isfinite(grad).all() and (grad > 0).all()  # pushes every logit towards "no object"
    # A batch mixing an empty image with a non-empty one trains too.
    mixed = [empty[0], {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    losses = model(images, mixed)
    assert losses["bbox_regression"].item() > 0 and torch.isfinite(sum(losses.values()))


def test_bfloat16_autocast_training_and_inference():
    torch.manual_seed(0)
    model = light_model()
    images, targets = squares_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(model.head.regression_head.bbox_reg.weight.grad).all()
    perturb_for_detections(model)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        detections = model(images)
    with torch.no_grad():
        reference = model(images)
    for det, ref in zip(detections, reference):
        assert det["boxes"].dtype == torch.float32 and len(det["boxes"]) > 0
        assert ((det["boxes"] >= 0) & (det["boxes"] <= 128)).all()
        # bfloat16 features change the scores a little; the strongest detections stay close.
        assert abs(float(det["scores"][0]) - float(ref["scores"][0])) < 0.05


def test_inputs_are_not_modified():
    model = light_model().train()
    images, targets = squares_batch()
    images_before, targets_before = copy.deepcopy(images), copy.deepcopy(targets)
    model(images, targets)
    for a, b in zip(images, images_before):
        assert torch.equal(a, b)
    for a, b in zip(targets, targets_before):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])


# --------------------------------------------------------------------------------------------------------------------
# bad input, save/load
# --------------------------------------------------------------------------------------------------------------------


def test_bad_input_errors():
    model = light_model().train()
    images, targets = squares_batch()
    with pytest.raises(TypeError, match="images"):
        model(torch.stack(images), targets)
    with pytest.raises(ValueError, match="targets"):
        model(images)
    bad_label = copy.deepcopy(targets)
    bad_label[0]["labels"][0] = 3  # num_classes = 3
    with pytest.raises(ValueError, match="labels"):
        model(images, bad_label)
    degenerate = copy.deepcopy(targets)
    degenerate[1]["boxes"][0, 2] = degenerate[1]["boxes"][0, 0]
    with pytest.raises(ValueError, match="degenerate"):
        model(images, degenerate)
    with pytest.raises(ValueError, match="images"):
        model([torch.rand(128, 128)], targets[:1])
    backbone = model.backbone
    with pytest.raises(ValueError, match="bbox_loss_type"):
        RetinaNet(backbone, 3, bbox_loss_type="l2")
    with pytest.raises(ValueError, match="num_classes"):
        RetinaNet(backbone, 0)
    with pytest.raises(TypeError, match="anchor_generator"):
        RetinaNet(backbone, 3, anchor_generator=object())
    with pytest.raises(ValueError, match="bg_iou_thresh"):
        RetinaNet(backbone, 3, fg_iou_thresh=0.3, bg_iou_thresh=0.4)
    with pytest.raises(ValueError, match="out_channels"):
        RetinaNet(nn.Identity(), 3)
    with pytest.raises(ValueError, match="levels"):
        retinanet_select_detections([], [], [], torch.zeros(1, 2))


def test_save_and_load_roundtrip():
    torch.manual_seed(0)
    model = light_model()
    perturb_for_detections(model)
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = light_model()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    restored.eval()
    images, _ = squares_batch()
    with torch.no_grad():
        a, b = model(images), restored(images)
    assert len(a[0]["boxes"]) > 0
    for x, y in zip(a, b):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(x[key], y[key])
