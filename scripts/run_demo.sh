#!/usr/bin/env bash
# Set up everything (first run only) and run fastdet's main job, `fastdet demo`: generate the synthetic shapes
# dataset, train a small detector, evaluate it with pycocotools and write plots (runs/demo). Extra arguments go to
# `fastdet demo` (e.g. --output DIR, --device cuda, --require-targets).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/bootstrap.sh"
cd "$REPO"
exec "$PY" -m fastdet demo "$@"
