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
