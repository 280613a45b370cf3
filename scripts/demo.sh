#!/usr/bin/env bash
# The main job: set up .venv if needed, then run `epmoe demo` (CPU gloo ranks, or GPUs when present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/epmoe" demo "$@"
