"""R-CNN (fastdet.models.rcnn): warping through roi_align against crop + resize, the SVM hinge loss with hard negative
mining and the box-regression pairs against hand-computed values, the staged gradient paths, training, the detection
contract, empty inputs, input errors, and `fastdet train` / `eval` on the shapes data."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from cli_runner import train_then_evaluate

import fastdet.models as models
from fastdet.models.proposals import ProposalTable, SelectiveSearchProposals, pad_proposals, save_proposals
from fastdet.models.rcnn import RCNN, box_regression_loss, rcnn_resnet18, rcnn_resnet50, svm_hinge_loss, warp_boxes

NUM_CLASSES = 4  # background + 3 shapes


def tiny_model(**kwargs) -> RCNN:
    """A CPU-cheap R-CNN: 32 x 32 warps, a small fine-tuning sample, few proposals."""
    options = dict(num_classes=NUM_CLASSES, warp_size=32, batch_size_per_image=16, max_proposals_train=100,
                   max_proposals_test=40)
    options.update(kwargs)
    return rcnn_resnet18(**options)


def shapes_batch(seed: int = 0, size: int = 96):
    """Two images with flat-coloured rectangles on a noisy background (the shapes dataset's look), and targets."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(2):
        image = 0.1 * torch.rand(3, size, size - 8 * i, generator=generator) + 0.2
        boxes = torch.tensor([[8.0, 10.0, 40.0, 44.0], [50.0, 40.0, 84.0, 80.0]])[: 2 - i]
        labels = torch.tensor([1, 3])[: 2 - i]
        for box, colour in zip(boxes.long().tolist(), ([0.9, 0.1, 0.1], [0.1, 0.8, 0.2])):
            image[:, box[1]:box[3], box[0]:box[2]] = torch.tensor(colour)[:, None, None]
        images.append(image)
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets


# --------------------------------------------------------------------------------------------------------------------
# warping
# --------------------------------------------------------------------------------------------------------------------


def test_warp_equals_crops_resized():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 60, 80, generator=generator)
    size = 8
    # integer boxes at least `size` wide and tall: bilinear resizing of the crop never reads past its edges
    boxes = torch.tensor([[[4.0, 6.0, 20.0, 30.0], [10.0, 0.0, 42.0, 16.0]],
                          [[0.0, 0.0, 80.0, 60.0], [33.0, 21.0, 41.0, 59.0]]])
    warped = warp_boxes(images, boxes, size, context_padding=0.0, sampling_ratio=1)
    assert warped.shape == (4, 3, size, size)
    for b in range(2):
        for p in range(2):
            x1, y1, x2, y2 = boxes[b, p].long().tolist()
            crop = images[b:b + 1, :, y1:y2, x1:x2]
            expected = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
            torch.testing.assert_close(warped[b * 2 + p], expected, rtol=1e-5, atol=1e-5)


def test_context_padding_dilates_the_box_about_its_centre():
    images = torch.rand(1, 3, 50, 50, generator=torch.Generator().manual_seed(1))
    # S = 10 with p = 2.5: the box is dilated by 10 / (10 - 5) = 2, so (20, 20, 30, 30) becomes (15, 15, 35, 35)
    padded = warp_boxes(images, torch.tensor([[[20.0, 20.0, 30.0, 30.0]]]), 10, context_padding=2.5,
                        sampling_ratio=1)
    expected = F.interpolate(images[:, :, 15:35, 15:35], size=(10, 10), mode="bilinear", align_corners=False)
    torch.testing.assert_close(padded, expected, rtol=1e-5, atol=1e-5)


def test_context_outside_the_image_is_the_mean():
    model = tiny_model().eval()
    image = torch.full((3, 40, 40), 0.7)
    batch = model._batch([image])
    warped = model.warp(batch, torch.tensor([[[0.0, 0.0, 40.0, 40.0]]]))  # whole image: the padding is outside
    border = warped[0, :, 0, 0]  # the top-left output pixel lies outside the image: normalised 0 = the image mean
    assert torch.allclose(border, torch.zeros(3), atol=1e-6)
    centre = warped[0, :, 16, 16]
    assert torch.allclose(centre, batch[0, :, 20, 20], atol=1e-5)


# --------------------------------------------------------------------------------------------------------------------
# SVM hinge loss, hard negatives, box regression
# --------------------------------------------------------------------------------------------------------------------


def test_svm_hinge_loss_with_hard_negatives_by_hand():
    scores = torch.tensor([[2.0, -0.5], [0.5, -2.0], [-0.3, 0.8], [1.5, 0.2]], requires_grad=True)
    positive = torch.tensor([[True, False], [False, False], [False, True], [False, False]])
    negative = torch.tensor([[False, True], [True, True], [True, False], [True, False]])
    weight = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    loss, hard = svm_hinge_loss(scores, positive, negative, hard_negatives=1, weight=weight, l2=0.1)
    # class 0: positive 2.0 -> max(0, 1 - 2) = 0; hardest negative 1.5 (row 3) -> 2.5
    # class 1: positive 0.8 -> 0.2; hardest negative -0.5 (row 0) -> 0.5
    # (0 + 2.5 + 0.2 + 0.5) / 4 examples + 0.1 / 2 * (1 + 4 + 0 + 1)
    assert loss.item() == pytest.approx(3.2 / 4 + 0.3, abs=1e-6)
    assert hard.tolist() == [[False, True], [False, False], [False, False], [True, False]]
    loss.backward()
    expected_grad = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, -1.0], [1.0, 0.0]]) / 4
    torch.testing.assert_close(scores.grad, expected_grad)
    # every negative kept: class 0 adds 1.5 and 0.7, class 1 adds 0.0 (score -2 is past the margin)
    loss_all, hard_all = svm_hinge_loss(scores.detach(), positive, negative, hard_negatives=10)
    assert hard_all.tolist() == negative.tolist()
    assert loss_all.item() == pytest.approx((0 + 1.5 + 0.7 + 2.5 + 0.2 + 0.5 + 0.0) / 7, abs=1e-6)
    only_positives, _ = svm_hinge_loss(scores.detach(), positive, negative, hard_negatives=0)
    assert only_positives.item() == pytest.approx(0.2 / 2, abs=1e-6)


def test_box_regression_loss_by_hand():
    predictions = torch.tensor([[0.1, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    targets = torch.tensor([[0.3, -0.2, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]])
    weight = torch.full((4, 3), 0.5)
    loss = box_regression_loss(predictions, targets, torch.tensor([True, False]), weight, l2=0.2)
    assert loss.item() == pytest.approx((0.04 + 0.04 + 0.0 + 0.01) + 0.1 * 12 * 0.25, abs=1e-6)


def test_training_pairs_and_targets_are_the_papers():
    """With zeroed SVMs and regressors the losses expose the selection: every SVM example costs exactly 1, and the
    box loss is the mean squared norm of the paper's targets over the proposals with IoU > 0.6."""
    model = tiny_model(batch_size_per_image=64, svm_l2=0.0, bbox_reg_l2=0.0).train()
    for layer in (model.svm, model.bbox_pred):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))
    gt = torch.tensor([[12.0, 8.0, 36.0, 48.0]])
    proposals = torch.tensor([
        [10.0, 10.0, 30.0, 50.0],  # IoU 684 / 1076 = 0.64: a regression pair (and a fine-tuning positive)
        [12.0, 8.0, 36.0, 30.0],  # IoU 0.55: a fine-tuning positive, not a regression pair
        [50.0, 50.0, 60.0, 60.0],  # background
    ])
    losses = model([image], [{"boxes": gt, "labels": torch.tensor([2])}], proposals=[proposals])
    # paper's targets of proposal 0: P = (20, 30, 20, 40) centre/size, G = (24, 28, 24, 40)
    t = torch.tensor([(24 - 20) / 20, (28 - 30) / 40, math.log(24 / 20), math.log(40 / 40)])
    assert losses["loss_box_reg"].item() == pytest.approx(float(t.pow(2).sum()), rel=1e-5)
    assert losses["loss_svm"].item() == pytest.approx(1.0, abs=1e-6)  # zero margins: hinge 1 on every example
    assert set(losses) == {"loss_classifier", "loss_svm", "loss_box_reg"}


def test_svm_and_box_losses_do_not_reach_the_cnn():
    model = tiny_model().train()
    images, targets = shapes_batch()
    losses = model(images, targets)
    conv = model.backbone.conv1.weight
    (losses["loss_svm"] + losses["loss_box_reg"]).backward(retain_graph=True)
    assert conv.grad is None or torch.count_nonzero(conv.grad) == 0
    assert model.svm.weight.grad is not None and torch.count_nonzero(model.svm.weight.grad) > 0
    assert model.cls_score.weight.grad is None
    losses["loss_classifier"].backward()
    assert torch.count_nonzero(conv.grad) > 0


# --------------------------------------------------------------------------------------------------------------------
# training and detection
# --------------------------------------------------------------------------------------------------------------------


def test_train_steps_decrease_the_loss():
    torch.manual_seed(0)
    model = tiny_model().train()
    images, targets = shapes_batch()
    generator = SelectiveSearchProposals(max_proposals_train=60).train()
    proposals = [generator(image) for image in images]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(8):
        losses = model(images, targets, proposals=proposals)
        total = sum(losses.values())
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(total.item())
    assert sum(history[-2:]) / 2 < 0.8 * history[0], history


def test_detection_contract():
    model = tiny_model(detections_per_img=25, score_thresh=0.0).eval()
    images, _ = shapes_batch()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for image, output in zip(images, outputs):
        assert set(output) == {"boxes", "labels", "scores"}
        boxes, labels, scores = output["boxes"], output["labels"], output["scores"]
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert 0 < boxes.shape[0] <= 25 and boxes.shape == (labels.shape[0], 4) and scores.shape == labels.shape
        assert ((labels >= 1) & (labels < NUM_CLASSES)).all()
        assert ((scores >= 0) & (scores <= 1)).all() and (scores[:-1] >= scores[1:]).all()
        height, width = image.shape[-2:]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()


def test_detections_follow_the_svm_scores_and_nms_at_0_3():
    """Boxes are the proposals (zero regression), scores sigmoid of the SVM margins, suppression per class at 0.3."""
    model = tiny_model(score_thresh=0.0, num_classes=3).eval()
    torch.nn.init.zeros_(model.bbox_pred.weight)
    torch.nn.init.zeros_(model.bbox_pred.bias)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(3))
    proposals = torch.tensor([[0.0, 0.0, 32.0, 32.0], [0.0, 0.0, 32.0, 40.0], [30.0, 30.0, 60.0, 60.0]])
    with torch.no_grad():
        output = model([image], proposals=[proposals])[0]
        features = model.svm_features(model.backbone(model.warp(model._batch([image]), proposals[None])))
        margins = model.svm(features)  # [3, 2]
    # proposals 0 and 1 overlap with IoU 0.8 > 0.3: per class only the better one survives
    expected = []
    for c in range(2):
        keep = [2] + ([0] if margins[0, c] >= margins[1, c] else [1])
        expected += [(torch.sigmoid(margins[k, c]).item(), c + 1, k) for k in keep]
    expected.sort(key=lambda e: -e[0])
    assert output["labels"].tolist() == [e[1] for e in expected]
    torch.testing.assert_close(output["scores"], torch.tensor([e[0] for e in expected]))
    torch.testing.assert_close(output["boxes"], proposals[[e[2] for e in expected]])


def test_empty_targets_and_proposals():
    model = tiny_model().train()
    images, targets = shapes_batch()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(images, [empty, empty])
    assert all(torch.isfinite(v) for v in losses.values())
    ridge = 0.5 * model.bbox_reg_l2 * model.bbox_pred.weight.pow(2).sum()
    assert losses["loss_box_reg"].item() == pytest.approx(ridge.item())  # no pairs: only the ridge term
    none = torch.zeros(0, 4)
    losses = model(images, targets, proposals=[none, none])  # the ground truth is still warped
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        outputs = model(images, proposals=[none, torch.tensor([[0.0, 0.0, 30.0, 30.0]])])
    assert outputs[0]["boxes"].shape == (0, 4) and outputs[0]["labels"].shape == (0,)
    assert outputs[1]["boxes"].shape[0] <= NUM_CLASSES - 1  # one proposal, at most one detection per class


def test_inputs_are_not_modified():
    model = tiny_model()
    images, targets = shapes_batch()
    proposals = [torch.tensor([[5.0, 5.0, 40.0, 50.0], [1.0, 2.0, 30.0, 20.0]])] * 2
    saved = copy.deepcopy((images, targets, proposals))
    model.train()
    model(images, targets, proposals=proposals)
    model.eval()
    with torch.no_grad():
        model(images, proposals=proposals)
        model(images)
    for a, b in zip(images + proposals, saved[0] + saved[2]):
        assert torch.equal(a, b)
    for t, s in zip(targets, saved[1]):
        assert torch.equal(t["boxes"], s["boxes"]) and torch.equal(t["labels"], s["labels"])


def test_bad_inputs_raise_clear_errors():
    model = tiny_model().eval()
    images, targets = shapes_batch()
    with pytest.raises(ValueError, match=r"one Tensor\[K, 4\] per image"):
        model(images, proposals=[torch.zeros(1, 4)])
    with pytest.raises(ValueError, match=r"proposals\[1\] must have shape \[K, 4\]"):
        model(images, proposals=[torch.zeros(1, 4), torch.zeros(4)])
    with pytest.raises(TypeError, match=r"proposals\[0\] must be a floating-point"):
        model(images, proposals=[torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4)])
    with pytest.raises(ValueError, match=r"proposals\[1\] contains NaN"):
        model(images, proposals=[torch.zeros(1, 4), torch.tensor([[0.0, 0.0, float("nan"), 3.0]])])
    with pytest.raises(TypeError, match="proposals must be a list"):
        model(images, proposals=torch.zeros(2, 1, 4))
    model.train()
    with pytest.raises(ValueError, match="targets must be given"):
        model(images)
    bad = [dict(targets[0]), targets[1]]
    bad[0]["labels"] = torch.tensor([1, NUM_CLASSES])
    with pytest.raises(ValueError, match="out of range"):
        model(images, bad)
    with pytest.raises(ValueError, match="warp_size"):
        tiny_model(warp_size=0)
    with pytest.raises(ValueError, match="context_padding"):
        tiny_model(warp_size=8, context_padding=4.0)
    with pytest.raises(ValueError, match="num_classes"):
        rcnn_resnet18(num_classes=1)
    with pytest.raises(ValueError, match="max_proposals_test"):
        tiny_model(max_proposals_test=0)
    with pytest.raises(ValueError, match="mode"):
        tiny_model(proposal_mode="slow")
    with pytest.raises(ValueError, match="no published weights|is not"):
        rcnn_resnet18(weights="DEFAULT")


def test_proposal_generator_caps_and_rescales():
    images, _ = shapes_batch(size=96)
    generator = SelectiveSearchProposals(max_proposals_train=30, max_proposals_test=10, max_side=48)
    train = [generator.train()(image) for image in images]
    test = [generator.eval()(image) for image in images]
    for image, boxes, few in zip(images, train, test):
        assert boxes.shape[0] <= 30 and few.shape[0] <= 10 and torch.equal(few, boxes[: few.shape[0]])
        height, width = image.shape[-2:]
        assert (boxes[:, 2] <= width + 1e-4).all() and (boxes[:, 3] <= height + 1e-4).all()
    # the whole image is a region of the hierarchy: scaled back, it covers the full-size image
    whole = torch.tensor([0.0, 0.0, images[0].shape[-1], images[0].shape[-2]])
    assert (train[0] - whole).abs().amax(dim=1).min() < 1e-3
    boxes, valid = pad_proposals([torch.zeros(0, 4), torch.ones(2, 4)])
    assert boxes.shape == (2, 2, 4) and valid.tolist() == [[False, False], [True, True]]


def test_proposals_from_a_file_by_image_id(tmp_path):
    """R-CNN takes Fast R-CNN's proposal sources: a file (or mapping) of boxes per image id, looked up from
    ``image_ids=`` or the targets' ``"image_id"``, cut to the mode's cap like any other proposals."""
    images, targets = shapes_batch()
    table = {11: torch.tensor([[8.0, 10.0, 40.0, 44.0], [4.0, 4.0, 60.0, 60.0]]),
             12: torch.tensor([[50.0, 40.0, 84.0, 80.0]] * 50)}  # more than the test cap (40)
    save_proposals(tmp_path / "p.json", table)
    model = tiny_model(proposal_generator=str(tmp_path / "p.json"), score_thresh=0.0).eval()
    assert isinstance(model.proposal_generator, ProposalTable) and model.needs_image_ids
    assert not tiny_model().needs_image_ids
    with torch.no_grad():
        by_id = model(images, image_ids=[11, 12])
        given = model(images, proposals=[table[11], table[12][:40]])
    for a, b in zip(by_id, given):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert by_id[0]["boxes"].shape[0] > 0
    with pytest.raises(ValueError, match="image_ids"):
        model(images)
    with pytest.raises(KeyError, match="no proposals for image_id 13"):
        model(images, image_ids=[11, 13])
    model.train()
    losses = model(images, [dict(t, image_id=i) for t, i in zip(targets, (11, 12))])
    assert set(losses) == {"loss_classifier", "loss_svm", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(TypeError, match="proposal_generator"):
        tiny_model(proposal_generator=3)


def test_builders_weights_and_registration(tmp_path):
    assert "rcnn_resnet18" in models.DETECTOR_BUILDERS and "rcnn_resnet50" in models.DETECTOR_BUILDERS
    model = tiny_model(representation_size=128, trainable_backbone_layers=0)
    assert model.backbone.out_features == 128 and model.svm.in_features == 128
    frozen = [name for name, p in model.backbone.named_parameters() if not p.requires_grad]
    assert frozen and all(not name.startswith("fc") for name in frozen)  # the new fc layer trains
    assert model.svm.weight.requires_grad and model.bbox_pred.weight.shape == (4 * (NUM_CLASSES - 1), 128)
    path = tmp_path / "rcnn.pth"
    torch.save(model.state_dict(), path)
    restored = tiny_model(representation_size=128, weights=str(path), norm_layer="BatchNorm2d")
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key
    model.replace_class_heads(6)
    assert model.num_classes == 6 and model.svm.out_features == 5 and model.cls_score.out_features == 6
    big = rcnn_resnet50(num_classes=3)
    assert big.warp_size == 227 and big.context_padding == pytest.approx(16.0) and big.backbone.out_features == 2048


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def test_cli_trains_and_evaluates_on_shapes(tmp_path):
    from fastdet.data import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", num_images=10, image_size=(64, 64), seed=5, max_objects=2)
    model_args = ["warp_size=32", "batch_size_per_image=16", "max_proposals_train=60", "max_proposals_test=30"]
    _, result = train_then_evaluate(tmp_path, "rcnn_resnet18", model_args,
                                    ["--batch-size", "4", "--optimizer", "adamw", "--lr", "1e-3"])
    assert "IoU=0.50 " in result.stdout
