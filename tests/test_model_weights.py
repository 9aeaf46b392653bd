"""Builders' weights API (fastdet.models.weights): torchvision's signature and rules, the forms ``weights`` takes,
the hub cache with hash check, the fast offline error, and the fine-tuning flow from the API and the CLI."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import fastdet.models as models
from fastdet.models import weights as W
from fastdet.models.backbones import FrozenBatchNorm2d

REPO = Path(__file__).resolve().parents[1]
TINY = dict(min_size=64, max_size=96, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache under tmp_path; downloads are not allowed and would fail the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(W.DOWNLOAD_ENV, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    assert str(checkpoints).startswith(str(tmp_path))
    return checkpoints


def _publish(hub: Path, monkeypatch, enum: str, state_dict, corrupt: bool = False, member: str | None = None
             ) -> W.Weights:
    """Save ``state_dict`` in the cache under a torchvision-style name carrying its hash prefix, and make it the
    enum's ``member`` entry (default: the DEFAULT one, which then points to it too)."""
    hub.mkdir(parents=True, exist_ok=True)
    tmp = hub / "tmp.pth"
    torch.save(state_dict, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    real = W.WEIGHTS[enum][member or "DEFAULT"]
    entry = W.Weights(enum, real.name, f"fake-{digest[:8]}.pth", real.num_classes, real.frozen_bn_eps, real.dataset,
                      real._categories)
    if corrupt:
        with open(tmp, "ab") as f:
            f.write(b"x")
    tmp.rename(hub / entry.file)
    table = {**W.WEIGHTS[enum], real.name: entry}
    if W.WEIGHTS[enum]["DEFAULT"].name == real.name:
        table["DEFAULT"] = entry
    monkeypatch.setitem(W.WEIGHTS, enum, table)
    return entry


# --------------------------------------------------------------------------------------------------------------------
# accepted forms
# --------------------------------------------------------------------------------------------------------------------


def test_enum_names_and_members_resolve():
    enum = "FasterRCNN_ResNet50_FPN_Weights"
    expected = W.WEIGHTS[enum]["COCO_V1"]
    assert W.resolve_weights("DEFAULT", enum) == expected
    assert W.resolve_weights("COCO_V1", enum) == expected
    assert W.resolve_weights(f"{enum}.COCO_V1", enum) == expected
    assert expected.url == "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    assert expected.hash_prefix == "258fb6c6" and expected.meta["num_classes"] == 91
    tv = pytest.importorskip("torchvision.models.detection")
    assert W.resolve_weights(tv.FasterRCNN_ResNet50_FPN_Weights.COCO_V1, enum) == expected
    assert W.resolve_weights(tv.FasterRCNN_ResNet50_FPN_Weights.DEFAULT, enum) == expected
    # The table agrees with torchvision's enums: file names (hence hashes), categories, defaults.
    from torchvision.models import get_model_weights

    for name, members in W.WEIGHTS.items():
        tv_enum = next(e for e in _torchvision_enums(get_model_weights) if e.__name__ == name)
        assert members["DEFAULT"].name == tv_enum.DEFAULT.name, name
        for member in tv_enum:
            ours = members[member.name]
            assert ours.url == member.url, member
            categories = member.meta.get("categories")
            assert ours.num_classes == (len(categories) if categories else None), member
            if ours.dataset == "COCO":
                assert list(W.COCO_CATEGORIES) == categories


def _torchvision_enums(get_model_weights):
    names = ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
             "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2",
             "ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn",
             "maskrcnn_resnet50_fpn_v2", "resnet18", "resnet50", "mobilenet_v3_large", "vgg16"]
    names += [f"efficientnet_b{i}" for i in range(8)]
    return [get_model_weights(n) for n in names]


@pytest.mark.parametrize("value, error, match", [
    ("COCO_V2", ValueError, "unknown weights 'COCO_V2'.*COCO_V1"),
    ("ResNet50_Weights.IMAGENET1K_V1", ValueError, "belongs to ResNet50_Weights"),
    (3, TypeError, "got int"),
    ({"a": 1}, TypeError, "map names to tensors"),
])
def test_bad_weights_are_rejected(value, error, match):
    with pytest.raises(error, match=match):
        models.fasterrcnn_resnet50_fpn(weights=value)


def test_wrong_enum_member_is_rejected():
    tv = pytest.importorskip("torchvision.models.detection")
    with pytest.raises(ValueError, match="does not fit"):
        models.fasterrcnn_resnet50_fpn(weights=tv.RetinaNet_ResNet50_FPN_Weights.COCO_V1)


def test_builder_without_published_weights_rejects_enum_names():
    with pytest.raises(ValueError, match="no published weights"):
        models.fasterrcnn_resnet18_fpn(weights="DEFAULT")


# --------------------------------------------------------------------------------------------------------------------
# torchvision's rules
# --------------------------------------------------------------------------------------------------------------------


def _trainable_stages(model) -> set[str]:
    return {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if p.requires_grad}


def test_defaults_without_weights_are_torchvisions():
    model = models.fasterrcnn_resnet50_fpn(**TINY)
    assert model.num_classes == 91
    assert isinstance(model.backbone.body.bn1, nn.BatchNorm2d)
    assert _trainable_stages(model) == {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}
    model = models.fasterrcnn_resnet50_fpn(num_classes=5, trainable_backbone_layers=2, **TINY)
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    assert _trainable_stages(model) == {"layer3", "layer4"}
    for bad in (6, -1, 2.0, True):
        with pytest.raises(ValueError, match="trainable_backbone_layers"):
            models.fasterrcnn_resnet50_fpn(trainable_backbone_layers=bad)
    with pytest.raises(ValueError, match=r"trainable_backbone_layers must be an int in \[0, 5\]"):
        models.ssd300_vgg16_light(trainable_backbone_layers=6)


def test_offline_error_is_fast_and_says_where_to_put_the_file(hub):
    start = time.perf_counter()
    with pytest.raises(W.WeightsNotFoundError) as info:
        models.fasterrcnn_resnet50_fpn(weights="DEFAULT")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    entry = W.WEIGHTS["FasterRCNN_ResNet50_FPN_Weights"]["COCO_V1"]
    assert entry.file in message and entry.url in message and str(hub) in message and W.DOWNLOAD_ENV in message
    # Backbone weights too (ssd300_vgg16 defaults to torchvision's VGG features, as torchvision's builder does).
    with pytest.raises(W.WeightsNotFoundError, match="vgg16_features-amdegroot-88682ab5.pth"):
        models.ssd300_vgg16()
    with pytest.raises(W.WeightsNotFoundError, match="resnet50-11ad3fa6.pth"):
        models.retinanet_resnet50_fpn(weights_backbone="DEFAULT")


def test_download_is_attempted_only_when_allowed(hub, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, Path(dst).name, hash_prefix))
        raise ConnectionError("offline")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(W.WeightsNotFoundError):
        models.fasterrcnn_resnet50_fpn(weights="DEFAULT")
    assert calls == []
    monkeypatch.setenv(W.DOWNLOAD_ENV, "1")
    with pytest.raises(ConnectionError):
        models.fasterrcnn_resnet50_fpn(weights="DEFAULT")
    assert calls == [("https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
                      "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth", "258fb6c6")]
    monkeypatch.delenv(W.DOWNLOAD_ENV)
    with pytest.raises(ConnectionError):
        W.download_weights("RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    assert calls[-1][1] == "retinanet_resnet50_fpn_coco-eeacb38b.pth"


@pytest.fixture(scope="module")
def coco_state():
    """A 91-class Faster R-CNN state dict in torchvision's pretrained layout, with distinctive values."""
    torch.manual_seed(0)
    model = models.fasterrcnn_resnet50_fpn(num_classes=91, norm_layer="FrozenBatchNorm2d", **TINY)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.normal_(0, 0.05)
        model.backbone.body.bn1.running_var.uniform_(0.5, 2.0)
    return model.state_dict()


def test_cached_weights_load_with_hash_check(hub, monkeypatch, coco_state):
    _publish(hub, monkeypatch, "FasterRCNN_ResNet50_FPN_Weights", coco_state)
    model = models.fasterrcnn_resnet50_fpn(weights="DEFAULT", **TINY)
    assert model.num_classes == 91
    for key, value in model.state_dict().items():
        assert torch.equal(value, coco_state[key]), key
    # torchvision's pretrained conventions: frozen batch norm with eps 0 (this checkpoint predates the eps fix) and
    # three trainable stages.
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert frozen and all(m.eps == 0.0 for m in frozen)
    assert _trainable_stages(model) == {"layer2", "layer3", "layer4"}
    with pytest.raises(ValueError, match="num_classes=5 conflicts with .* 91 classes.*replace_class_heads"):
        models.fasterrcnn_resnet50_fpn(weights="DEFAULT", num_classes=5)


def test_wrong_hash_is_rejected(hub, monkeypatch, coco_state):
    entry = _publish(hub, monkeypatch, "FasterRCNN_ResNet50_FPN_Weights", coco_state, corrupt=True)
    with pytest.raises(W.WeightsHashError, match=f"{entry.file}.*{entry.hash_prefix}"):
        models.fasterrcnn_resnet50_fpn(weights="COCO_V1")


def test_backbone_weights_load_into_the_resnet(hub, monkeypatch):
    tv_models = pytest.importorskip("torchvision.models")
    torch.manual_seed(1)
    classifier = tv_models.resnet50(weights=None)
    _publish(hub, monkeypatch, "ResNet50_Weights", classifier.state_dict())
    model = models.retinanet_resnet50_fpn(weights_backbone="DEFAULT", num_classes=5)
    body = model.backbone.body.state_dict()
    reference = classifier.state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in body.items())
    assert isinstance(model.backbone.body.bn1, FrozenBatchNorm2d)
    assert _trainable_stages(model) == {"layer2", "layer3", "layer4"}


def test_state_dict_and_path_forms(tmp_path):
    torch.manual_seed(2)
    source = models.fasterrcnn_resnet18_fpn(num_classes=4, **TINY).eval()
    state = source.state_dict()
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"model": state, "epoch": 3}, tmp_path / "checkpoint.pth")  # a fastdet training checkpoint
    images = [torch.rand(3, 64, 80)]
    with torch.no_grad():
        expected = source(images)
    for weights in (state, tmp_path / "plain.pth", str(tmp_path / "checkpoint.pth")):
        model = models.fasterrcnn_resnet18_fpn(weights=weights, num_classes=4, **TINY).eval()
        with torch.no_grad():
            actual = model(images)
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(actual[0][key], expected[0][key])
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        models.fasterrcnn_resnet18_fpn(weights=tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="size mismatch"):
        models.fasterrcnn_resnet18_fpn(weights=state, num_classes=7, **TINY)


def test_yolo_builders_take_the_common_signature(tmp_path):
    model = models.yolo_n(num_classes=3, image_size=64)
    assert model.num_classes == 3 and model.width_multiple == 0.25
    assert models.yolo_s().num_classes == 91
    torch.save(model.state_dict(), tmp_path / "yolo.pth")
    partial = models.yolo_n(num_classes=5, image_size=64, weights_backbone=tmp_path / "yolo.pth")
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in partial.backbone.state_dict().items())
    frozen = {n.split(".")[1] for n, p in partial.named_parameters() if n.startswith("backbone.")
              and not p.requires_grad}
    assert frozen == {"stem", "stage2"}  # 3 trainable stages by default with backbone weights
    restored = models.yolo_n(num_classes=3, image_size=64, weights=str(tmp_path / "yolo.pth"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in restored.state_dict().items())


# --------------------------------------------------------------------------------------------------------------------
# fine-tuning
# --------------------------------------------------------------------------------------------------------------------


def test_finetune_replaces_the_class_heads_only(hub, monkeypatch, coco_state):
    _publish(hub, monkeypatch, "FasterRCNN_ResNet50_FPN_Weights", coco_state)
    model = W.finetune_model("fasterrcnn_resnet50_fpn", 4, weights="DEFAULT", **TINY)
    assert model.num_classes == 4
    predictor = model.roi_heads.box_predictor
    assert predictor.cls_score.out_features == 4 and predictor.bbox_pred.out_features == 16
    state = model.state_dict()
    for key, value in coco_state.items():
        if not key.startswith("roi_heads.box_predictor."):
            assert torch.equal(state[key], value), key
    model.train()
    targets = [{"boxes": torch.tensor([[5.0, 6, 40, 50]]), "labels": torch.tensor([3])}]
    losses = model([torch.rand(3, 64, 80)], targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert predictor.cls_score.weight.grad is not None
    assert model.backbone.body.layer1[0].conv1.weight.grad is None  # frozen stage


@pytest.mark.parametrize("builder, head", [
    ("retinanet_resnet18_fpn", lambda m: m.head.classification_head.cls_logits.out_channels),
    ("ssd300_vgg16_light", lambda m: m.head.classification_head.module_list[0].out_channels),
])
def test_replace_class_heads_of_the_other_families(builder, head):
    model = getattr(models, builder)(num_classes=91)
    anchors = head(model) // 91
    model.replace_class_heads(6)
    assert model.num_classes == 6 and head(model) == anchors * 6
    model.eval()
    with torch.no_grad():
        detections = model([torch.rand(3, 80, 96)])
    assert ((detections[0]["labels"] >= 0) & (detections[0]["labels"] < 6)).all()


def test_rebuild_kwargs_repeat_the_architecture_without_weight_files(hub, monkeypatch):
    tv_models = pytest.importorskip("torchvision.models")
    _publish(hub, monkeypatch, "MobileNet_V3_Large_Weights", tv_models.mobilenet_v3_large(weights=None).state_dict(),
             member="IMAGENET1K_V1")  # the builder's default, as torchvision's
    pretrained = models.ssdlite320_mobilenet_v3_large(num_classes=5)  # ImageNet backbone: full tail
    extra = W.rebuild_kwargs(pretrained, {})
    assert extra == {"weights_backbone": None, "reduced_tail": False}
    models.ssdlite320_mobilenet_v3_large(num_classes=5, **extra).load_state_dict(pretrained.state_dict())
    frozen = models.retinanet_resnet18_fpn(num_classes=3)
    assert W.rebuild_kwargs(frozen, {}) == {"weights_backbone": None, "norm_layer": "FrozenBatchNorm2d"}
    assert W.rebuild_kwargs(frozen, {"norm_layer": "FrozenBatchNorm2d"}) == {"weights_backbone": None}


def test_cli_fine_tunes_from_weights_and_reloads_the_checkpoint(tmp_path):
    from fastdet.data import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", num_images=12, image_size=(64, 64), seed=3)
    torch.manual_seed(4)
    pretrained = models.fasterrcnn_resnet18_fpn(num_classes=91)  # "COCO" weights of the same architecture
    torch.save(pretrained.state_dict(), tmp_path / "coco.pth")
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "fastdet", "train", "--data", tmp_path / "data", "--model",
                          "fasterrcnn_resnet18_fpn", "--weights", tmp_path / "coco.pth", "--model-arg", "min_size=64",
                          "--model-arg", "max_size=64", "--output", tmp_path / "run", "--epochs", "1",
                          "--batch-size", "4", "--workers", "0", "--no-progress", "--eval-every", "0",
                          "--device", "cpu"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    from fastdet.cli._common import load_checkpoint

    checkpoints = sorted((tmp_path / "run").glob("*.pt"))
    assert checkpoints
    model, spec = load_checkpoint(checkpoints[-1], torch.device("cpu"))
    assert spec["num_classes"] == 4 and model.num_classes == 4  # 3 shapes + background
    assert "weights" not in spec["kwargs"]
    saved = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)["model"]
    # Fine-tuned from the given weights with torchvision's pretrained defaults: the frozen stages (conv1, layer1) still
    # hold them exactly, the trained ones moved, and the class heads are new.
    reference = pretrained.state_dict()
    assert torch.equal(saved["backbone.body.layer1.0.conv1.weight"], reference["backbone.body.layer1.0.conv1.weight"])
    assert not torch.equal(saved["backbone.body.layer4.0.conv1.weight"],
                           reference["backbone.body.layer4.0.conv1.weight"])
    assert saved["roi_heads.box_predictor.cls_score.weight"].shape[0] == 4
    assert spec["kwargs"]["norm_layer"] == "FrozenBatchNorm2d" and spec["kwargs"]["weights_backbone"] is None
    bad = subprocess.run([sys.executable, "-m", "fastdet", "train", "--data", tmp_path / "data", "--model",
                          "fasterrcnn_resnet50_fpn", "--weights", "COCO_V9", "--output", tmp_path / "run2",
                          "--epochs", "1", "--workers", "0"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "unknown weights 'COCO_V9'" in bad.stderr
    offline = subprocess.run([sys.executable, "-m", "fastdet", "train", "--data", tmp_path / "data", "--model",
                              "fcos_resnet50_fpn", "--output", tmp_path / "run3", "--epochs", "1", "--workers", "0"],
                             capture_output=True, text=True, env={**env, "TORCH_HOME": str(tmp_path / "th")},
                             timeout=300)
    # torchvision's default ImageNet backbone for FCOS is not cached: a usage error naming the file, no traceback.
    assert offline.returncode == 2 and "resnet50-0676ba61.pth" in offline.stderr
    assert "Traceback" not in offline.stderr
