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

# One quick probe (find_spec imports nothing) tells what is missing, so a ready environment costs no pip call.
probe() {
  "$PY" - <<'PYEOF'
import importlib.util
def have(*names):
    return all(importlib.util.find_spec(n) is not None for n in names)
print("torch-ok" if have("torch", "torchvision") else "torch-missing",
      "deps-ok" if have("setuptools", "wheel", "ninja", "numpy", "pytest", "pytest_benchmark", "PIL", "pycocotools",
                        "matplotlib", "tqdm", "yaml", "onnx", "onnxscript", "onnxruntime",
                        "faster_coco_eval", "ensemble_boxes", "cv2") else "deps-missing")
PYEOF
}
state=$(probe)
if [[ $state == *torch-missing* ]]; then
  echo "[fastdet] installing $TORCH_SPEC (a few minutes the first time)"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --disable-pip-version-check $TORCH_SPEC
fi
if [[ $state == *deps-missing* ]]; then
  "$PY" -m pip install -q --disable-pip-version-check "setuptools>=77" wheel ninja numpy "pytest>=8" \
    "pytest-benchmark>=4" pillow "pycocotools>=2.0.7" matplotlib tqdm pyyaml onnx onnxscript onnxruntime \
    faster-coco-eval ensemble-boxes opencv-contrib-python-headless
fi

# Rebuild only when something the build depends on changed: the native sources, the build scripts, torch, or the
# build settings. The stamp is a hash of all of them; a build that no longer loads is rebuilt whatever the stamp says.
# The build itself is incremental too: setup.py keeps its objects in build/temp-fastdet and ninja recompiles only
# the files that changed.
stamp_file="$VENV/.fastdet-build-stamp"
stamp=$(
  cd "$REPO" && {
    find csrc -type f | LC_ALL=C sort | xargs sha256sum
    sha256sum setup.py pyproject.toml
    # torch's version without importing torch (seconds): its dist-info names it
    "$PY" -c "import importlib.metadata as m; print(m.version('torch'))"
    echo "FASTDET_CUDA=${FASTDET_CUDA:-auto} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-}"
  } | sha256sum | cut -d' ' -f1
)
check_build='import fastdet._extension as e, os, sys
assert e.AVAILABLE, e.LOAD_ERROR
want_cuda = os.environ.get("FASTDET_CUDA", "").lower() in ("1", "true", "on", "yes")
assert e.WITH_CUDA or not want_cuda, "CUDA kernels were requested but are not loaded: %s" % e.CUDA_LOAD_ERROR
print("[fastdet] extension ready; CUDA kernels:", e.WITH_CUDA)'
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && (cd "$REPO" && "$PY" -c "$check_build" 2>/dev/null)
then
  echo "[fastdet] native sources unchanged since the last build: nothing to rebuild"
else
  # The CUDA toolkit may live outside the folder torch would guess from `which nvcc` (e.g. a wrapper script in
  # /usr/local/bin); setup.py finds it, and the headers a minimal toolkit lacks, by itself.
  echo "[fastdet] building the extension (FASTDET_CUDA=${FASTDET_CUDA:-auto}); a first CUDA build takes minutes"
  rm -f "$stamp_file"
  (cd "$REPO" && "$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .)
  (cd "$REPO" && "$PY" -c "$check_build")
  echo "$stamp" >"$stamp_file"
fi
