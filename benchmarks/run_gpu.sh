#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: build fastdet's extension (CUDA kernels included) against that machine's
# torch, run the CUDA tests, run the CUDA benchmarks, and write into $OUT (default ./gpu-results):
#   build.log, tests-cuda.log, bench.log, bench-gpu.json, RESULTS.md (the repo's RESULTS.md with this GPU's section
#   added or replaced: copy it over benchmarks/RESULTS.md to record it), nvidia-smi.txt.
# Needs python3 with torch (CUDA build), torchvision, pytest, pytest-benchmark and ninja; no network.
# Exit status: 1 if the build fails (nothing else runs), otherwise non-zero if the tests or the benchmarks failed.
# Environment knobs: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: the visible GPU's), MAX_JOBS,
# BENCH_SELECT (pytest -m expression for the benchmarks; default "cuda", "" runs the CPU benchmarks as well),
# BENCH_ARGS (more pytest arguments for the benchmarks, word-split, e.g. "-k nms").
set -u

PYTHON=${PYTHON:-python3}
out=${OUT:-./gpu-results}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1

log() { echo "run_gpu.sh: $*" >&2; }

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed (see nvidia-smi.txt)"
arch=$("$PYTHON" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("%d.%d" % torch.cuda.get_device_capability())') || { log "torch sees no CUDA GPU; nothing to measure"; exit 2; }
# Build only for the GPU in this machine: one architecture compiles several times faster than a list of them.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
log "building with FASTDET_CUDA=1, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"

FASTDET_CUDA=1 "$PYTHON" setup.py build_ext --inplace >"$out/build.log" 2>&1
build_status=$?
if [ $build_status -ne 0 ]; then
  tail -n 40 "$out/build.log" >&2
  log "build failed (exit $build_status); full log in $out/build.log"
  exit 1
fi
# A build that succeeds but cannot be imported (e.g. a torch mismatch) is a failed build too.
if ! "$PYTHON" -c 'from fastdet import _extension as e
assert e.AVAILABLE, e.LOAD_ERROR
assert e.WITH_CUDA, "fastdet._C was built without CUDA kernels"' >>"$out/build.log" 2>&1; then
  tail -n 5 "$out/build.log" >&2
  log "the built extension does not load with CUDA kernels; see $out/build.log"
  exit 1
fi

status=0
if [ -d tests ]; then
  "$PYTHON" -m pytest tests -m cuda -ra 2>&1 | tee "$out/tests-cuda.log"
  tests_status=${PIPESTATUS[0]}
  if [ "$tests_status" -eq 5 ]; then
    log "no CUDA tests were collected (pytest exit 5)"
  elif [ "$tests_status" -ne 0 ]; then
    log "CUDA tests failed (pytest exit $tests_status); benchmarking anyway"
    status=$tests_status
  fi
else
  echo "no tests/ folder in this checkout: CUDA tests not run" | tee "$out/tests-cuda.log"
fi

select=${BENCH_SELECT-cuda}
# shellcheck disable=SC2086  # BENCH_ARGS is meant to be split into words
"$PYTHON" -m pytest benchmarks --benchmark-only ${select:+-m "$select"} ${BENCH_ARGS:-} -ra \
  --benchmark-json="$out/bench-gpu.json" 2>&1 | tee "$out/bench.log"
bench_status=${PIPESTATUS[0]}
[ "$bench_status" -ne 0 ] && { log "benchmarks failed (pytest exit $bench_status)"; status=$bench_status; }

if [ -s "$out/bench-gpu.json" ]; then
  [ -f benchmarks/RESULTS.md ] && cp benchmarks/RESULTS.md "$out/RESULTS.md"
  "$PYTHON" benchmarks/report.py "$out/bench-gpu.json" --output "$out/RESULTS.md" || status=1
fi
log "done (exit $status); results in $out"
exit $status
