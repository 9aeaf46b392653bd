"""The `fastdet` command line, through subprocesses as a user runs it: help, exit codes, and the demo -> eval ->
predict chain on a quick run."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import REPO, repo_env, run_fastdet

COMMANDS = ["demo", "train", "eval", "predict", "proposals", "convert", "bench", "showcase"]


def fastdet(*args, cwd=None, timeout=600):
    return run_fastdet(*args, cwd=cwd, timeout=timeout)


def strict_json(path):
    """The JSON file at ``path``, parsed strictly: Python's bare ``NaN`` / ``Infinity`` are not JSON."""

    def reject(token):
        raise ValueError(f"{path}: not JSON: {token}")

    return json.loads(Path(path).read_text(), parse_constant=reject)


def test_top_level_help_lists_every_command_and_exit_codes():
    result = fastdet("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout
    assert "Exit codes" in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = fastdet(command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: fastdet {command}" in result.stdout


def test_eval_help_names_the_checkpoint_path_the_demo_writes():
    # The demo's trainer writes its checkpoints to OUTPUT/run (default OUTPUT: runs/demo), not to OUTPUT itself.
    assert "(default: runs/demo)" in fastdet("demo", "--help").stdout
    result = fastdet("eval", "--help")
    assert result.returncode == 0, result.stderr
    assert "runs/demo/run/best.pt" in result.stdout
    assert "runs/demo/best.pt" not in result.stdout


def test_bench_help_points_to_files_that_exist():
    result = fastdet("bench", "--help")
    assert result.returncode == 0, result.stderr
    named = re.findall(r"benchmarks/[\w./-]*\w", result.stdout)
    assert {"benchmarks/README.md", "benchmarks/RESULTS.md"} <= set(named), named
    assert "pytest benchmarks --benchmark-only" in " ".join(result.stdout.split())
    for path in named:
        assert (REPO / path).exists(), path


def test_benchmarks_readme_names_files_that_exist():
    text = (REPO / "benchmarks" / "README.md").read_text()
    named = set(re.findall(r"[\w/.-]+\.(?:py|sh|md)\b", text))
    assert {"benchmarks/report.py", "benchmarks/run_gpu.sh", "RESULTS.md"} <= named, named
    for path in named:
        assert (REPO / path).exists() or (REPO / "benchmarks" / path).exists(), path


def test_demo_predict_hint_is_runnable_as_printed(tmp_path):
    from fastdet.cli.demo import predict_command

    folder = tmp_path / "a folder"
    argv = shlex.split(predict_command(folder / "run" / "last.pt", folder / "data" / "images", folder / "predict"))
    assert argv == [sys.executable, "-m", "fastdet", "predict", "--checkpoint", str(folder / "run" / "last.pt"),
                    str(folder / "data" / "images"), "--output", str(folder / "predict")]
    assert os.path.isabs(argv[0])
    # relative paths come out absolute, so the command works from any directory
    relative = shlex.split(predict_command(Path("runs/demo/run/last.pt"), Path("runs/demo/data/images"),
                                           Path("runs/demo/predict")))
    assert relative[5] == str(Path.cwd() / "runs/demo/run/last.pt")


def test_no_command_is_a_usage_error():
    result = fastdet()
    assert result.returncode == 2
    assert "required" in result.stderr


def test_missing_checkpoint_is_reported_with_exit_code_2(tmp_path):
    result = fastdet("predict", "--checkpoint", tmp_path / "nope.pt", tmp_path)
    assert result.returncode == 2
    assert "nope.pt" in result.stderr and "Traceback" not in result.stderr


def test_foreign_checkpoint_is_rejected(tmp_path):
    import torch

    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    result = fastdet("eval", "--checkpoint", path, "--data", tmp_path)
    assert result.returncode == 2
    assert "not a fastdet training checkpoint" in result.stderr


def test_unknown_model_is_reported(tmp_path):
    from fastdet.data import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", num_images=10, image_size=(64, 64), seed=1)
    result = fastdet("train", "--data", tmp_path / "data", "--model", "no_such_model", "--output", tmp_path / "run",
                     "--epochs", 1, "--workers", 0)
    assert result.returncode == 2
    assert "unknown detector 'no_such_model'" in result.stderr


def test_convert_coco_to_yolo_reports_what_is_lost(tmp_path):
    from fastdet.data import make_shapes_dataset

    make_shapes_dataset(tmp_path / "coco", num_images=12, image_size=(64, 64), seed=2)
    result = fastdet("convert", tmp_path / "coco", tmp_path / "yolo", "--from", "coco", "--to", "yolo")
    assert result.returncode == 0, result.stderr
    assert "12 images" in result.stdout
    assert (tmp_path / "yolo" / "data.yaml").is_file()
    # and back, with a new split
    result = fastdet("convert", tmp_path / "yolo", tmp_path / "back", "--from", "yolo", "--to", "coco",
                     "--split", "0.5", "0.25", "0.25", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "back" / "annotations" / "instances_train.json").is_file()


def test_convert_bad_format_is_a_usage_error(tmp_path):
    result = fastdet("convert", tmp_path, tmp_path / "out", "--from", "pascal", "--to", "coco")
    assert result.returncode == 2


def test_bench_prints_a_table_and_agrees_with_torchvision():
    pytest.importorskip("torchvision")
    result = fastdet("bench", "--scale", "0.02", "--repeat", "1", "--no-reference", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    for op in ("nms", "batched_nms", "box_iou", "roi_align", "roi_pool", "sigmoid_focal_loss"):
        assert op in result.stdout
    assert " NO" not in result.stdout


def test_quick_demo_then_eval_and_predict_on_its_checkpoint(tmp_path):
    out = tmp_path / "demo"
    result = fastdet("demo", "--quick", "--output", out, "--no-progress", "--workers", "0", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("AP50", "per-class AP", "test AP50"):
        assert name in result.stdout
    for png in ("pr_curve.png", "f1_confidence.png", "confusion_matrix.png"):
        assert (out / "eval" / png).stat().st_size > 0
    assert list((out / "detections").glob("*.png"))
    checkpoint = out / "run" / "last.pt"
    assert checkpoint.is_file()
    assert (out / "run" / "best.pt").is_file()  # the example of `fastdet eval --help`
    # metrics.json is strict JSON even where a statistic is undefined (NaN in Python): null there
    assert set(strict_json(out / "eval" / "metrics.json")["stats"]) >= {"AP", "AP50", "APl"}

    # the closing hint runs as printed, from another directory, without an activated environment (PYTHONPATH only
    # because the tests run fastdet from the checkout, not installed)
    hint = result.stdout.strip().splitlines()[-1]
    argv = shlex.split(hint)
    assert argv[:4] == [sys.executable, "-m", "fastdet", "predict"], hint
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    hinted = subprocess.run(argv + ["--device", "cpu"], capture_output=True, text=True, cwd=elsewhere, env=repo_env(),
                            timeout=600)
    assert hinted.returncode == 0, hinted.stdout + hinted.stderr
    assert strict_json(out / "predict" / "predictions.json")

    result = fastdet("eval", "--checkpoint", checkpoint, "--data", out / "data", "--split", "val", "--output",
                     tmp_path / "eval", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = strict_json(tmp_path / "eval" / "metrics.json")
    assert set(metrics["stats"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}

    images = sorted((out / "data" / "images").glob("*.png"))[:2]
    result = fastdet("predict", "--checkpoint", checkpoint, *images, "--output", tmp_path / "pred",
                     "--score-threshold", "0.0", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    predictions = strict_json(tmp_path / "pred" / "predictions.json")
    assert [Path(p["file"]).name for p in predictions] == [p.name for p in images]
    for entry in predictions:
        for det in entry["detections"]:
            assert len(det["box_xyxy"]) == 4 and 0.0 <= det["score"] <= 1.0 and det["class_name"]
    assert len(list((tmp_path / "pred").glob("*_detections.png"))) == 2

    # a corrupt image is named in the error
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    result = fastdet("predict", "--checkpoint", checkpoint, bad, "--output", tmp_path / "pred2", "--device", "cpu")
    assert result.returncode == 2
    assert "bad.png" in result.stderr


class _TwoBoxModel:
    """Two fixed detections per image (labels 1 and 2): a stand-in detector for `fastdet eval`'s reporting."""

    training = False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, images):
        import torch

        return [{"boxes": torch.tensor([[2.0, 2.0, 30.0, 30.0], [10.0, 10.0, 50.0, 40.0]]),
                 "scores": torch.tensor([0.9, 0.6]), "labels": torch.tensor([1, 2])} for _ in images]


@pytest.mark.parametrize("backend", ["native", "pycocotools"])
def test_eval_report_confusion_matrix_per_backend(tmp_path, monkeypatch, backend):
    """`fastdet eval`'s report draws the confusion matrix from the native evaluator's class-agnostic COCO matching on
    the native backend, and from the IoU matcher on pycocotools."""
    import numpy as np
    import torch

    import fastdet.eval
    from fastdet.cli._common import load_coco
    from fastdet.cli.evaluate import evaluate_and_report
    from fastdet.data import make_shapes_dataset, to_coco_dict
    from fastdet.eval import confusion_matrix, confusion_matrix_from_evaluation, targets_from_coco

    paths = make_shapes_dataset(tmp_path / "data", num_images=8, image_size=(64, 64), seed=5)
    dataset = load_coco(paths["images"], paths["test"])
    drawn = {}
    plot = fastdet.eval.plot_confusion_matrix

    def recording_plot(matrix, path, names):
        drawn.update(matrix=matrix, names=names)
        return plot(matrix, path, names)

    monkeypatch.setattr(fastdet.eval, "plot_confusion_matrix", recording_plot)
    evaluation = evaluate_and_report(_TwoBoxModel(), dataset, torch.device("cpu"), None, tmp_path / "eval",
                                     quiet=True, backend=backend)
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 0
    if backend == "native":
        expected = confusion_matrix_from_evaluation(evaluation)
        assert drawn["names"] == evaluation.category_names
    else:
        targets = targets_from_coco(to_coco_dict(dataset), [d["image_id"] for d in evaluation.detections],
                                    dataset.label_to_category_id)
        expected = confusion_matrix(evaluation.detections, targets, len(dataset.class_names))
        assert drawn["names"] == list(dataset.class_names)
    np.testing.assert_array_equal(drawn["matrix"], expected)
    assert drawn["matrix"].sum() > 0


class _MaskModel(_TwoBoxModel):
    """_TwoBoxModel's detections with a mask each (filled boxes): a stand-in mask model for the report."""

    def __call__(self, images):
        import torch

        outputs = super().__call__(images)
        for image, output in zip(images, outputs):
            masks = torch.zeros(2, 1, *image.shape[-2:])
            for k, (x1, y1, x2, y2) in enumerate(output["boxes"].int().tolist()):
                masks[k, 0, y1:y2, x1:x2] = 0.9
            output["masks"] = masks
        return outputs


def test_eval_report_of_a_mask_model_has_the_mask_task_curves(tmp_path):
    import torch

    from fastdet.cli._common import load_coco
    from fastdet.cli.evaluate import evaluate_and_report
    from fastdet.data import make_shapes_dataset

    paths = make_shapes_dataset(tmp_path / "data", num_images=8, image_size=(64, 64), seed=5, masks=True)
    dataset = load_coco(paths["images"], paths["test"])
    evaluation = evaluate_and_report(_MaskModel(), dataset, torch.device("cpu"), None, tmp_path / "eval", quiet=True)
    assert evaluation.segm is not None and evaluation.segm.matches is not None
    for png in ("pr_curve.png", "f1_confidence.png", "segm_pr_curve.png", "segm_f1_confidence.png"):
        assert (tmp_path / "eval" / png).stat().st_size > 0
    metrics = strict_json(tmp_path / "eval" / "metrics.json")
    assert set(metrics["segm_stats"]) >= {"AP", "AP50"}


def test_mask_rcnn_trains_evaluates_and_predicts_from_the_command_line(tmp_path):
    from fastdet.data import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", num_images=8, image_size=(64, 64), seed=3, masks=True,
                        split=(0.5, 0.5, 0.0))
    tiny = ["--model-arg", "min_size=64", "--model-arg", "max_size=64", "--model-arg", "rpn_batch_size_per_image=32",
            "--model-arg", "box_batch_size_per_image=32"]
    result = fastdet("train", "--model", "maskrcnn_resnet18_fpn", *tiny, "--data", tmp_path / "data", "--output",
                     tmp_path / "run", "--epochs", "1", "--batch-size", "2", "--workers", "0", "--no-progress",
                     "--device", "cpu", "--warmup-iters", "0", "--lr", "0.005")
    assert result.returncode == 0, result.stdout + result.stderr
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_segm_AP" in row for row in logged)  # the epoch's validation reports mask AP too
    checkpoint = tmp_path / "run" / "last.pt"
    result = fastdet("eval", "--checkpoint", checkpoint, "--data", tmp_path / "data", "--split", "val", "--output",
                     tmp_path / "eval", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mask (segm)" in result.stdout and (tmp_path / "eval" / "segm_pr_curve.png").is_file()
    image = sorted((tmp_path / "data" / "images").glob("*.png"))[0]
    result = fastdet("predict", "--checkpoint", checkpoint, image, "--output", tmp_path / "pred",
                     "--score-threshold", "0.0", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    detections = strict_json(tmp_path / "pred" / "predictions.json")[0]["detections"]
    assert all("segmentation" in d for d in detections)
