#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv, install what fastdet needs, and build the extension.
# Sourced by run_demo.sh and run_tests.sh; safe to run again (it only redoes what is missing).
#
# Settings (environment variables):
#   FASTDET_VENV          where the environment lives (default: <repo>/.venv)
#   FASTDET_TORCH_SPEC    torch requirement (default: torch==2.14.1 torchvision==0.29.1, the CUDA 13.0 build that
#                         this project's machines hold on disk; torchvision is only used by tests and benchmarks)
#   FASTDET_CUDA          1 = build the CUDA kernels (fail if impossible), 0 = CPU only, unset = automatic
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTDET_VENV:-$REPO/.venv}"
TORCH_SPEC="${FASTDET_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
PYTHON_BIN="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[fastdet] creating virtual environment in $VENV"
  "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[fastdet] installing $TORCH_SPEC (a few minutes the first time)"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --disable-pip-version-check $TORCH_SPEC
fi
"$PY" -m pip install -q --disable-pip-version-check "setuptools>=77" wheel ninja numpy "pytest>=8" "pytest-benchmark>=4" \
  pillow "pycocotools>=2.0.7" matplotlib tqdm pyyaml

# The CUDA toolkit may live outside the folder torch would guess from `which nvcc` (e.g. a wrapper script in
# /usr/local/bin); setup.py finds it, and the headers a minimal toolkit lacks, by itself.
echo "[fastdet] building the extension (FASTDET_CUDA=${FASTDET_CUDA:-auto}); the CUDA kernels take a few minutes"
(cd "$REPO" && "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .)
"$PY" -c "import fastdet, fastdet._extension as e; assert e.AVAILABLE, e.LOAD_ERROR; print('[fastdet] extension built; CUDA kernels:', e.WITH_CUDA)"
