#!/usr/bin/env bash
# Device call 2026-11-28 (session 8), a 2-GPU host; carry [".data", ".whl"]. Issue 4's final measurement, every loader
# dropping its last incomplete batch, median of 3 (CUDA graphs, fused Adam, channels_last):
#   GPU 0  batch 2048: a, b, b + AsyncProgressBarMetrics, the same in-process, c, c + AsyncProgressBarMetrics, and the
#          compute-bound pair d/d' (the prefetcher's cost with its fetch thread)
#   GPU 1  the data GPU tests (AsyncProgressBarMetrics, the sync finder, the fetch thread), then the same at batch 512
#   bash benchmarks/device_call_round26.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-575}"
CONFIGS="a_baseline b_prefetch_gpuaug b_async_metrics b_in_process c_resident_gpuaug c_async_metrics"
FLAGS="--compile --compile-mode reduce-overhead --fused --channels-last --repeats 3"
job gpu-data-b2048-final 0 python benchmarks/gpu_data.py $FLAGS --batch-size 2048 --steps 150 \
  --only $CONFIGS d_compute d_compute_prefetch --out "$WORK/gpu_data_b2048_final.json" &
( job data-gpu-tests 1 python -m pytest -m gpu -q -p no:cacheprovider tests/data
  job gpu-data-b512-final 1 python benchmarks/gpu_data.py $FLAGS --batch-size 512 --steps 300 \
    --only $CONFIGS --out "$WORK/gpu_data_b512_final.json" ) &
wait
TAIL_LINES=20 pack
