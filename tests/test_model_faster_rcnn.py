"""Faster R-CNN: torchvision checkpoint compatibility and detection parity, training targets and losses, empty
targets, autocast, bad input, synchronisation-free selection under torch.compile, save/load, anchor configurations."""

from __future__ import annotations

import io

import pytest
import torch
from detection_asserts import detect_trimmed_and_fixed

from fastdet.models import backbones
from fastdet.models._validation import check_images_and_targets
from fastdet.models.detection_utils import BalancedPositiveNegativeSampler, Matcher, compact_mask, pad_targets
from fastdet.models.faster_rcnn import (
    FasterRCNN,
    fasterrcnn_resnet18_fpn,
    fasterrcnn_resnet50_fpn,
    paper_anchor_generator,
)
from fastdet.models.roi_heads import select_detections
from fastdet.models.rpn import select_proposals
from fastdet.ops import MultiScaleRoIAlign

tv_detection = pytest.importorskip("torchvision.models.detection")
# torchvision decides NMS on its per-category path, fastdet's semantics (see conftest.py).
pytestmark = pytest.mark.usefixtures("torchvision_per_category_nms")
from torchvision.models.detection import _utils as tv_utils  # noqa: E402
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone  # noqa: E402
from torchvision.ops import feature_pyramid_network as tv_fpn  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBatchNorm2d  # noqa: E402

SMALL = dict(min_size=96, max_size=160, rpn_post_nms_top_n_test=200)
TINY = dict(min_size=64, max_size=96, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
            rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_batch_size_per_image=64)


def _images(seed: int, sizes=((100, 160), (130, 110), (70, 70))):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def _targets():
    return [
        {"boxes": torch.tensor([[10.0, 20, 60, 80], [50, 50, 120, 110], [0, 0, 5, 7]]),
         "labels": torch.tensor([1, 3, 4])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
        {"boxes": torch.tensor([[30.0, 30, 80, 70]]), "labels": torch.tensor([2])},
    ]


def _tv_fasterrcnn(depth: int, num_classes: int, trainable_layers: int = 3, **kwargs):
    """torchvision's Faster R-CNN as its pretrained checkpoints are built (frozen batch norm), randomly initialised."""
    backbone = tv_resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, norm_layer=TVFrozenBatchNorm2d,
                                      trainable_layers=trainable_layers)
    return tv_detection.FasterRCNN(backbone, num_classes=num_classes, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# checkpoint compatibility and detection parity
# ---------------------------------------------------------------------------------------------------------------------


def test_state_dict_is_torchvisions():
    ours = fasterrcnn_resnet50_fpn(num_classes=91, norm_layer=backbones.FrozenBatchNorm2d, trainable_backbone_layers=3)
    theirs = _tv_fasterrcnn(50, 91)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert all(ours_sd[k].shape == theirs_sd[k].shape and ours_sd[k].dtype == theirs_sd[k].dtype for k in ours_sd)
    ours.load_state_dict(theirs_sd)  # strict
    # The builder with no weights at all uses trainable BatchNorm2d; its extra num_batches_tracked entries are ignored.
    plain = tv_detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    plain_sd = plain.state_dict()
    assert sorted(k for k in plain_sd if not k.endswith("num_batches_tracked")) == sorted(ours_sd)
    ours.load_state_dict(plain_sd)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in theirs.named_parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def resnet50_pair():
    torch.manual_seed(0)
    theirs = _tv_fasterrcnn(50, 91, **SMALL).eval()
    with torch.no_grad():
        # Spread the class scores over many classes (many detections, many labels), and shrink the RPN's random box
        # deltas (std ~1.6 at initialisation) so that fewer proposals collapse into slivers along the image border.
        theirs.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.02)
        theirs.rpn.head.bbox_pred.weight.mul_(0.2)
    ours = fasterrcnn_resnet50_fpn(num_classes=91, norm_layer="FrozenBatchNorm2d", **SMALL).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _canonical_order(detections):
    """Detections sorted by score (descending), then label and box: the same list whatever order the implementation
    gave to exactly tied scores. Torchvision's CPU batched_nms orders its output with an unstable sort once it has more
    than 4000 candidates, so tied detections (e.g. two slivers along the image border that pool identical features)
    may come in either order there; fastdet orders ties by candidate index."""
    order = torch.arange(len(detections["scores"]))
    keys = [detections["boxes"][:, j] for j in (3, 2, 1, 0)] + [detections["labels"].float()]
    for key in keys:
        order = order[torch.sort(key[order], stable=True).indices]
    order = order[torch.sort(detections["scores"][order], descending=True, stable=True).indices]
    return {k: v[order] for k, v in detections.items()}


def _assert_same_detections(ours, theirs, context):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a, b = _canonical_order(a), _canonical_order(b)
        assert a["boxes"].shape == b["boxes"].shape, f"image {i}, {context}"
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3, msg=f"image {i}, {context}")
        assert torch.equal(a["labels"], b["labels"]), f"image {i}, {context}"
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-4, msg=f"image {i}, {context}")


@pytest.mark.parametrize("rpn_score_thresh, box_score_thresh, detections_per_img", [
    (0.0, 0.01, 300),  # hundreds of detections per image, NMS and the top-k cut active
    (0.6, 0.3, 100),  # few proposals survive and few detections: padded slots must not leak into the results
])
def test_detections_match_torchvision(resnet50_pair, rpn_score_thresh, box_score_thresh, detections_per_img, seed):
    ours, theirs = resnet50_pair
    for model in (ours, theirs):
        model.rpn.score_thresh = rpn_score_thresh
        model.roi_heads.score_thresh = box_score_thresh
        model.roi_heads.detections_per_img = detections_per_img
    images = _images(seed)
    with torch.no_grad():
        expected = theirs(images)
        got = ours(images)
    _assert_same_detections(got, expected, f"seed={seed}")
    if box_score_thresh == 0.01:
        assert all(len(d["boxes"]) >= 100 for d in got) and len(torch.cat([d["labels"] for d in got]).unique()) > 5


def test_single_feature_map_with_nine_anchors_matches_torchvision(seed):
    """The paper's configuration: 3 sizes x 3 ratios on one feature map (ResNet-18 C4, stride 16)."""
    torch.manual_seed(seed)

    def build(anchor_generator, roi_pool, cls):
        body = backbones.IntermediateLayers(backbones.resnet(18), {"layer3": "0"})
        body.out_channels = 256
        return cls(body, num_classes=5, rpn_anchor_generator=anchor_generator, box_roi_pool=roi_pool, **TINY,
                   box_score_thresh=0.0)

    ours = build(paper_anchor_generator(), MultiScaleRoIAlign(["0"], 7, 2), FasterRCNN)
    theirs = build(tv_detection.anchor_utils.AnchorGenerator(((128, 256, 512),), ((0.5, 1.0, 2.0),)),
                   tv_detection.faster_rcnn.MultiScaleRoIAlign(["0"], 7, 2), tv_detection.FasterRCNN)
    assert ours.rpn.head.cls_logits.out_channels == 9
    ours.load_state_dict(theirs.state_dict())
    images = _images(seed, ((60, 90), (80, 64)))
    with torch.no_grad():
        _assert_same_detections(ours.eval()(images), theirs.eval()(images), f"seed={seed}")
    losses = ours.train()(images, _targets()[:2])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


# ---------------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------------


def test_training_losses_and_gradients_match_torchvision_with_exhaustive_sampling(seed):
    """With sampling budgets larger than every candidate set, both samplers take everything, so the losses (anchor and
    proposal matching, low-quality matches, regression targets, normalisation) must agree with torchvision's."""
    torch.manual_seed(seed)
    kwargs = {**TINY, "rpn_batch_size_per_image": 10**6, "box_batch_size_per_image": 10**6}
    theirs = _tv_fasterrcnn(18, 5, trainable_layers=5, **kwargs).train()
    ours = fasterrcnn_resnet18_fpn(num_classes=5, **kwargs).train()
    ours.load_state_dict(theirs.state_dict())
    images, targets = _images(seed)[:2], _targets()[:2]  # one image with objects, one without
    got, expected = ours(images, targets), theirs(images, targets)
    assert set(got) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=f"{key}, seed={seed}")
    sum(got.values()).backward()
    sum(expected.values()).backward()
    our_params = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(our_params[name].grad, p.grad, rtol=1e-3, atol=1e-3 * float(p.grad.abs().max()),
                                       msg=lambda m, name=name: f"{name}, seed={seed}: {m}")


def test_light_variant_sgd_reduces_the_loss():
    torch.manual_seed(0)
    model = fasterrcnn_resnet18_fpn(num_classes=5, **{**TINY, "min_size": 48, "max_size": 64}).train()
    images, targets = _images(0)[:2], _targets()[:2]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    totals = []
    for _ in range(3):
        losses = model(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(float(total.detach()))
    assert totals[-1] < 0.6 * totals[0], totals


def test_images_without_objects_train():
    torch.manual_seed(0)
    model = fasterrcnn_resnet18_fpn(num_classes=5, **TINY).train()
    images = _images(1)[:2]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    losses = model(images, empty)
    values = {k: float(v.detach()) for k, v in losses.items()}
    assert values["loss_box_reg"] == 0 and values["loss_rpn_box_reg"] == 0, values
    assert values["loss_classifier"] > 0 and values["loss_objectness"] > 0, values
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_bfloat16_autocast_training_and_inference():
    torch.manual_seed(0)
    model = fasterrcnn_resnet18_fpn(num_classes=5, **{**TINY, "min_size": 48, "max_size": 64}).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(_images(2)[:1], _targets()[:1])
        sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            detections = model(_images(3)[2:])
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    for d in detections:
        assert d["boxes"].dtype == torch.float32 and torch.isfinite(d["boxes"]).all()
        assert d["scores"].shape == d["labels"].shape == d["boxes"].shape[:1]


# ---------------------------------------------------------------------------------------------------------------------
# pieces: backbone, matcher, sampler
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth, returned_layers, p6p7_in",
                         [(18, None, None), (50, [2, 3, 4], 2048), (34, [2, 3, 4], 256)])
def test_backbone_matches_torchvision(depth, returned_layers, p6p7_in):
    ours = backbones.resnet_fpn_backbone(depth, returned_layers=returned_layers,
                                         extra_blocks=backbones.LastLevelP6P7(p6p7_in, 256) if p6p7_in else None)
    theirs = tv_resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, norm_layer=TVFrozenBatchNorm2d,
                                    returned_layers=returned_layers,
                                    extra_blocks=tv_fpn.LastLevelP6P7(p6p7_in, 256) if p6p7_in else None)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("allow_low_quality", [False, True])
def test_matcher_matches_torchvision(allow_low_quality, seed):
    g = torch.Generator().manual_seed(seed)
    # quantised IoUs create ties between ground-truth boxes and exact hits of both thresholds
    iou = (torch.rand(3, 6, 50, generator=g) * 10).floor() / 10
    iou[1, :, :7] = 0.0  # ground truth overlapping nothing
    valid = torch.tensor([[True] * 6, [True] * 4 + [False] * 2, [False] * 6])
    got = Matcher(0.7, 0.3, allow_low_quality)(iou, valid)
    reference = tv_utils.Matcher(0.7, 0.3, allow_low_quality)
    for b in range(2):
        assert torch.equal(got[b], reference(iou[b, valid[b]])), f"image {b}, seed={seed}"
    assert torch.all(got[2] == -1)  # no ground truth: all background


def test_sampler_draws_torchvisions_counts(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(-1, 3, (4, 300), generator=g)
    labels[1] = torch.where(labels[1] > 0, 0, labels[1])  # no positives
    labels[2, :] = 1  # only positives
    pos, neg = BalancedPositiveNegativeSampler(64, 0.25)(labels, generator=g)
    assert not (pos & neg).any() and torch.all(labels[pos] >= 1) and torch.all(labels[neg] == 0)
    n_pos, n_neg = (labels >= 1).sum(1), (labels == 0).sum(1)
    expected_pos = n_pos.clamp(max=16)
    assert torch.equal(pos.sum(1), expected_pos)
    assert torch.equal(neg.sum(1), torch.minimum(n_neg, 64 - expected_pos))


def test_pad_targets_and_compact_mask():
    padded = pad_targets(_targets())
    assert padded.boxes.shape == (3, 3, 4) and padded.valid.sum(1).tolist() == [3, 0, 1]
    assert pad_targets([_targets()[1]]).boxes.shape == (1, 1, 4)  # G >= 1 even when everything is empty
    mask = torch.tensor([[False, True, False, True], [False, False, False, False]])
    index, valid = compact_mask(mask, 3)
    assert index.tolist() == [[1, 3, 0], [0, 1, 2]] and valid.tolist() == [[True, True, False], [False] * 3]


# ---------------------------------------------------------------------------------------------------------------------
# synchronisation-free selection, padded output, persistence
# ---------------------------------------------------------------------------------------------------------------------


def test_selection_compiles_without_graph_breaks(seed):
    """fullgraph=True fails on any graph break, and a host read (.item(), nonzero, data-dependent shapes) is one: so
    proposal filtering and detection selection are synchronisation-free."""
    g = torch.Generator().manual_seed(seed)
    B, levels = 2, [300, 150, 50]
    N = sum(levels)
    objectness, deltas = torch.randn(B, N, generator=g), torch.randn(B, N, 4, generator=g) * 0.2
    xy = torch.rand(N, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + torch.rand(N, 2, generator=g) * 40 + 1], 1)
    sizes = torch.tensor([[100.0, 120.0], [90.0, 128.0]])
    args = (objectness, deltas, anchors, levels, sizes, 100, 80, 0.7, 0.3)
    eager = select_proposals(*args)
    compiled = torch.compile(select_proposals, fullgraph=True, backend="aot_eager")(*args)
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))
    P, C = 80, 6
    det_args = (torch.randn(B * P, C, generator=g) * 3, torch.randn(B * P, 4 * C, generator=g), eager.boxes,
                eager.valid, sizes, 0.05, 0.5, 30)
    eager_det = select_detections(*det_args)
    compiled_det = torch.compile(select_detections, fullgraph=True, backend="aot_eager")(*det_args)
    assert all(torch.equal(a, b) for a, b in zip(eager_det, compiled_det))
    assert eager_det.boxes.shape == (B, 30, 4) and torch.all(eager_det.labels[eager_det.labels >= 0] >= 1)


def test_detect_padded_output_agrees_with_forward_and_survives_save_load():
    torch.manual_seed(0)
    model = fasterrcnn_resnet18_fpn(num_classes=5, **TINY, box_score_thresh=0.0).eval()
    images = _images(4)[1:]
    with torch.no_grad():
        padded = model.detect(images)
        listed = model(images)
    for i, d in enumerate(listed):
        n = int(padded.num_detections[i])
        assert torch.equal(d["boxes"], padded.boxes[i, :n]) and torch.all(padded.labels[i, n:] == -1)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = fasterrcnn_resnet18_fpn(num_classes=5, **TINY, box_score_thresh=0.0).eval()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        again = restored(images)
    assert len(listed[0]["boxes"]) > 0
    for a, b in zip(listed, again):
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "labels", "scores"))


def test_eager_cpu_inference_skips_padding_slots(monkeypatch):
    """Eager CPU inference runs the box head on the slots some image fills (an RPN keeping fewer proposals than
    post_nms_top_n leaves the rest padding), with the detections of the fixed-size path that CUDA and torch.compile
    take."""
    torch.manual_seed(0)
    model = fasterrcnn_resnet18_fpn(num_classes=5, **{**TINY, "rpn_post_nms_top_n_test": 400},
                                    box_score_thresh=0.0).eval()
    images = _images(4)[1:]
    trimmed, fixed, rows = detect_trimmed_and_fixed(model, images, model.roi_heads.box_head, monkeypatch)
    assert rows[1] == len(images) * 400 and len(images) <= rows[0] < rows[1]
    assert int(trimmed.num_detections.min()) > 0
    for a, b in zip(trimmed, fixed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert torch.equal(trimmed.labels, fixed.labels)


# ---------------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------------


def _target(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


BAD_INPUTS = [
    ([torch.rand(3, 32, 32), torch.rand(32, 32)], None, ValueError, r"images\[1\] must have shape \[C, H, W\]"),
    ([torch.rand(1, 32, 32)], None, ValueError, r"images\[0\] must have 3 channels"),
    ([torch.zeros(3, 32, 32, dtype=torch.uint8)], None, TypeError, r"images\[0\] must be a floating-point"),
    (torch.rand(2, 3, 32, 32), None, TypeError, "images must be a list"),
    ([], None, ValueError, "at least one image"),
    ([torch.rand(3, 32, 32)] * 2, [_target([[1, 1, 5, 5]], [1])], ValueError, "1 targets for 2 images"),
    ([torch.rand(3, 32, 32)], None, ValueError, "targets must be given in training mode"),
    ([torch.rand(3, 32, 32)] * 2, [_target([[1, 1, 5, 5]], [1]), _target([[4, 1, 4, 5]], [1])], ValueError,
     r"targets\[1\]\['boxes'\]\[0\].*degenerate"),
    ([torch.rand(3, 32, 32)], [_target([[1, 1, 5, 5], [0, 0, 3, 3]], [1, 5])], ValueError,
     r"targets\[0\]\['labels'\]\[1\] = 5 is out of range.*\[1, 5\)"),
    ([torch.rand(3, 32, 32)], [_target([[1, 1, 5, 5]], [0])], ValueError, r"labels'\]\[0\] = 0 is out of range"),
    ([torch.rand(3, 32, 32)], [_target([[1, 1, 5, float("nan")]], [1])], ValueError, "NaN or infinite"),
    ([torch.rand(3, 32, 32)], [{"boxes": torch.zeros(0, 4)}], ValueError, "missing the key 'labels'"),
    ([torch.rand(3, 32, 32)], [{"boxes": torch.zeros(2, 5), "labels": torch.zeros(2, dtype=torch.int64)}],
     ValueError, r"\['boxes'\] must have shape \[N, 4\]"),
    ([torch.rand(3, 32, 32)], [{"boxes": torch.zeros(1, 4, dtype=torch.int64) + torch.tensor([0, 0, 1, 1]),
                                "labels": torch.ones(1, dtype=torch.int64)}], TypeError, "floating-point"),
    ([torch.rand(3, 32, 32)], [_target([[1, 1, 5, 5]], [1]) | {"labels": torch.tensor([1.0])}], TypeError,
     "integer tensor"),
    ([torch.rand(3, 32, 32)], [_target([[1, 1, 5, 5]], [1, 2])], ValueError, r"labels'\] must have shape \[N\]"),
]


@pytest.mark.parametrize("images, targets, error, message", BAD_INPUTS)
def test_bad_input_is_rejected_with_a_clear_error(images, targets, error, message):
    with pytest.raises(error, match=message):
        check_images_and_targets(images, targets, True, 5, min_label=1)


def test_model_rejects_bad_input_and_leaves_inputs_untouched():
    torch.manual_seed(0)
    model = fasterrcnn_resnet18_fpn(num_classes=5, **TINY).train()
    images, targets = BAD_INPUTS[8][:2]
    with pytest.raises(ValueError, match="out of range"):
        model(images, targets)
    with pytest.raises(ValueError, match="targets must be given"):
        model([torch.rand(3, 32, 32)])
    good_targets = _targets()
    before = [{k: v.clone() for k, v in t.items()} for t in good_targets]
    model(_images(5), good_targets)
    for a, b in zip(good_targets, before):
        assert all(torch.equal(a[k], b[k]) for k in b)
    with pytest.raises(ValueError, match="num_classes"):
        FasterRCNN(backbones.resnet_fpn_backbone(18), num_classes=1)
