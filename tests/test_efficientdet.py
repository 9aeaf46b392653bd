"""EfficientDet D0-D7: the compound-scaling table and parameter counts, the EfficientNet backbone against torchvision's,
BiFPN fusion weights, shapes, training (including empty targets), the detection contract with soft and hard NMS,
torch.compile of the new parts, weights handling, and `fastdet train`/`eval` on the shapes data."""

import copy

import pytest
import torch
from cli_runner import train_then_evaluate
from torch import nn

import fastdet.models as models
from fastdet import ops
from fastdet.models.necks.bifpn import BiFPN, FastNormalizedFusion
from fastdet.models.efficientdet import (
    EFFICIENTDET_CONFIGS,
    EfficientDet,
    EfficientDetHead,
    efficientdet_anchor_generator,
    efficientdet_d0,
)
from fastdet.models.backbones.efficientnet import efficientnet, efficientnet_features

SIZE = 128  # the smallest useful input: batches are padded to multiples of 128 (P7's stride)

# The paper's Table 2 parameter counts (millions, COCO: 90 classes).
PAPER_PARAMS_M = {"d0": 3.9, "d1": 6.6, "d2": 8.1, "d3": 12.0, "d4": 20.7, "d5": 33.7, "d6": 51.9, "d7": 51.9}


def small_model(num_classes=3, **kwargs):
    return efficientdet_d0(num_classes=num_classes, image_size=SIZE, **kwargs)


def squares_batch():
    """Two 128 x 128 images with bright squares on dark noise, label = the lit channel."""
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for boxes, labels in (([[10, 20, 60, 70], [70, 60, 120, 120]], [1, 2]), ([[30, 30, 100, 90]], [0])):
        image = torch.rand(3, SIZE, SIZE, generator=generator) * 0.2
        for (x1, y1, x2, y2), label in zip(boxes, labels):
            image[label, y1:y2, x1:x2] = 1.0
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


def perturb_for_detections(model):
    """Fresh heads score every anchor at the prior 0.01 (below the 0.05 threshold) and predict near-zero deltas:
    spread the logits and deltas so that many (anchor, class) pairs pass and boxes differ."""
    with torch.no_grad():
        model.head.class_net.predictor.pointwise.weight.mul_(20)
        model.head.class_net.predictor.pointwise.bias.normal_(-2.0, 0.5)
        model.head.box_net.predictor.pointwise.weight.mul_(5)


# --------------------------------------------------------------------------------------------------------------------
# architecture
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(EFFICIENTDET_CONFIGS))
def test_parameter_counts_match_the_paper(variant):
    builder = getattr(models, f"efficientdet_{variant}")
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = builder(num_classes=90)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(count / PAPER_PARAMS_M[variant] - 1) < 0.02, (variant, count)


def test_d0_multiply_adds_match_the_paper():
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = efficientdet_d0(num_classes=90).eval()
        x = torch.empty(1, 3, 512, 512)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            features = model.backbone(x)
            outputs = model.head(list(features.values()))
    assert outputs["cls_logits"].shape == (1, 49104, 90)  # the reference's anchor count at 512 px
    multiply_adds = counter.get_total_flops() / 2  # the counter counts a multiply-add as 2 FLOPs
    assert abs(multiply_adds / 2.5e9 - 1) < 0.03, multiply_adds  # paper: 2.5B "FLOPs" (multiply-adds)


def test_d0_parameter_count_on_cpu():
    model = efficientdet_d0(num_classes=90)
    count = sum(p.numel() for p in model.parameters())
    assert 3.8e6 < count < 4.0e6, count  # paper: 3.9M
    config = EFFICIENTDET_CONFIGS["d0"]
    assert model.backbone.out_channels == config.bifpn_channels == 64
    assert len(model.backbone.fpn.layers) == config.bifpn_layers == 3
    assert len(model.head.class_net.convs) == len(model.head.box_net.convs) == config.head_layers == 3
    assert model.transform.min_size == (512,) and model.transform.max_size == 512


@pytest.mark.parametrize("variant", ["b0", "b5"])  # b5: TensorFlow batch-norm eps
def test_efficientnet_matches_torchvision(variant):
    tv_models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    theirs = getattr(tv_models, f"efficientnet_{variant}")(weights=None).eval()
    ours = efficientnet(variant).eval()
    expected, actual = theirs.state_dict(), ours.state_dict()
    assert list(actual) == list(expected)
    assert all(actual[k].shape == expected[k].shape for k in expected)
    ours.load_state_dict(expected)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
        # C3-C5 are the outputs of torchvision's stages 3, 5 and 7
        features = efficientnet_features(variant, state_dict=expected).eval()(x)
        reference = []
        y = x
        for index, block in enumerate(theirs.features[:8]):
            y = block(y)
            if index in (3, 5, 7):
                reference.append(y)
    assert list(features) == ["c3", "c4", "c5"]
    for ours_map, their_map in zip(features.values(), reference):
        torch.testing.assert_close(ours_map, their_map, rtol=0, atol=1e-5)


def test_feature_and_head_shapes():
    torch.manual_seed(0)
    model = small_model(num_classes=5).eval()
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        c = model.backbone.body(x)
        p = model.backbone(x)
        outputs = model.head(list(p.values()))
    assert [tuple(v.shape) for v in c.values()] == [(2, 40, 16, 16), (2, 112, 8, 8), (2, 320, 4, 4)]
    assert list(p) == ["p3", "p4", "p5", "p6", "p7"]
    assert [tuple(v.shape) for v in p.values()] == [(2, 64, SIZE >> s, SIZE >> s) for s in range(3, 8)]
    anchors = 9 * sum((SIZE >> s) ** 2 for s in range(3, 8))
    assert outputs["cls_logits"].shape == (2, anchors, 5)
    assert outputs["bbox_regression"].shape == (2, anchors, 4)
    # sizes that are not multiples of 128 still give consistent levels (rounded up at every stride)
    with torch.no_grad():
        odd = model.backbone(torch.rand(1, 3, 100, 70))
    assert [tuple(v.shape[-2:]) for v in odd.values()] == [(13, 9), (7, 5), (4, 3), (2, 2), (1, 1)]


def test_anchors_are_efficientdets():
    generator = efficientdet_anchor_generator()
    assert generator.num_anchors_per_location() == [9] * 5
    anchors = generator.anchors([(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)], [8, 16, 32, 64, 128])
    first = anchors[:9]  # P3, cell (0, 0): centred at (4, 4), sizes 32 * 2^(k/3), ratios 0.5, 1, 2 with the area kept
    centres = (first[:, :2] + first[:, 2:]) / 2
    torch.testing.assert_close(centres, torch.full((9, 2), 4.0))
    areas = (first[:, 2] - first[:, 0]) * (first[:, 3] - first[:, 1])
    expected = torch.tensor([32.0 * 2 ** (k / 3) for k in range(3)]) ** 2
    # (ratio, scale) order, corners rounded to whole pixels as torchvision's cell anchors are
    torch.testing.assert_close(areas.reshape(3, 3), expected.expand(3, 3), rtol=0.05, atol=0)
    last = anchors[-9:]  # P7's only cell: 4 * 128 = 512 px anchors centred at (64, 64)
    assert torch.allclose((last[:, :2] + last[:, 2:]) / 2, torch.full((9, 2), 64.0))
    widths, heights = last[:, 2] - last[:, 0], last[:, 3] - last[:, 1]
    assert float(((widths - 512).abs() + (heights - 512).abs()).min()) < 1e-3


def test_bifpn_fusion_weights_are_non_negative_and_normalised():
    fusion = FastNormalizedFusion(3)
    with torch.no_grad():
        fusion.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
    w = fusion.normalized_weights().detach()
    assert (w >= 0).all() and w[1] == 0
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0, 0.5]) / (2.5 + 1e-4))
    assert abs(float(w.sum()) - 1) < 1e-4
    inputs = [torch.randn(2, 4, 5, 5) for _ in range(3)]
    torch.testing.assert_close(fusion(inputs), w[0] * inputs[0] + w[2] * inputs[2])
    # The weights receive gradients (learnable) but the ReLU'd one does not.
    fusion(inputs).sum().backward()
    assert fusion.weight.grad[0] != 0 and fusion.weight.grad[1] == 0
    # Every node of a built BiFPN fuses with such weights, starting equal.
    bifpn = BiFPN([40, 112, 320], 64, 3)
    fusions = [m for m in bifpn.modules() if isinstance(m, FastNormalizedFusion)]
    assert len(fusions) == 8 * 3
    assert sorted({len(f.weight) for f in fusions}) == [2, 3]
    for f in fusions:
        w = f.normalized_weights().detach()
        assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-3 and torch.allclose(w, w[0].expand_as(w))
    with pytest.raises(ValueError, match="in_channels"):
        BiFPN([40, 112], 64, 3)
    with pytest.raises(ValueError, match="num_layers"):
        BiFPN([40, 112, 320], 64, 0)


def test_trainable_backbone_layers_freeze_from_the_stem_up():
    model = small_model(trainable_backbone_layers=3)
    stages = model.backbone.body.features
    assert not any(p.requires_grad for block in stages[:5] for p in block.parameters())
    assert all(p.requires_grad for block in stages[5:] for p in block.parameters())
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())
    with pytest.raises(ValueError, match="trainable_backbone_layers"):
        small_model(trainable_backbone_layers=9)


# --------------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------------


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = small_model().train()
    images, targets = squares_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss_dict = model(images, targets)
        assert set(loss_dict) == {"classification", "bbox_regression"}
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


def test_huber_box_loss_is_efficientdets():
    """The box loss equals 50 x Huber(delta 0.1) of the encoded deltas, averaged over the positives' coordinates,
    computed here directly from the matched boxes."""
    torch.manual_seed(0)
    head = EfficientDetHead(8, 1, 2, num_layers=1)
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0], [50.0, 50.0, 60.0, 70.0]])
    gt = torch.tensor([[[1.0, 1.0, 12.0, 11.0], [18.0, 22.0, 41.0, 45.0]]])
    matched = torch.tensor([[0, 1, -1]])
    deltas = torch.randn(1, 3, 4) * 0.3
    from fastdet.models.targets import PaddedTargets

    padded = PaddedTargets(gt, torch.tensor([[0, 1]]), torch.tensor([[True, True]]))
    losses = head.compute_loss(padded, {"cls_logits": torch.zeros(1, 3, 2), "bbox_regression": deltas}, anchors,
                               matched)
    targets = torch.stack([ops.box_encode(gt[0, i:i + 1], anchors[i:i + 1], (1.0, 1.0, 1.0, 1.0))[0]
                           for i in range(2)])
    error = (deltas[0, :2] - targets).abs()
    huber = torch.where(error < 0.1, 0.5 * error ** 2, 0.1 * (error - 0.05))
    torch.testing.assert_close(losses["bbox_regression"], 50 * huber.sum() / (2 * 4), rtol=1e-5, atol=1e-7)
    giou = EfficientDetHead(8, 1, 2, num_layers=1, bbox_loss_type="giou")
    assert giou.box_loss_weight == 1.0
    with pytest.raises(ValueError, match="bbox_loss_type"):
        EfficientDetHead(8, 1, 2, bbox_loss_type="l2")


def test_empty_targets_train():
    torch.manual_seed(0)
    model = small_model().train()
    images = [torch.rand(3, 100, 120), torch.rand(3, 128, 90)]
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    losses = model(images, empty)
    assert losses["bbox_regression"].item() == 0.0
    assert losses["classification"].item() > 0  # every anchor is a background example
    sum(losses.values()).backward()
    grad = model.head.class_net.predictor.pointwise.bias.grad
    assert torch.isfinite(grad).all() and (grad > 0).all()  # pushes every logit towards "no object"
    mixed = [empty[0], {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}]
    losses = model(images, mixed)
    assert losses["bbox_regression"].item() > 0 and torch.isfinite(sum(losses.values()))


def test_inputs_are_not_modified_and_bad_input_errors():
    model = small_model().train()
    images, targets = squares_batch()
    images_before, targets_before = copy.deepcopy(images), copy.deepcopy(targets)
    model(images, targets)
    for a, b in zip(images, images_before):
        assert torch.equal(a, b)
    for a, b in zip(targets, targets_before):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    bad_label = copy.deepcopy(targets)
    bad_label[0]["labels"][0] = 3  # num_classes = 3
    with pytest.raises(ValueError, match="labels"):
        model(images, bad_label)
    with pytest.raises(ValueError, match="targets"):
        model(images)
    backbone = model.backbone
    with pytest.raises(ValueError, match="num_classes"):
        EfficientDet(backbone, 0)
    with pytest.raises(ValueError, match="image_size"):
        EfficientDet(backbone, 3, image_size=0)
    with pytest.raises(ValueError, match="nms_method"):
        EfficientDet(backbone, 3, nms_method="greedy")
    with pytest.raises(ValueError, match="out_channels"):
        EfficientDet(nn.Identity(), 3)


# --------------------------------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------------------------------


def _same_class_overlaps(det, threshold):
    iou = ops.box_iou(det["boxes"], det["boxes"])
    same = det["labels"][:, None] == det["labels"][None, :]
    off_diagonal = ~torch.eye(len(det["boxes"]), dtype=torch.bool)
    return bool((iou > threshold)[same & off_diagonal].any())


def test_eval_output_contract_with_soft_and_hard_nms():
    torch.manual_seed(0)
    soft = small_model(num_classes=4)
    perturb_for_detections(soft)
    soft.eval()
    assert soft.nms_method == "soft" and soft.detections_per_img == 100
    hard = small_model(num_classes=4, nms_method="hard")
    hard.load_state_dict(soft.state_dict())
    hard.eval()
    images = [torch.rand(3, 100, 128), torch.rand(3, 90, 60)]
    with torch.no_grad():
        soft_out, hard_out = soft(images), hard(images)
    for dets, image in ((soft_out, None), (hard_out, None)):
        assert len(dets) == 2
        for det, img in zip(dets, images):
            assert set(det) == {"boxes", "scores", "labels"}
            n = len(det["scores"])
            assert 0 < n <= 100
            assert det["boxes"].shape == (n, 4) and det["boxes"].dtype == torch.float32
            assert det["labels"].dtype == torch.int64 and ((det["labels"] >= 0) & (det["labels"] < 4)).all()
            assert (det["scores"][:-1] >= det["scores"][1:]).all() and (det["scores"] > 0.05).all()
            h, w = img.shape[-2:]
            assert ((det["boxes"][:, 0::2] >= 0) & (det["boxes"][:, 0::2] <= w)).all()
            assert ((det["boxes"][:, 1::2] >= 0) & (det["boxes"][:, 1::2] <= h)).all()
    for s, h in zip(soft_out, hard_out):
        # The best detection is the same; greedy NMS leaves no same-class pair above its IoU threshold, gaussian
        # soft-NMS keeps overlapping boxes with decayed scores.
        torch.testing.assert_close(s["boxes"][0], h["boxes"][0])
        assert s["labels"][0] == h["labels"][0]
        assert not _same_class_overlaps(h, hard.nms_thresh)
    assert any(_same_class_overlaps(s, soft.nms_thresh) for s in soft_out)


def test_bfloat16_autocast_and_replace_class_heads():
    torch.manual_seed(0)
    model = small_model()
    images, targets = squares_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    model.replace_class_heads(7)
    assert model.num_classes == 7 and model.head.class_net.predictor.pointwise.out_channels == 9 * 7
    model.eval()
    with torch.no_grad():
        outputs = model.head(list(model.backbone(torch.rand(1, 3, SIZE, SIZE)).values()))
    assert outputs["cls_logits"].shape[-1] == 7
    torch.testing.assert_close(outputs["cls_logits"].sigmoid().mean(), torch.tensor(0.01), atol=0.01, rtol=0)


def test_neck_and_head_compile_without_graph_breaks():
    torch.manual_seed(0)
    neck = BiFPN([40, 112, 320], 16, 2).eval()
    head = EfficientDetHead(16, 9, 3, num_layers=2).eval()

    def run(c3, c4, c5):
        outputs = head(list(neck([c3, c4, c5]).values()))
        return outputs["cls_logits"], outputs["bbox_regression"]

    inputs = (torch.rand(2, 40, 16, 16), torch.rand(2, 112, 8, 8), torch.rand(2, 320, 4, 4))
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for expected, actual in zip(run(*inputs), compiled(*inputs)):
            torch.testing.assert_close(actual, expected)


class _Detections(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        out = self.model([image])[0]
        return out["boxes"], out["scores"], out["labels"]


def test_inference_path_exports_with_soft_nms():
    """torch.export of the whole inference path (transform, backbone, BiFPN, heads, anchors, selection, gaussian
    soft-NMS, rescaling) gives the eager detections exactly on a new image of the same size."""
    torch.manual_seed(0)
    model = small_model(num_classes=4).eval()
    with torch.no_grad():
        model.head.class_net.predictor.pointwise.bias.zero_()  # scores around 0.5: many detections
    wrapper = _Detections(model)
    program = torch.export.export(wrapper, (torch.rand(3, 100, 128),))
    image = torch.rand(3, 100, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = program.module()(image), wrapper(image)
    assert len(want[0]) == 100  # detections_per_img
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------------------------------


def test_weights_state_dicts_paths_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    model = small_model()
    perturb_for_detections(model)
    with pytest.raises(ValueError, match="no published weights"):
        small_model(weights="DEFAULT")
    path = tmp_path / "effdet.pth"
    torch.save(model.state_dict(), path)
    for source in (model.state_dict(), str(path)):
        restored = small_model(weights=source).eval()
        for key, value in model.state_dict().items():
            assert torch.equal(restored.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError):
        small_model(weights=tmp_path / "missing.pth")
    # weights_backbone: torchvision's ImageNet EfficientNet-B0 state dict (a path works the same way)
    imagenet = efficientnet("b0").state_dict()
    backbone_pretrained = small_model(weights_backbone=imagenet)
    assert torch.equal(backbone_pretrained.backbone.body.features[3][0].block[0][0].weight,
                       imagenet["features.3.0.block.0.0.weight"])
    with pytest.raises(ValueError, match="EfficientNet_B0_Weights"):
        small_model(weights_backbone="IMAGENET1K_V9")
    with pytest.raises(ValueError, match="ResNet50_Weights"):
        small_model(weights_backbone="ResNet50_Weights.IMAGENET1K_V2")


def test_builders_are_registered():
    for i in range(8):
        assert f"efficientdet_d{i}" in models.DETECTOR_BUILDERS
        assert getattr(models, f"efficientdet_d{i}").__name__ == f"efficientdet_d{i}"


# --------------------------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------------------------


def test_cli_trains_and_evaluates_on_shapes(tmp_path):
    from fastdet.data import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", num_images=10, image_size=(96, 96), seed=5, max_objects=2)
    _, result = train_then_evaluate(tmp_path, "efficientdet_d0", [f"image_size={SIZE}"],
                                    ["--batch-size", "4", "--optimizer", "adamw", "--lr", "1e-3"])
    assert "IoU=0.50 " in result.stdout
