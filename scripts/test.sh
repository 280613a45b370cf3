#!/usr/bin/env bash
# The CI test run: lint, then the CPU test suite. Fails when pytest collects no test.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
bash scripts/setup.sh || exit 1
"$VENV/bin/ruff" check epmoe tests || exit 1
"$VENV/bin/python" -m pytest -q -m "not gpu and not multigpu" "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
