"""SPP-Net detector: backbone and pyramid shapes, the pooled features are roi_spp's, training (gradients reach the conv
layers through roi_spp), the detection contract, empty and bad input, and the CLI."""

from __future__ import annotations

import copy

import pytest
import torch
from cli_runner import run_fastdet as fastdet
from cli_runner import train_then_evaluate
from detection_asserts import sgd_training_losses
from detection_asserts import two_images_and_targets as images_and_targets

import fastdet.models as models
from fastdet.models import SPPNet, sppnet_resnet18, sppnet_resnet50
from fastdet.models.backbones.resnet import resnet_trunk_backbone
from fastdet.models.heads.roi_heads import SingleMapRoIPool
from fastdet.ops import RoISPP, roi_spp

SIZE = 128
SMALL = dict(min_size=SIZE, max_size=SIZE, max_proposals_train=100, max_proposals_test=100,
             box_batch_size_per_image=64)


def small_model(**kwargs):
    torch.manual_seed(0)
    return sppnet_resnet18(num_classes=3, **{**SMALL, **kwargs})


def test_backbone_pyramid_and_head_shapes():
    model = small_model()
    assert model.levels == (1, 2, 3, 6)  # the paper's ZF-5 pyramid: 50 bins
    assert model.backbone.out_channels == 256 and model.backbone.stride == 16
    assert not any(name.startswith("body.layer4") for name, _ in model.backbone.named_parameters())
    features = model.backbone(torch.rand(1, 3, SIZE, SIZE))
    assert list(features) == ["0"] and features["0"].shape == (1, 256, SIZE // 16, SIZE // 16)
    assert model.roi_heads.box_head.fc6.in_features == 256 * 50
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 12
    custom = small_model(levels=(1, 2, 4), representation_size=64)
    assert custom.levels == (1, 2, 4) and custom.roi_heads.box_head.fc6.in_features == 256 * 21
    assert custom.roi_heads.box_head.fc7.out_features == 64
    with torch.device("meta"):
        big = sppnet_resnet50(num_classes=3)
    assert big.backbone.out_channels == 1024 and big.roi_heads.box_head.fc6.in_features == 1024 * 50
    assert big.transform.min_size == (688,)


def test_pooled_features_are_roi_spp_of_the_feature_map():
    model = small_model().eval()
    features = {"0": torch.rand(2, 256, 8, 8)}
    rois = torch.tensor([[0.0, 4.0, 8.0, 60.0, 90.0], [1.0, 0.0, 0.0, 127.0, 95.0]])
    pooled = model.roi_heads.box_roi_pool(features, rois, [(128, 128), (96, 128)])
    assert torch.equal(pooled, roi_spp(features["0"], rois, (1, 2, 3, 6), 1 / 16))
    adapter = SingleMapRoIPool(RoISPP((2,), 0.5), featmap_name="c4")
    with pytest.raises(KeyError, match="c4"):
        adapter(features, rois, None)


def test_training_steps_lower_the_loss_and_reach_the_conv_layers():
    # trainable batch norm keeps the randomly initialised network's steps stable; proposals from selective search
    model = small_model(norm_layer="BatchNorm2d")
    images, targets = images_and_targets()

    def backbone_has_gradient(step):
        if step == 0:  # roi_spp's backward carries the gradient into the backbone
            grad = model.backbone.body.layer3[-1].conv2.weight.grad
            assert grad is not None and grad.abs().sum() > 0

    totals = sgd_training_losses(model, images, targets, 4, {"loss_classifier", "loss_box_reg"},
                                 after_backward=backbone_has_gradient)
    assert totals[-1] < 0.5 * totals[0], totals


def test_trainable_backbone_layers():
    frozen = small_model(trainable_backbone_layers=0)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())  # the paper: only FC layers fine-tuned
    two = small_model(trainable_backbone_layers=2)
    trainable = {n.split(".")[1] for n, p in two.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer3"}  # layer4 (counted first) is not part of the C4 trunk
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        small_model(trainable_backbone_layers=6)
    with pytest.raises(ValueError, match="last_stage"):
        resnet_trunk_backbone(18, last_stage=5)


def test_eval_output_format_with_the_default_selective_search():
    model = small_model(box_score_thresh=0.0).eval()
    images, _ = images_and_targets()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out, image in zip(outputs, images):
        assert set(out) == {"boxes", "labels", "scores"}
        n = out["boxes"].shape[0]
        assert 0 < n <= 100
        assert out["boxes"].shape == (n, 4) and out["labels"].shape == (n,) and out["scores"].shape == (n,)
        assert out["labels"].min() >= 1 and out["labels"].max() < 3
        assert (out["boxes"][:, 2] <= image.shape[2]).all() and (out["boxes"][:, 3] <= image.shape[1]).all()
        assert (out["scores"][:-1] >= out["scores"][1:]).all()


def test_empty_proposals_and_targets():
    model = small_model()
    images, targets = images_and_targets()
    model.train()
    losses = model(images, [torch.zeros(0, 4), torch.zeros(0, 4)], targets=targets)
    assert all(torch.isfinite(v) for v in losses.values())
    no_objects = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = model(images, [torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.zeros(0, 4)], targets=no_objects)
    assert losses["loss_box_reg"] == 0
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        outputs = model(images, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert all(o["boxes"].shape == (0, 4) for o in outputs)


def test_bad_input_and_inputs_not_modified():
    model = small_model().eval()
    images, targets = images_and_targets()
    good = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match=r"proposals\[0\] must have shape \[K, 4\]"):
        model(images, [torch.zeros(4), good])
    with pytest.raises(ValueError, match="got 3 for 2 images"):
        model(images, [good, good, good])
    with pytest.raises(ValueError, match="num_classes"):
        SPPNet(resnet_trunk_backbone(18), num_classes=1)
    with pytest.raises(ValueError, match="representation_size"):
        small_model(representation_size=0)
    with pytest.raises(TypeError, match="levels"):
        small_model(levels=(1.5, 2))
    with pytest.raises(ValueError, match="spatial_scale"):
        SPPNet(_NoStride(), num_classes=3)
    model.train()
    with pytest.raises(TypeError, match="targets by keyword"):
        model(images, targets)
    proposals = [torch.tensor([[1.0, 2.0, 300.0, 60.0]]), torch.tensor([[-5.0, 0.0, 40.0, 40.0]])]
    saved = copy.deepcopy((images, targets, proposals))
    model(images, proposals, targets=targets)
    for a, b in zip(images + proposals, saved[0] + saved[2]):
        assert torch.equal(a, b)
    for t, s in zip(targets, saved[1]):
        assert all(torch.equal(t[k], s[k]) for k in t)


class _NoStride(torch.nn.Module):
    out_channels = 8

    def forward(self, x):
        return x


def test_builders_are_registered():
    for name in ("sppnet_resnet18", "sppnet_resnet50"):
        assert name in models.DETECTOR_BUILDERS and getattr(models, name).__name__ == name


def test_cli_trains_evaluates_and_predicts_on_shapes(tmp_path):
    from fastdet.data import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", num_images=6, image_size=(96, 96), seed=5, max_objects=2)
    checkpoint, _ = train_then_evaluate(
        tmp_path, "sppnet_resnet18",
        ["min_size=96", "max_size=96", "max_proposals_train=100", "max_proposals_test=100"],
        ["--batch-size", "2", "--lr", "1e-3"])
    images = sorted((tmp_path / "data").rglob("*.png"))[:1]
    result = fastdet("predict", "--checkpoint", checkpoint, *images, "--output", tmp_path / "pred", "--no-draw",
                     "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "pred" / "predictions.json").is_file()


def test_soft_nms_method():
    model = small_model(nms_method="soft", box_score_thresh=0.0).eval()
    assert model.roi_heads.nms_method == "soft"
    images, _ = images_and_targets()
    proposals = [torch.tensor([[0.0, 0.0, 64.0, 64.0], [2.0, 2.0, 66.0, 66.0]]), torch.zeros(0, 4)]
    with torch.no_grad():
        soft = model(images, proposals)
    assert soft[0]["boxes"].shape[0] > 0 and soft[1]["boxes"].shape == (0, 4)
    with pytest.raises(ValueError, match="nms_method"):
        small_model(nms_method="fuzzy")
