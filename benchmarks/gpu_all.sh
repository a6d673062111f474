#!/usr/bin/env bash
# Every GPU-side check and measurement in one run, most important first, for a short loan of a GPU
# machine (a session gets 15 minutes of device time, the machine's start included; this run took
# 5 minutes on an H200 in run 4, much of it Triton compiling and the 8B-shaped model's start-ups):
#   1. gpu_gemv.py: the decode GEMV's correctness on the device (every variant and tile, the Gluon
#      words GEMV's too), its tile shapes swept against cuBLAS / dequantize + cuBLAS /
#      torch._scaled_mm, the best saved and used by the steps after it;
#   2. gpu_bench.py, 8B-shaped: batch-1 decode with graphs against the HBM roofline, offline
#      throughput, and int8 / int4 / fp8 against the roofline of their own bytes;
#   3. the Triton kernel tests no GPU has run yet (the words GEMV, the float8 GEMV, a Q4_K_M GGUF,
#      packed checkpoints); 4. gpu_check.py: every Triton kernel against the torch reference,
#      graphs against eager; 5. gpu_profile.py; 6. the 284M model; 7. the other kernel tests.
# Runs 1-3 (benchmarks/results/h200-gpu-run*.log) also measured eager mode, graphs without the
# GEMV, and decode attention split in 64-key partitions (LLAMA3_DIST_DECODE_MIN_PARTITION=64).
# Each step has its own time limit, so one that hangs does not take the others' output with it.
#     OUT=/tmp/gpu-out bash benchmarks/gpu_all.sh      # the log and the chosen tile shapes in $OUT
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
step() {
    local limit=$1
    shift
    echo "# $* (limit ${limit} s)"
    local started=$SECONDS
    timeout -k 5 "$limit" "$@"
    echo "# exit $? after $((SECONDS - started)) s"
}
{
    date -u +%FT%TZ
    git log -1 --format='commit %h %s' 2>/dev/null
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    step 150 python3 benchmarks/gpu_gemv.py --write-configs "$OUT/gemv-configs.json"
    if [ -s "$OUT/gemv-configs.json" ]; then
        LLAMA3_DIST_GEMV_CONFIGS="$(cat "$OUT/gemv-configs.json")"
        export LLAMA3_DIST_GEMV_CONFIGS
        echo "# LLAMA3_DIST_GEMV_CONFIGS=$LLAMA3_DIST_GEMV_CONFIGS"
    fi
    step 140 python3 benchmarks/gpu_bench.py --models 8b --modes graphs --quantizations int8,int4,fp8
    step 80 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernels.py \
        -k "words or fp8 or q4_k_m or packed_checkpoints"
    step 40 python3 benchmarks/gpu_check.py
    step 25 python3 benchmarks/gpu_profile.py
    step 25 python3 benchmarks/gpu_bench.py --models 284m --modes graphs
    step 60 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_kernels.py \
        -k "not (words or fp8 or q4_k_m or packed_checkpoints)"
} 2>&1 | tee "$OUT/gpu-all.log"
