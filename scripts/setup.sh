#!/usr/bin/env bash
# Create .venv and install epmoe with its test and benchmark extras, CPU build of torch.
# Idempotent: a second run only re-installs epmoe itself when pyproject.toml changed.
# Says what it installs and roughly how long each step takes (the first run: a few minutes,
# most of it downloading torch and triton); QUIET=1 silences the progress lines.
# VENV, TRITON_VERSION and EXTRAS choose another environment (the stamp records the last two).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
# Triton 3.6 matches the GPU machines the kernels are tuned on; its interpreter runs on the CPU.
TRITON_VERSION=${TRITON_VERSION:-3.6.0}
EXTRAS=${EXTRAS:-test,bench}
stamp="$VENV/.epmoe-setup"
want="triton $TRITON_VERSION, extras $EXTRAS"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ] \
        && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
say() { [ -n "${QUIET:-}" ] || echo "setup: $*" >&2; }
step_start=$SECONDS
done_step() { say "  done in $((SECONDS - step_start)) s"; step_start=$SECONDS; }
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), "epmoe needs Python >= 3.10"'
if [ ! -x "$VENV/bin/python" ]; then
    say "[1/5] creating $VENV with $("$PY" --version 2>&1)"
    "$PY" -m venv "$VENV"
    done_step
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
say "[2/5] upgrading pip, setuptools, wheel (seconds)"
pip install -q --upgrade pip setuptools wheel 2>/dev/null || true
done_step
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    # The CPU build of torch: a local wheel where the machine keeps one, else PyTorch's CPU index.
    say "[3/5] PyTorch, CPU build (about 200 MB from download.pytorch.org: 1-5 min)"
    pip install -q "torch==2.13.0+cpu" 2>/dev/null \
        || pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    done_step
else
    say "[3/5] PyTorch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
fi
triton_version=$("$VENV/bin/python" -c 'import triton; print(triton.__version__)' 2>/dev/null || true)
if [ "$triton_version" = "$TRITON_VERSION" ]; then
    say "[4/5] Triton $TRITON_VERSION already installed"
elif [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
    say "[4/5] Triton $TRITON_VERSION (about 150 MB: under a minute to a few)"
    pip install -q "triton==$TRITON_VERSION" 2>/dev/null || pip install -q "triton>=3.6,<3.10"
    done_step
else
    say "[4/5] no Triton wheel for $(uname -s) $(uname -m): skipped"
fi
say "[5/5] epmoe (editable) with its extras [$EXTRAS] (test: transformers, pytest, hypothesis, ruff; bench: matplotlib, tqdm; about 100 MB: 1-2 min)"
pip install -q -e ".[$EXTRAS]"
done_step
echo "$want" > "$stamp"
say "ready: $VENV ($(( SECONDS )) s in all)"
