#!/usr/bin/env bash
# The host-cost checks of one GPU call: the GPU tests of the launch / graph / HF paths, `bench layer
# --host` with the fast launcher on and off, `bench generate` (eager with graphs; static cache), and the
# deepseek-v3 layer with and without the shared experts' side stream, symm_a2a under SM budgets.
#   OUT=out bash scripts/gpu_host.sh [tests] [host] [generate] [static]
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for step in "$@"; do
    echo "=== $step $(date -u +%T)"
    case "$step" in
        tests) timeout ${TESTS_TIMEOUT:-200} "$PY" -m pytest -q -m gpu -p no:cacheprovider ${TEST_FILES:-tests/test_launch.py \
                  tests/test_hf.py tests/test_graphs.py tests/test_shared_stream.py tests/test_symm_split.py tests/test_symm_budget.py \
                  tests/test_eplb_replica_map.py tests/test_eplb.py tests/test_eplb_layer.py tests/test_split_phase.py} 2>&1 \
                  | tee "$OUT/tests.log" | tail -20 ;;
        host) for fl in 1 0; do
                  EPMOE_FAST_LAUNCH=$fl timeout 90 "$PY" -m epmoe.cli bench layer --host --preset qwen3-30b-a3b \
                      --tokens 1,16,128 --json "$OUT/host_fast$fl.json" 2>&1 | tail -18
              done ;;
        generate) timeout ${GEN_TIMEOUT:-200} "$PY" -m epmoe.cli bench generate --preset qwen3-30b-a3b --layers 48 \
                      --batch 1,16 --mode eager --prompt 128 --new 32 --graphs 64 --json "$OUT/generate_eager.json" 2>&1 | tail -12 ;;
        static) timeout ${STATIC_TIMEOUT:-150} "$PY" -m epmoe.cli bench generate --preset qwen3-30b-a3b --layers 8 \
                      --batch 1 --mode static --prompt 128 --new 32 --json "$OUT/generate_static.json" 2>&1 | tail -12 ;;
        shared) timeout ${SHARED_TIMEOUT:-90} "$PY" -m epmoe.cli bench layer --preset deepseek-v3 --world 1 --comm none \
                    --tokens 1,8,64,128 --shared-stream on,off,routed,shared --json "$OUT/layer_shared_stream.json" 2>&1 | tail -22 ;;
        budget) timeout ${BUDGET_TIMEOUT:-120} "$PY" -m epmoe.cli bench comm --preset deepseek-v3 --backend symm_a2a \
                    --world ${WORLD:-2} --tokens 1,128,4096 --sm-budget 4,8,16,32,all --json "$OUT/comm_sm_budget.json" 2>&1 | tail -20 ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
