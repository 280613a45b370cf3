#!/usr/bin/env bash
# The CI test run: lint, the Triton kernel tests (the CPU interpreter) under the newest Triton
# release pyproject.toml allows, in .venv-triton-new (scripts/setup_triton_new.sh: that Triton
# over .venv's packages, set up once and kept between runs), then the whole CPU test suite in
# .venv (Triton 3.6). Fails when either pytest run fails or collects no test. Arguments go to
# the whole suite's pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
NEW_VENV=${NEW_VENV:-.venv-triton-new}
NEW_TRITON=3.9.0  # the newest Triton release; pyproject.toml's upper bound follows it
KERNEL_TESTS=(tests/test_combine_kernel.py tests/test_routing_kernel.py tests/test_triton_runner.py
              tests/test_quant.py tests/test_symm_a2a.py)

run_pytest() {  # run_pytest PYTHON ARGS...: pytest's status, "no test collected" (5) failing too
    "$1" -m pytest -q -m "not gpu and not multigpu" "${@:2}"
    local rc=$?
    if [ "$rc" -eq 5 ]; then
        echo "pytest collected no tests: failing" >&2
        return 1
    fi
    return "$rc"
}

bash scripts/setup.sh || exit 1
"$VENV/bin/ruff" check epmoe tests || exit 1

start=$SECONDS
NEW_VENV=$NEW_VENV bash scripts/setup_triton_new.sh "$NEW_TRITON" || exit 1
versions=$("$NEW_VENV/bin/python" -c 'import torch, triton; print(f"Triton {triton.__version__}, torch {torch.__version__}")')
echo "kernel tests under $versions"
run_pytest "$NEW_VENV/bin/python" -p no:cacheprovider "${KERNEL_TESTS[@]}"
new_rc=$?
echo "kernel tests under $versions: $((SECONDS - start)) s (setup included)"

echo "the CPU test suite"
run_pytest "$VENV/bin/python" "$@"
rc=$?
[ "$new_rc" -ne 0 ] && exit "$new_rc"
exit "$rc"
