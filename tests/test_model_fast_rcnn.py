"""Fast R-CNN on external proposals: equivalence with Faster R-CNN given its own RPN proposals, checkpoint loading
without the RPN, training, the detection contract, proposal sources and files, bad input, and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from cli_runner import run_fastdet as fastdet
from cli_runner import train_then_evaluate
from detection_asserts import sgd_training_losses
from detection_asserts import two_images_and_targets as images_and_targets

import fastdet.models as models
from fastdet.models import FastRCNN, fast_rcnn_resnet18_fpn, fast_rcnn_resnet50_fpn, fasterrcnn_resnet18_fpn
from fastdet.models.targets import pad_targets
from fastdet.models.proposals import (
    ProposalTable,
    SelectiveSearchProposals,
    load_proposals,
    make_proposal_source,
    save_proposals,
)

SIZE = 128
SMALL = dict(min_size=SIZE, max_size=SIZE, max_proposals_train=100, max_proposals_test=100,
             box_batch_size_per_image=64)


def small_model(**kwargs):
    torch.manual_seed(0)
    return fast_rcnn_resnet18_fpn(num_classes=3, **{**SMALL, **kwargs})


def rpn_proposals(faster, images):
    """Faster R-CNN's own RPN proposals per image (valid slots), in resized-image pixels."""
    with torch.no_grad():
        batch, _ = faster.transform(images, None)
        proposals, _ = faster.rpn(batch, faster._features(batch.tensors))
    return [boxes[valid] for boxes, valid in zip(proposals.boxes, proposals.valid)]


def test_equals_faster_rcnn_given_its_rpn_proposals():
    torch.manual_seed(0)
    faster = fasterrcnn_resnet18_fpn(num_classes=3, min_size=SIZE, max_size=SIZE).eval()
    fast = fast_rcnn_resnet18_fpn(weights=faster.state_dict(), num_classes=3, min_size=SIZE, max_size=SIZE).eval()
    images, _ = images_and_targets()  # sizes at scale 1: resized pixels are original pixels
    proposals = rpn_proposals(faster, images)
    assert all(p.shape[0] > 10 for p in proposals)
    with torch.no_grad():
        expected = faster(images)
        got = fast(images, proposals)
    assert sum(e["boxes"].shape[0] for e in expected) > 0
    for e, g in zip(expected, got):
        assert set(g) == {"boxes", "labels", "scores"}
        for key in e:
            assert torch.equal(e[key], g[key]), key
    # the training losses agree too: with a sampling budget above the candidate count every proposal is sampled,
    # so no random draw is involved
    faster.roi_heads.fg_bg_sampler.batch_size_per_image = 8192
    fast.roi_heads.fg_bg_sampler.batch_size_per_image = 8192
    faster.train()
    fast.train()
    _, targets = images_and_targets()
    batch, resized = faster.transform(images, targets)
    padded = pad_targets(resized)
    with torch.no_grad():
        features = faster._features(batch.tensors)
        rpn_out, _ = faster.rpn(batch, features, padded)
        _, expected_losses = faster.roi_heads(features, rpn_out, batch.image_sizes, padded)
        got_losses = fast(images, [b[v] for b, v in zip(rpn_out.boxes, rpn_out.valid)], targets=targets)
    for key in ("loss_classifier", "loss_box_reg"):
        torch.testing.assert_close(got_losses[key], expected_losses[key], rtol=1e-5, atol=1e-6)


def test_resnet50_loads_a_faster_rcnn_checkpoint_without_its_rpn(tmp_path):
    torch.manual_seed(0)
    faster = models.fasterrcnn_resnet50_fpn(num_classes=5)
    state = faster.state_dict()
    path = tmp_path / "faster.pth"
    torch.save(state, path)
    fast = fast_rcnn_resnet50_fpn(weights=path, num_classes=5)
    assert not any(k.startswith("rpn.") for k in fast.state_dict())
    for key, value in fast.state_dict().items():
        assert torch.equal(value, state[key]), key
    # (the pretrained model has frozen batch norms: no num_batches_tracked counters)
    assert set(fast.state_dict()) == {k for k in state if not k.startswith("rpn.") and "num_batches" not in k}
    # other keys are still loaded strictly
    broken = {k: v for k, v in state.items() if not k.startswith("roi_heads.box_predictor")}
    with pytest.raises(RuntimeError, match="box_predictor"):
        fast_rcnn_resnet50_fpn(weights=broken, num_classes=5)


def test_training_steps_lower_the_loss():
    # trainable batch norm keeps the randomly initialised network's steps stable; proposals from selective search
    model = small_model(norm_layer="BatchNorm2d")
    images, targets = images_and_targets()
    totals = sgd_training_losses(model, images, targets, 4, {"loss_classifier", "loss_box_reg"})
    assert totals[-1] < 0.5 * totals[0], totals


def test_eval_output_format_with_the_default_selective_search():
    model = small_model().eval()
    assert isinstance(model.proposal_generator, SelectiveSearchProposals)
    images, _ = images_and_targets()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == 2
    for out, image in zip(outputs, images):
        assert set(out) == {"boxes", "labels", "scores"}
        n = out["boxes"].shape[0]
        assert out["boxes"].shape == (n, 4) and out["labels"].shape == (n,) and out["scores"].shape == (n,)
        assert out["labels"].dtype == torch.int64 and n <= 100
        if n:
            assert out["labels"].min() >= 1 and out["labels"].max() < 3
            assert (out["boxes"][:, 2] <= image.shape[2]).all() and (out["boxes"][:, 3] <= image.shape[1]).all()
    # the generator's cap follows train()/eval()
    generator = model.proposal_generator
    assert generator(images[0]).shape[0] <= 100
    generator.max_proposals_test = 7
    assert generator(images[0]).shape[0] == 7


def test_proposals_are_rescaled_with_the_image():
    # the transform resizes a 64 px image to 128 px: a proposal in original pixels is doubled with it, so it pools
    # the same region as the doubled proposal on the 128 px image resized to itself
    model = small_model(box_score_thresh=0.0).eval()
    small = torch.rand(3, 64, 64)
    batch, _ = model.transform([small], None)
    big = batch.tensors[0] * torch.tensor(model.transform.image_std)[:, None, None] + \
        torch.tensor(model.transform.image_mean)[:, None, None]  # the resized image, un-normalised
    proposal = torch.tensor([[8.0, 8.0, 40.0, 48.0]])
    with torch.no_grad():
        out_small = model([small], [proposal])[0]
        out_big = model([big], [proposal * 2])[0]
    assert out_small["boxes"].shape[0] > 0
    torch.testing.assert_close(out_small["scores"], out_big["scores"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_small["boxes"] * 2, out_big["boxes"], rtol=1e-4, atol=1e-3)
    assert (out_small["boxes"] <= 64).all()


def test_empty_proposals_and_targets():
    model = small_model()
    images, targets = images_and_targets()
    empty = [torch.zeros(0, 4), torch.zeros(0, 4)]
    model.train()
    losses = model(images, empty, targets)  # ground truth alone trains
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_box_reg"] > 0
    no_objects = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    losses = model(images, [torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.zeros(0, 4)], no_objects)
    assert losses["loss_box_reg"] == 0 and torch.isfinite(losses["loss_classifier"])
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        outputs = model(images, [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 50.0, 50.0]])])
    assert outputs[0]["boxes"].shape == (0, 4)


def test_bad_input_raises_clear_errors():
    model = small_model().eval()
    images, targets = images_and_targets()
    good = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    with pytest.raises(ValueError, match=r"proposals\[1\] must have shape \[K, 4\]"):
        model(images, [good, torch.zeros(3, 5)])
    with pytest.raises(ValueError, match="one Tensor\\[K, 4\\] per image: got 1 for 2"):
        model(images, [good])
    with pytest.raises(TypeError, match="list of Tensor"):
        model(images, torch.zeros(2, 3, 4))
    with pytest.raises(TypeError, match=r"proposals\[0\] must be a floating-point"):
        model(images, [good.long(), good])
    with pytest.raises(ValueError, match=r"proposals\[1\] contains NaN"):
        model(images, [good, torch.tensor([[0.0, float("nan"), 1.0, 2.0]])])
    with pytest.raises(ValueError, match=r"proposals\[0\] has a box with x2 < x1"):
        model(images, [torch.tensor([[10.0, 0.0, 5.0, 4.0]]), good])
    model.train()
    with pytest.raises(TypeError, match="targets by keyword"):
        model(images, targets)  # torchvision's positional call: a clear error, not a silent misuse
    with pytest.raises(ValueError, match="targets must be given"):
        model(images, [good, good])
    with pytest.raises(ValueError, match="num_classes"):
        FastRCNN(models.resnet_fpn_backbone(18), num_classes=1)
    with pytest.raises(ValueError, match="max_proposals_train"):
        small_model(max_proposals_train=0)
    with pytest.raises(TypeError, match="proposal_generator"):
        small_model(proposal_generator=3)


def test_inputs_are_not_modified():
    model = small_model()
    images, targets = images_and_targets()
    proposals = [torch.tensor([[1.0, 2.0, 300.0, 60.0]]), torch.tensor([[-5.0, 0.0, 40.0, 40.0]])]
    saved = copy.deepcopy((images, targets, proposals))
    model.train()
    model(images, proposals, targets)
    model.eval()
    with torch.no_grad():
        model(images, proposals)
    for a, b in zip(images + proposals, saved[0] + saved[2]):
        assert torch.equal(a, b)
    for t, s in zip(targets, saved[1]):
        assert t.keys() == s.keys() and all(torch.equal(t[k], s[k]) for k in t)


def test_proposal_files_and_tables(tmp_path):
    table = {3: torch.tensor([[0.0, 0.0, 10.0, 12.0], [2.0, 3.0, 40.0, 50.0]]), 7: torch.zeros(0, 4)}
    for name in ("p.json", "p.pt"):
        save_proposals(tmp_path / name, table)
        loaded = load_proposals(tmp_path / name)
        assert loaded.keys() == {3, 7}
        assert torch.equal(loaded[3], table[3]) and loaded[7].shape == (0, 4)
    (tmp_path / "records.json").write_text(json.dumps([{"image_id": 5, "boxes": [[1, 2, 3, 4]]}]))
    assert load_proposals(tmp_path / "records.json")[5].tolist() == [[1.0, 2.0, 3.0, 4.0]]
    (tmp_path / "bad.json").write_text(json.dumps({"1": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match="shape \\[K, 4\\]"):
        load_proposals(tmp_path / "bad.json")
    (tmp_path / "key.json").write_text(json.dumps({"cat": [[1, 2, 3, 4]]}))
    with pytest.raises(ValueError, match="not an integer image id"):
        load_proposals(tmp_path / "key.json")
    (tmp_path / "nan.json").write_text('{"1": [[1, 2, NaN, 4]]}')
    with pytest.raises(ValueError, match="NaN"):
        load_proposals(tmp_path / "nan.json")
    with pytest.raises(FileNotFoundError):
        load_proposals(tmp_path / "missing.json")
    (tmp_path / "p.txt").write_text("{}")
    with pytest.raises(ValueError, match="unknown format"):
        load_proposals(tmp_path / "p.txt")

    # a detector on a proposals file: ids from image_ids= or the targets' image_id
    assert isinstance(make_proposal_source(str(tmp_path / "p.json")), ProposalTable)
    model = small_model(proposal_generator=tmp_path / "p.json").eval()
    images, targets = images_and_targets()
    with torch.no_grad():
        by_ids = model(images, image_ids=[3, 7])
        explicit = model(images, [table[3], table[7]])
    for a, b in zip(by_ids, explicit):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert by_ids[1]["boxes"].shape == (0, 4)
    # the evaluation cap applies to a table's boxes (best-ranked first), as to the built-in search's
    capped = small_model(proposal_generator=tmp_path / "p.json", max_proposals_test=1).eval()
    with torch.no_grad():
        first = capped(images, image_ids=[3, 7])
        explicit_first = capped(images, [table[3][:1], table[7]])
    for a, b in zip(first, explicit_first):
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(KeyError, match="no proposals for image_id 4"):
        model(images, image_ids=[3, 4])
    with pytest.raises(ValueError, match="image_ids"):
        model(images)
    model.train()
    targets = [dict(t, image_id=i) for t, i in zip(targets, (7, 3))]
    assert set(model(images, targets=targets)) == {"loss_classifier", "loss_box_reg"}


def test_training_takes_the_targets_proposals():
    """Proposals in the targets (fastdet.data.AttachProposals, moved by the augmentation) are what training uses,
    ahead of the generator: the same losses as passing them explicitly."""
    def never(image):
        raise AssertionError("the generator must not be asked when the targets carry proposals")

    model = small_model(proposal_generator=never).train()
    images, targets = images_and_targets()
    proposals = [torch.tensor([[1.0, 2.0, 60.0, 50.0], [10.0, 5.0, 90.0, 70.0]]),
                 torch.tensor([[0.0, 0.0, 30.0, 30.0]])]
    torch.manual_seed(3)
    carried = model(images, targets=[dict(t, proposals=p) for t, p in zip(targets, proposals)])
    torch.manual_seed(3)
    explicit = model(images, proposals, targets)
    assert carried.keys() == explicit.keys() and all(torch.equal(carried[k], explicit[k]) for k in carried)


def test_callable_proposal_generator():
    calls = []

    def generator(image):
        calls.append(tuple(image.shape))
        return torch.tensor([[0.0, 0.0, image.shape[2] / 2, image.shape[1] / 2]])

    model = small_model(proposal_generator=generator).eval()
    images, _ = images_and_targets()
    with torch.no_grad():
        model(images)
    assert calls == [tuple(i.shape) for i in images]


def test_builders_are_registered():
    for name in ("fast_rcnn_resnet50_fpn", "fast_rcnn_resnet18_fpn"):
        assert name in models.DETECTOR_BUILDERS and getattr(models, name).__name__ == name


def test_cli_trains_evaluates_and_predicts_on_shapes(tmp_path):
    from fastdet.data import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", num_images=6, image_size=(96, 96), seed=5, max_objects=2)
    checkpoint, _ = train_then_evaluate(
        tmp_path, "fast_rcnn_resnet18_fpn",
        ["min_size=96", "max_size=96", "max_proposals_train=100", "max_proposals_test=100"],
        ["--batch-size", "2", "--lr", "1e-3"])
    images = sorted((tmp_path / "data").rglob("*.png"))[:1]
    result = fastdet("predict", "--checkpoint", checkpoint, *images, "--output", tmp_path / "pred", "--no-draw",
                     "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "pred" / "predictions.json").is_file()

    # `fastdet eval --proposals FILE`: the checkpoint's own selective search, computed beforehand and saved by image
    # id, gives the detections of the search run inside the model; other boxes in the file give other detections.
    from fastdet.cli._common import load_checkpoint, load_coco
    from fastdet.cli.evaluate import use_proposal_file
    from fastdet.data import make_data_loader
    from fastdet.eval import collect_detections

    data = tmp_path / "data"
    val = load_coco(data / "images", data / "annotations" / "instances_val.json")
    search = SelectiveSearchProposals("fast", max_proposals_train=100, max_proposals_test=100).eval()
    table = {int(target["image_id"]): search(image) for image, target in (val[i] for i in range(len(val)))}
    save_proposals(tmp_path / "val_proposals.pt", table)
    save_proposals(tmp_path / "whole.json", {i: torch.tensor([[0.0, 0.0, 96.0, 96.0]]) for i in table})
    model, spec = load_checkpoint(checkpoint, torch.device("cpu"))
    model.roi_heads.score_thresh = 0.0  # every candidate, so that the comparison sees many boxes
    loader = make_data_loader(val, batch_size=2)
    detections = {}
    for source in ("own", "val_proposals.pt", "whole.json"):
        if source != "own":
            use_proposal_file(model, tmp_path / source, val, spec["name"])
            assert model.needs_image_ids
        detections[source] = collect_detections(model, loader, "cpu")
    assert sum(len(d["boxes"]) for d in detections["own"]) > 20
    for own, from_file, whole in zip(*detections.values()):
        assert own["image_id"] == from_file["image_id"] == whole["image_id"]
        assert all(torch.equal(own[k], from_file[k]) for k in ("boxes", "scores", "labels"))
        assert len(whole["boxes"]) <= model.num_classes - 1  # one proposal: a box per foreground class at most
    result = fastdet("eval", "--checkpoint", checkpoint, "--data", data, "--split", "val", "--proposals",
                     tmp_path / "val_proposals.pt", "--output", tmp_path / "eval_file", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("eval", "eval_file")]
    assert metrics[0]["stats"] == metrics[1]["stats"]
    # an image without proposals, a broken file, an ensemble: exit 2 with the reason
    missing = dict(table)
    missing.pop(min(missing))
    save_proposals(tmp_path / "missing.pt", missing)
    for path, extra, message in [(tmp_path / "missing.pt", [], f"no proposals for 1 of the {len(val)} images"),
                                 (tmp_path / "nothing.json", [], "proposals file not found"),
                                 (tmp_path / "val_proposals.pt", ["--tta"], "one checkpoint without --tta")]:
        result = fastdet("eval", "--checkpoint", checkpoint, "--data", data, "--split", "val", "--proposals", path,
                         "--device", "cpu", *extra)
        assert result.returncode == 2 and message in result.stderr, result.stdout + result.stderr


def test_cli_trains_and_evaluates_on_a_proposals_file(tmp_path):
    """`fastdet train --model-arg proposal_generator=FILE`: checked before training (every image covered), trained
    with flips (the proposals ride in the targets and flip with the images), stored as an absolute path, and the
    checkpoint then evaluates on the file by image id."""
    from fastdet.cli._common import load_coco
    from fastdet.data import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", num_images=6, image_size=(96, 96), seed=5, max_objects=2)
    data = tmp_path / "data"
    ids = [int(r.image_id) for split in ("train", "val")
           for r in load_coco(data / "images", data / "annotations" / f"instances_{split}.json").records]
    g = torch.Generator().manual_seed(0)
    corners = torch.rand(len(ids), 40, 2, generator=g) * 60
    table = {i: torch.cat([c, c + 10 + torch.rand(40, 2, generator=g) * 30], 1) for i, c in zip(ids, corners)}
    save_proposals(tmp_path / "p.pt", table)
    save_proposals(tmp_path / "partial.pt", dict(list(table.items())[:-1]))
    train = ["train", "--data", data, "--model", "fast_rcnn_resnet18_fpn", "--model-arg", "min_size=96",
             "--model-arg", "max_size=96", "--output", tmp_path / "run", "--epochs", "1", "--warmup-iters", "0",
             "--workers", "0", "--no-progress", "--device", "cpu", "--batch-size", "2"]
    result = fastdet(*train, "--model-arg", f"proposal_generator={tmp_path / 'partial.pt'}")
    assert result.returncode == 2 and "no proposals for 1 of the" in result.stderr, result.stdout + result.stderr
    result = fastdet(*train, "--model-arg", "proposal_generator=p.pt", "--hflip", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    checkpoint = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)
    stored = checkpoint["config"]["extra"]["model"]["kwargs"]["proposal_generator"]
    assert stored == str((tmp_path / "p.pt").resolve())
    result = fastdet("eval", "--checkpoint", tmp_path / "run" / "last.pt", "--data", data, "--split", "val",
                     "--device", "cpu")
    assert result.returncode == 0 and "Average Precision" in result.stdout, result.stdout + result.stderr


def test_eval_proposal_files_need_a_detector_on_external_proposals():
    from fastdet.cli._common import CommandError
    from fastdet.cli.evaluate import use_proposal_file

    with pytest.raises(CommandError, match="makes its own proposals"):
        use_proposal_file(models.fasterrcnn_resnet18_fpn(num_classes=3), "p.json", None, "fasterrcnn_resnet18_fpn")


def test_torchvision_weights_enum_resolves_to_the_faster_rcnn_checkpoint(monkeypatch):
    from fastdet.models.weights import WeightsNotFoundError, resolve_weights

    monkeypatch.delenv("FASTDET_ALLOW_DOWNLOAD", raising=False)

    resolved = resolve_weights("COCO_V1", "FasterRCNN_ResNet50_FPN_Weights")
    assert "fasterrcnn_resnet50_fpn_coco" in resolved.url
    if not resolved.cache_path().is_file():
        with pytest.raises(WeightsNotFoundError, match="fasterrcnn_resnet50_fpn_coco"):
            fast_rcnn_resnet50_fpn(weights="COCO_V1")
    else:  # the published file is cached: it loads without its RPN, with its 91 classes
        model = fast_rcnn_resnet50_fpn(weights="COCO_V1")
        assert model.num_classes == 91 and not hasattr(model, "rpn")


def test_replace_class_heads():
    model = small_model()
    model.replace_class_heads(5)
    assert model.num_classes == 5 and model.roi_heads.box_predictor.bbox_pred.out_features == 20
    with pytest.raises(ValueError, match="num_classes"):
        model.replace_class_heads(1)


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
