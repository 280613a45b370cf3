#!/usr/bin/env bash
# .venv-triton-new: a venv that holds only Triton VERSION (the newest release, for the kernel
# tests) and takes everything else (CPU torch, pytest, hypothesis, ...) from .venv, which
# scripts/setup.sh sets up first: a .pth file adds .venv's site-packages after its own, so its
# Triton comes first and the whole cost is one Triton download (seconds when cached).
# Idempotent: its stamp records the version and the .venv it reads.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: scripts/setup_triton_new.sh TRITON_VERSION}
BASE=${VENV:-.venv}
NEW=${NEW_VENV:-.venv-triton-new}
base_lib=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stamp="$NEW/.epmoe-setup"
want="triton $VERSION over $base_lib"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
say() { [ -n "${QUIET:-}" ] || echo "setup: $*" >&2; }
say "$NEW: Triton $VERSION over $BASE's packages (about 150 MB: under a minute)"
start=$SECONDS
"$BASE/bin/python" -m venv --clear "$NEW"
new_lib=$("$NEW/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$base_lib')" > "$new_lib/_epmoe_base_venv.pth"
"$NEW/bin/python" -m pip install -q --no-deps "triton==$VERSION"
got=$("$NEW/bin/python" -c 'import triton; print(triton.__version__)')
[ "$got" = "$VERSION" ] || { echo "setup: $NEW imports Triton $got, not $VERSION" >&2; exit 1; }
echo "$want" > "$stamp"
say "  done in $((SECONDS - start)) s"
