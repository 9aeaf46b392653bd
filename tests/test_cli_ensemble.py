"""``fastdet predict`` with several checkpoints (--ensemble) and --tta, on untrained checkpoints of the demo model."""

from __future__ import annotations

import json

import torch

from fastdet.cli import main
from fastdet.cli._common import build_model, model_spec
from fastdet.models.recipes import demo_recipe


def _checkpoint(path, seed, class_names=("circle", "square")):
    recipe = demo_recipe(quick=True)
    torch.manual_seed(seed)
    model = build_model(recipe["model"], len(class_names) + 1, **recipe["model_kwargs"])
    spec = model_spec(recipe["model"], len(class_names) + 1, recipe["model_kwargs"], class_names, {})
    torch.save({"model": model.state_dict(), "config": {"extra": {"model": spec}}}, path)
    return path


def _image(path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(64, 80, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def test_predict_ensembles_two_checkpoints_with_tta(tmp_path, capsys):
    a, b = _checkpoint(tmp_path / "a.pt", 1), _checkpoint(tmp_path / "b.pt", 2)
    image = _image(tmp_path / "img.png")
    for method in ("wbf", "nmw", "nms", "soft-nms"):
        out = tmp_path / method
        code = main(["predict", "--checkpoint", str(a), "--checkpoint", str(b), str(image), "--output", str(out),
                     "--ensemble", method, "--tta", "--score-threshold", "0.0", "--no-draw", "--device", "cpu"])
        assert code == 0, capsys.readouterr()
        predictions = json.loads((out / "predictions.json").read_text())
        assert len(predictions) == 1
        for det in predictions[0]["detections"]:
            assert len(det["box_xyxy"]) == 4 and det["class_name"] in ("circle", "square")


def test_predict_rejects_checkpoints_of_different_classes(tmp_path, capsys):
    a = _checkpoint(tmp_path / "a.pt", 1)
    b = _checkpoint(tmp_path / "b.pt", 2, class_names=("cat", "dog"))
    code = main(["predict", "--checkpoint", str(a), "--checkpoint", str(b), str(_image(tmp_path / "i.png")),
                 "--output", str(tmp_path / "o"), "--device", "cpu"])
    assert code == 2
    assert "classes differ" in capsys.readouterr().err


def test_eval_ensemble_with_tta(tmp_path, capsys):
    from fastdet.data import make_shapes_dataset

    paths = make_shapes_dataset(tmp_path / "data", num_images=6, image_size=(64, 64), split=(0.5, 0.5, 0.0))
    categories = json.loads(paths["val"].read_text())["categories"]
    names = tuple(c["name"] for c in sorted(categories, key=lambda c: c["id"]))
    a, b = _checkpoint(tmp_path / "a.pt", 1, names), _checkpoint(tmp_path / "b.pt", 2, names)
    code = main(["eval", "--checkpoint", str(a), "--checkpoint", str(b), "--data", str(tmp_path / "data"), "--split",
                 "val", "--ensemble", "soft-nms", "--tta", "--device", "cpu", "--output", str(tmp_path / "eval")])
    assert code == 0, capsys.readouterr()
    assert "AP" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["stats"]
