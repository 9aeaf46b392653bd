"""scripts/compare_detectors.py: a --quick run of two small detectors through a subprocess (JSON per detector, resume,
--markdown), the table's formatting from hand-written results, and its argument errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "compare_detectors.py"


def compare(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)


def strict_json(path):
    def reject(token):
        raise ValueError(f"{path}: not JSON: {token}")

    return json.loads(Path(path).read_text(), parse_constant=reject)


def load_script():
    spec = importlib.util.spec_from_file_location("compare_detectors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_one_json_per_detector_resumes_and_prints_the_table(tmp_path):
    out = tmp_path / "compare"
    names = ["yolo", "ssd300_vgg16_light"]
    run = compare("--output", out, "--quick", "--models", ",".join(names), "--threads", "2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    import fastdet.models as models

    script = load_script()
    for name in names:
        result = strict_json(out / f"{name}.json")
        assert result["detector"] == name and result["quick"] is True
        # the parameter count of the architecture the script says it trained (4 classes: 3 shapes + background)
        model = getattr(models, name)(num_classes=4, **result["kwargs"])
        assert result["parameters"] == sum(p.numel() for p in model.parameters())
        assert result["steps"] == result["budget_steps"] == script.QUICK["steps"] and result["capped"] is False
        assert result["flops"] > 0 and result["fps"] > 0 and result["seconds_per_step"] > 0
        assert 0.0 <= result["AP"] <= result["AP50"] <= 1.0
        assert result["mask_AP"] is None  # box-only detectors
        assert result["threads"] == 2 and result["train_images"] >= 1 and result["test_images"] >= 1
    assert (out / "data" / "annotations" / "instances_test.json").is_file()

    # resuming skips what is done (the files stay as they were) and runs nothing
    before = {name: (out / f"{name}.json").read_bytes() for name in names}
    again = compare("--output", out, "--quick", "--models", ",".join(names))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already") == 2
    assert before == {name: (out / f"{name}.json").read_bytes() for name in names}

    table = compare("--output", out, "--markdown")
    assert table.returncode == 0, table.stderr[-3000:]
    lines = table.stdout.splitlines()
    assert lines[0].startswith("| detector | params (M) | GFLOPs |")
    rows = [line for line in lines if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == names  # the default list's order
    assert "QUICK smoke run" in table.stdout


def test_markdown_table_formats_results(tmp_path):
    script = load_script()
    common = {"kwargs": {}, "budget_steps": 300, "batch_size": 8, "threads": 2, "torch": "x", "train_images": 480,
              "test_images": 60, "quick": False, "time_cap": 1200.0}
    results = {
        "maskrcnn_resnet18_fpn": {"AP": 0.61234, "AP50": 0.9, "mask_AP": 0.55, "parameters": 30_910_000,
                                  "flops": 12_500_000_000, "fps": 3.25, "steps": 120, "capped": True,
                                  "train_seconds": 1200.4},
        "yolo": {"AP": 0.7, "AP50": 0.95, "mask_AP": None, "parameters": 1_770_000, "flops": 170_000_000,
                 "fps": 40.0, "steps": 300, "capped": False, "train_seconds": 250.0},
        "zz_new_detector": {"AP": None, "AP50": None, "mask_AP": None, "parameters": 1_000_000, "flops": 0,
                            "fps": 1.0, "steps": 300, "capped": False, "train_seconds": 10.0},
    }
    for name, values in results.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"detector": name, **common, **values}))
    (tmp_path / "unrelated.json").write_text(json.dumps({"something": 1}))  # not a result: ignored
    table = script.markdown_table(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert rows == [
        "| `yolo` | 1.77 | 0.17 | 40.0 | 0.700 | 0.950 | - | 300 | 250 |",
        "| `maskrcnn_resnet18_fpn` | 30.91 | 12.50 | 3.2 | 0.612 | 0.900 | 0.550 | 120 of 300 (capped) | 1200 |",
        "| `zz_new_detector` | 1.00 | 0.00 | 1.0 | - | - | - | 300 | 10 |",  # undefined AP (null) shows as -
    ]
    assert "480 training / 60 test images" in table and "QUICK" not in table
    assert "at most 300 steps or 1200 s of training each" in table


def test_bad_arguments_are_reported(tmp_path):
    run = compare("--output", tmp_path, "--models", "no_such_detector", "--quick")
    assert run.returncode != 0 and "no_such_detector" in run.stderr
    run = compare("--output", tmp_path, "--steps", "0", "--quick")
    assert run.returncode != 0 and "--steps must be positive" in run.stderr
    empty = compare("--output", tmp_path / "nothing", "--markdown")
    assert empty.returncode == 1


@pytest.mark.parametrize("name", ["fasterrcnn_resnet18_fpn", "maskrcnn_resnet18_fpn", "retinanet_resnet18_fpn",
                                  "fast_rcnn_resnet18_fpn", "sppnet_resnet18"])
def test_per_detector_settings_build(name):
    """The settings table's keyword arguments are accepted by the builders (a typo would fail the real run late)."""
    import fastdet.models as models

    script = load_script()
    model = getattr(models, name)(num_classes=4, **script.model_kwargs(name))
    assert model.transform.min_size[0] == script.IMAGE_SIZE
