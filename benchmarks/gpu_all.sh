#!/usr/bin/env bash
# Every GPU-side check and measurement in one run (5.3 minutes on an H200 in run 3, most of it
# Triton compiling and the 8B-shaped model's start-ups), for a short loan of a GPU machine:
#   1. gpu_gemv.py: the decode GEMV's correctness on the device, its tile shapes swept against
#      cuBLAS / the Triton GEMM / torch._scaled_mm, the best saved and used by the steps after it;
#   2. gpu_bench.py, 8B-shaped: batch-1 decode against the HBM roofline (graphs, without the GEMV,
#      eager), offline throughput, and int8 / int4 / fp8 against the roofline of their own bytes;
#   3. gpu_check.py: every Triton kernel against the torch reference, graphs against eager;
#   4. gpu_bench.py, the 284M model; 5. the Triton kernel tests on the device (the float8 GEMV's
#      a Q4_K_M GGUF's and the packed checkpoints' first); 6. gpu_profile.py;
#   7. both models again with decode attention split into 64-key partitions.
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
    step 170 python3 benchmarks/gpu_gemv.py --write-configs "$OUT/gemv-configs.json"
    if [ -s "$OUT/gemv-configs.json" ]; then
        LLAMA3_DIST_GEMV_CONFIGS="$(cat "$OUT/gemv-configs.json")"
        export LLAMA3_DIST_GEMV_CONFIGS
        echo "# LLAMA3_DIST_GEMV_CONFIGS=$LLAMA3_DIST_GEMV_CONFIGS"
    fi
    step 190 python3 benchmarks/gpu_bench.py --models 8b --modes graphs,no-gemv,eager --quantizations int8,int4,fp8
    step 50 python3 benchmarks/gpu_check.py
    step 45 python3 benchmarks/gpu_bench.py --models 284m --modes graphs,no-gemv
    # first the tests of what no GPU has run yet (the float8 GEMV, a Q4_K_M file, packed checkpoints), then all
    step 90 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernels.py -k "fp8 or q4_k_m or packed_checkpoints"
    step 110 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_kernels.py
    step 30 python3 benchmarks/gpu_profile.py
    # decode attention in splits of 64 keys (the default takes 256): batch-1 decode with graphs
    step 90 env LLAMA3_DIST_DECODE_MIN_PARTITION=64 python3 benchmarks/gpu_bench.py --models 8b,284m --modes graphs \
        --requests 64
} 2>&1 | tee "$OUT/gpu-all.log"
