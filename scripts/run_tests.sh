#!/usr/bin/env bash
# Set up everything (first run only), then run the test suite and a smoke pass over the benchmarks.
# pytest exits 5 when it collects no tests; with `set -e` that fails this script like any other error.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/bootstrap.sh"
cd "$REPO"
"$PY" -m pytest tests -q "$@"
if [ -d benchmarks ] && ls benchmarks/test_*.py >/dev/null 2>&1; then
  "$PY" -m pytest benchmarks -q --benchmark-disable
fi
