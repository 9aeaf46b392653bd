#!/usr/bin/env bash
# Set up everything (first run only) and run fastdet's main job: for now a short showcase of the ops.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/scripts/bootstrap.sh"
exec "$PY" -m fastdet showcase "$@"
