#!/usr/bin/env bash
# GPU checks and benchmarks in one call: GPU tests, then the benchmarks named as arguments.
#   bash scripts/gpu.sh tests experts comm layer     (logs and JSON under $OUT, default ./out)
# Never uses NVLink multicast (shared hosts): the three variables below stay set for every child.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m >> "$OUT/gpu.txt" 2>&1
for step in "$@"; do
    echo "=== $step $(date +%T)"
    case "$step" in
        tests) timeout ${TESTS_TIMEOUT:-900} "$PY" -m pytest -q -m "gpu or multigpu" -p no:cacheprovider --durations=25 \
                  ${PYTEST_ARGS:-} > "$OUT/tests.log" 2>&1; tail -60 "$OUT/tests.log" ;;
        experts) "$PY" -m epmoe.bench.experts ${EXPERTS_ARGS:---preset qwen3-30b-a3b --tokens 1,128,4096 --format bf16,fp8,fp8-block,nvfp4 --routing uniform --iters 8} --json "$OUT/experts.json" 2>&1 | tail -60 ;;
        comm) "$PY" -m epmoe.cli bench comm ${COMM_ARGS:---preset deepseek-v3 --tokens 1,128,512,4096 --backend all --world 4 --payload bf16,fp8} --json "$OUT/comm.json" 2>&1 | tail -40 ;;
        layer) "$PY" -m epmoe.cli bench layer ${LAYER_ARGS:---preset qwen3-30b-a3b --tokens 1,128,1024,4096 --comm all --world 1} --json "$OUT/layer.json" 2>&1 | tail -30 ;;
        *) echo "unknown step $step (tests, experts, comm, layer)" >&2; exit 2 ;;
    esac
done
