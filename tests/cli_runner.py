"""Running the `fastdet` command line as a user does (a subprocess of this interpreter), from the checkout's code."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def repo_env():
    """The environment with the checkout first on PYTHONPATH (the tests run fastdet from the checkout)."""
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_fastdet(*args, cwd=None, timeout=900):
    """``python -m fastdet ARGS``; returns the CompletedProcess (text stdout/stderr)."""
    return subprocess.run([sys.executable, "-m", "fastdet", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=repo_env(), timeout=timeout)


def train_then_evaluate(tmp_path, model, model_args=(), train_args=()):
    """``fastdet train`` of ``model`` for one epoch on ``tmp_path/data`` (CPU, no loader workers, no warm-up; extra
    ``--model-arg`` values and train options given), then ``fastdet eval`` of its last checkpoint on the val split.
    Asserts that both succeed, that the checkpoint and metrics.json exist and that AP is printed. Returns the
    checkpoint's path and the eval run."""
    run = run_fastdet("train", "--data", tmp_path / "data", "--model", model,
                      *[a for arg in model_args for a in ("--model-arg", arg)], "--output", tmp_path / "run",
                      "--epochs", "1", "--warmup-iters", "0", "--workers", "0", "--no-progress", "--device", "cpu",
                      *train_args)
    assert run.returncode == 0, run.stdout + run.stderr
    checkpoint = tmp_path / "run" / "last.pt"
    assert checkpoint.is_file()
    result = run_fastdet("eval", "--checkpoint", checkpoint, "--data", tmp_path / "data", "--split", "val",
                         "--output", tmp_path / "eval", "--device", "cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Average Precision" in result.stdout
    assert (tmp_path / "eval" / "metrics.json").is_file()
    return checkpoint, result
