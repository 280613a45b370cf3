#!/usr/bin/env bash
# Create .venv and install epmoe with its test and benchmark extras, CPU build of torch.
# Idempotent: a second run only re-installs epmoe itself when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.epmoe-setup"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
    exit 0
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), "epmoe needs Python >= 3.10"'
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip setuptools wheel 2>/dev/null || true
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    # The CPU build of torch: a local wheel where the machine keeps one, else PyTorch's CPU index.
    pip install -q "torch==2.13.0+cpu" 2>/dev/null \
        || pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
# Triton 3.6 matches the GPU machines the kernels are tuned on; its interpreter runs on the CPU.
if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
    pip install -q "triton==3.6.0" 2>/dev/null || pip install -q "triton>=3.2"
fi
pip install -q -e ".[test,bench]"
touch "$stamp"
