"""Mask R-CNN: torchvision checkpoint compatibility (v1 and v2, strict), detections and masks equal to torchvision's,
training losses (incl. the mask loss) and gradients equal to torchvision's with exhaustive sampling, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from detection_asserts import detect_trimmed_and_fixed

from fastdet.models import maskrcnn_resnet18_fpn, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from fastdet.models.mask_rcnn import MaskRCNN, mask_loss

tv_detection = pytest.importorskip("torchvision.models.detection")
# torchvision decides NMS on its per-category path, fastdet's semantics (see conftest.py).
pytestmark = pytest.mark.usefixtures("torchvision_per_category_nms")
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d as TVFrozenBatchNorm2d  # noqa: E402

SMALL = dict(min_size=96, max_size=160, rpn_post_nms_top_n_test=200)
TINY = dict(min_size=64, max_size=96, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
            rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_batch_size_per_image=64)


def _images(seed: int, sizes=((100, 160), (130, 110))):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def _box_mask(box, height, width):
    """A filled ellipse inside ``box``: an instance mask that does not fill its box."""
    ys = torch.arange(height, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float32)[None, :] + 0.5
    x1, y1, x2, y2 = box.tolist()
    cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, max((x2 - x1) / 2, 0.5), max((y2 - y1) / 2, 0.5)
    return (((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1).to(torch.uint8)


def _targets(images):
    specs = [
        (torch.tensor([[10.0, 20, 60, 80], [50, 50, 120, 95], [0, 0, 9, 7]]), torch.tensor([1, 3, 4])),
        (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)),
        (torch.tensor([[30.0, 30, 80, 70]]), torch.tensor([2])),
    ]
    targets = []
    for image, (boxes, labels) in zip(images, specs):
        h, w = image.shape[-2:]
        masks = (torch.stack([_box_mask(b, h, w) for b in boxes]) if len(boxes)
                 else torch.zeros(0, h, w, dtype=torch.uint8))
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return targets


def _tv_maskrcnn(depth: int, num_classes: int, trainable_layers: int = 3, **kwargs):
    backbone = tv_resnet_fpn_backbone(backbone_name=f"resnet{depth}", weights=None, norm_layer=TVFrozenBatchNorm2d,
                                      trainable_layers=trainable_layers)
    return tv_detection.MaskRCNN(backbone, num_classes=num_classes, **kwargs)


def _spread(model):
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.02)
        model.rpn.head.bbox_pred.weight.mul_(0.2)
    return model


def _assert_same(ours, theirs, context):
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert set(a) == set(b) == {"boxes", "labels", "scores", "masks"}
        assert a["boxes"].shape == b["boxes"].shape and len(a["boxes"]) > 20, f"image {i}, {context}"
        # exact ties aside (none with spread scores), the order is torchvision's
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3, msg=f"image {i}, {context}")
        assert torch.equal(a["labels"], b["labels"]), f"image {i}, {context}"
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-4, msg=f"image {i}, {context}")
        assert a["masks"].shape == b["masks"].shape and a["masks"].dtype == b["masks"].dtype
        # mask probabilities in the original image; a box moved by an ulp may shift a pasted pixel's taps
        torch.testing.assert_close(a["masks"], b["masks"], rtol=0, atol=1e-3, msg=f"image {i}, {context}")
        assert (a["masks"] - b["masks"]).abs().mean() < 1e-5


@pytest.mark.parametrize("builder, tv_builder", [(maskrcnn_resnet50_fpn, "maskrcnn_resnet50_fpn"),
                                                 (maskrcnn_resnet50_fpn_v2, "maskrcnn_resnet50_fpn_v2")],
                         ids=["v1", "v2"])
def test_loads_torchvision_state_dict_and_matches_its_detections_and_masks(builder, tv_builder, seed):
    torch.manual_seed(seed)
    theirs = _spread(getattr(tv_detection, tv_builder)(weights=None, weights_backbone=None, num_classes=91,
                                                       **SMALL)).eval()
    ours = builder(num_classes=91, **SMALL).eval()
    theirs_sd = theirs.state_dict()
    assert list(ours.state_dict()) == [k for k in theirs_sd if not k.endswith("num_batches_tracked")] or \
        list(ours.state_dict()) == list(theirs_sd)
    ours.load_state_dict(theirs_sd)  # strict
    images = _images(seed)
    with torch.no_grad():
        _assert_same(ours(images), theirs(images), f"{tv_builder} seed={seed}")


def test_pretrained_layout_state_dict_is_torchvisions():
    """The frozen-batch-norm layout of torchvision's COCO checkpoint: same keys in the same order, same shapes."""
    ours = maskrcnn_resnet50_fpn(num_classes=91, norm_layer="FrozenBatchNorm2d")
    theirs = _tv_maskrcnn(50, 91)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)
    assert [n for n in ours_sd if "mask" in n][:3] == ["roi_heads.mask_head.0.0.weight", "roi_heads.mask_head.0.0.bias",
                                                       "roi_heads.mask_head.1.0.weight"]


def test_training_losses_and_gradients_match_torchvision_with_exhaustive_sampling(seed):
    """Sampling budgets larger than every candidate set make both samplers take everything, so every loss (the mask
    loss's positive proposals, matched masks, projected targets and normalisation included) must agree."""
    torch.manual_seed(seed)
    kwargs = {**TINY, "rpn_batch_size_per_image": 10**6, "box_batch_size_per_image": 10**6}
    theirs = _tv_maskrcnn(18, 5, trainable_layers=5, **kwargs).train()
    ours = maskrcnn_resnet18_fpn(num_classes=5, **kwargs).train()
    ours.load_state_dict(theirs.state_dict())
    images = _images(seed, ((100, 160), (130, 110), (70, 90)))
    targets = _targets(images)
    got, expected = ours(images, targets), theirs(images, targets)
    assert set(got) == set(expected) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg",
                                         "loss_mask"}
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=f"{key}, seed={seed}")
    sum(got.values()).backward()
    sum(expected.values()).backward()
    our_params = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        if p.grad is not None and "mask" in name:
            torch.testing.assert_close(our_params[name].grad, p.grad, rtol=1e-3, atol=1e-3 * float(p.grad.abs().max()),
                                       msg=lambda m, name=name: f"{name}, seed={seed}: {m}")


def test_sampled_training_runs_and_sgd_reduces_the_loss():
    torch.manual_seed(0)
    model = maskrcnn_resnet18_fpn(num_classes=5, **{**TINY, "min_size": 48, "max_size": 64}).train()
    images = _images(0, ((100, 160), (130, 110)))
    targets = _targets(images)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.005, momentum=0.9)
    totals = []
    for _ in range(4):
        losses = model(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        totals.append(float(total.detach()))
    assert all(map(math.isfinite, totals)) and totals[-1] < totals[0], totals


def test_mask_loss_rules():
    logits = torch.randn(4, 3, 5, 5, requires_grad=True)
    targets = torch.rand(4, 5, 5).round()
    labels = torch.tensor([2, 1, 0, -1])
    valid = torch.tensor([True, True, False, False])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[[0, 1], [2, 1]], targets[:2])
    torch.testing.assert_close(mask_loss(logits, labels, targets, valid), expected)
    none = mask_loss(logits, labels, targets, torch.zeros(4, dtype=torch.bool))
    assert float(none) == 0.0
    none.backward()
    assert logits.grad is not None and not logits.grad.any()


def test_images_without_objects_train_and_empty_detections_have_empty_masks():
    torch.manual_seed(0)
    model = maskrcnn_resnet18_fpn(num_classes=3, **TINY).train()
    images = _images(1, ((64, 80),))
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 64, 80, dtype=torch.uint8)}]
    losses = model(images, empty)
    assert float(losses["loss_mask"]) == 0.0
    sum(losses.values()).backward()
    model.eval()
    model.roi_heads.score_thresh = 1.1  # nothing survives
    with torch.no_grad():
        (result,) = model(images)
    assert result["masks"].shape == (0, 1, 64, 80)


def test_eager_cpu_inference_runs_the_mask_head_on_the_detections_only(monkeypatch):
    """Eager CPU inference: the mask head sees the slots some image's detections fill, not all detections_per_img;
    masks equal the fixed-size path's (CUDA, torch.compile) on those slots and are zero on the padding."""
    torch.manual_seed(0)
    model = maskrcnn_resnet18_fpn(num_classes=5, **TINY, box_detections_per_img=60).eval()
    _spread(model)
    images = _images(3)
    with torch.no_grad():
        scores = model.detect(images).scores
    # a threshold that leaves some detections but not all 60 slots of either image
    model.roi_heads.score_thresh = float(scores[:, 20].max())
    trimmed, fixed, rows = detect_trimmed_and_fixed(model, images, model.roi_heads.mask_head, monkeypatch)
    counts = trimmed.num_detections.tolist()
    assert 0 < min(counts) and max(counts) < 60, counts
    assert rows == [len(images) * max(counts), len(images) * 60]
    assert torch.equal(trimmed.labels, fixed.labels) and torch.equal(trimmed.num_detections, fixed.num_detections)
    for i, n in enumerate(counts):
        torch.testing.assert_close(trimmed.masks[i, :n], fixed.masks[i, :n], rtol=0, atol=1e-6)
        assert not trimmed.masks[i, n:].any()


@pytest.mark.parametrize("masks, error, match", [
    (None, ValueError, "needs 'masks'"),
    (torch.zeros(2, 64, 80, dtype=torch.uint8), ValueError, r"\[N, H, W\] = \[1, 64, 80\]"),
    (torch.zeros(1, 60, 80, dtype=torch.uint8), ValueError, "the image's size"),
    (torch.zeros(1, 64, 80), TypeError, "uint8 or bool"),
])
def test_bad_target_masks_are_rejected(masks, error, match):
    model = maskrcnn_resnet18_fpn(num_classes=3, **TINY).train()
    target = {"boxes": torch.tensor([[1.0, 2, 30, 40]]), "labels": torch.tensor([1])}
    if masks is not None:
        target["masks"] = masks
    with pytest.raises(error, match=match):
        model(_images(0, ((64, 80),)), [target])


def test_replace_class_heads_and_constructor_rules():
    model = maskrcnn_resnet18_fpn(num_classes=5, **TINY)
    model.replace_class_heads(3)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    with pytest.raises(ValueError, match="num_classes must be None"):
        MaskRCNN(model.backbone, num_classes=3, mask_predictor=model.roi_heads.mask_predictor)


# ---------------------------------------------------------------------------------------------------------------------
# the builders' weights API (fastdet.models.weights), as the other builders
# ---------------------------------------------------------------------------------------------------------------------


def test_builders_follow_the_weights_api(tmp_path, monkeypatch):
    import hashlib
    import time

    from fastdet.models import FrozenBatchNorm2d
    from fastdet.models import weights as W

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(W.DOWNLOAD_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("a download was attempted")))
    for builder, enum in ((maskrcnn_resnet50_fpn, "MaskRCNN_ResNet50_FPN_Weights"),
                          (maskrcnn_resnet50_fpn_v2, "MaskRCNN_ResNet50_FPN_V2_Weights")):
        start = time.perf_counter()
        with pytest.raises(W.WeightsNotFoundError) as info:
            builder(weights="DEFAULT")
        assert time.perf_counter() - start < 5
        entry = W.WEIGHTS[enum]["COCO_V1"]
        assert entry.file in str(info.value) and entry.url in str(info.value)
    # a cached COCO checkpoint (hash-named as torchvision's) loads with torchvision's conventions
    torch.manual_seed(0)
    state = maskrcnn_resnet50_fpn(num_classes=91, norm_layer="FrozenBatchNorm2d", **TINY).state_dict()
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    staged = hub / "staged.pth"
    torch.save(state, staged)
    real = W.WEIGHTS["MaskRCNN_ResNet50_FPN_Weights"]["DEFAULT"]
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()[:8]
    fake = W.Weights(real.enum, real.name, f"fake-{digest}.pth", real.num_classes, real.frozen_bn_eps, real.dataset,
                     real._categories)
    staged.rename(hub / fake.file)
    monkeypatch.setitem(W.WEIGHTS, "MaskRCNN_ResNet50_FPN_Weights", {real.name: fake, "DEFAULT": fake})
    model = maskrcnn_resnet50_fpn(weights="COCO_V1", **TINY)
    assert model.num_classes == 91
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and all(m.eps == 0.0 for m in frozen)  # torchvision's eps override for this checkpoint
    with pytest.raises(ValueError, match="replace_class_heads"):
        maskrcnn_resnet50_fpn(weights="DEFAULT", num_classes=5)
    # a state dict and a path work as weights too; defaults without weights are torchvision's (91 classes)
    torch.save(state, tmp_path / "m.pth")
    assert maskrcnn_resnet50_fpn(weights=str(tmp_path / "m.pth"), **TINY).num_classes == 91
    assert maskrcnn_resnet50_fpn(weights=state, **TINY).roi_heads.mask_predictor.mask_fcn_logits.out_channels == 91
    assert maskrcnn_resnet50_fpn().num_classes == 91
