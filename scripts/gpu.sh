#!/usr/bin/env bash
# GPU checks and benchmarks in one call: GPU tests, then the benchmarks named as arguments.
#   bash scripts/gpu.sh tests experts comm layer     (logs and JSON under $OUT, default ./out)
# Steps: tests (gpu + multigpu), multitests (multigpu only), experts, comm (both presets of the
# multi-GPU runs, --store-crossovers; the crossover file is copied to $OUT), layer, probe
# (scripts/probe_symm_phases.py). WORLD (default: the GPU count) sets the ranks of comm / layer.
# Never uses NVLink multicast (shared hosts): the three variables below stay set for every child.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1
WORLD=${WORLD:-$(nvidia-smi -L | wc -l)}
TOKENS=${TOKENS:-1,8,64,128,512,2048,4096}
for step in "$@"; do
    echo "=== $step $(date +%T)"
    case "$step" in
        tests) timeout ${TESTS_TIMEOUT:-900} "$PY" -m pytest -q -m "gpu or multigpu" -p no:cacheprovider --durations=25 \
                  ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1; tail -60 "$OUT/tests.log" ;;
        experts) "$PY" -m epmoe.bench.experts ${EXPERTS_ARGS:---preset qwen3-30b-a3b --tokens 1,128,4096 --format bf16,fp8,fp8-block,nvfp4 --routing uniform --iters 8} --json "$OUT/experts.json" 2>&1 | tail -60 ;;
        multitests) timeout ${TESTS_TIMEOUT:-900} "$PY" -m pytest -q -m multigpu -p no:cacheprovider --durations=25 \
                  ${PYTEST_ARGS:-} > "$OUT/multitests.log" 2>&1; tail -40 "$OUT/multitests.log" ;;
        comm) if [ -n "${COMM_ARGS:-}" ]; then
                  "$PY" -m epmoe.cli bench comm $COMM_ARGS --json "$OUT/comm.json" 2>&1 | tail -40
              else
                  "$PY" -m epmoe.cli bench comm --preset deepseek-v3 --tokens "$TOKENS" --backend all --world "$WORLD" \
                      --payload bf16,fp8 --store-crossovers --json "$OUT/comm_deepseek-v3.json" 2>&1 | tail -40
                  "$PY" -m epmoe.cli bench comm --preset qwen3-30b-a3b --tokens "$TOKENS" --backend all --world "$WORLD" \
                      --payload bf16 --json "$OUT/comm_qwen3-30b-a3b.json" 2>&1 | tail -30
              fi
              [ -f epmoe/tuning/crossovers.json ] && cp epmoe/tuning/crossovers.json "$OUT/" ;;
        layer) if [ -n "${LAYER_ARGS:-}" ]; then
                   "$PY" -m epmoe.cli bench layer $LAYER_ARGS --json "$OUT/layer.json" 2>&1 | tail -30
               else
                   for preset in deepseek-v3 qwen3-30b-a3b; do
                       "$PY" -m epmoe.cli bench layer --preset "$preset" --tokens 1,128,1024,4096 --comm all \
                           --world "$WORLD" --json "$OUT/layer_$preset.json" 2>&1 | tail -20
                   done
               fi ;;
        probe) "$PY" scripts/probe_symm_phases.py ${PROBE_ARGS:-deepseek-v3,qwen3-30b-a3b 128,4096 --nccl} \
                   > "$OUT/probe.log" 2>&1; tail -30 "$OUT/probe.log" ;;
        *) echo "unknown step $step (tests, multitests, experts, comm, layer, probe)" >&2; exit 2 ;;
    esac
done
