#!/usr/bin/env bash
# Device call 2026-11-28 (session 8), a 2-GPU host; carry [".data", ".whl"]:
#   GPU 0  issue 4 at batch 2048 (CUDA graphs, fused Adam, channels_last), train_loss no longer in the progress bar
#          (no per-step .item()): a, b, b_in_process, c, and b, c with the per-step sync as before (b/c_step_sync)
#   GPU 1  at the same time: the data GPU tests (the monitor's sync finder, the fetch thread), then the same
#          configurations at batch 512
#   bash benchmarks/device_call_round25.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-570}"
CONFIGS="a_baseline b_prefetch_gpuaug b_step_sync b_in_process c_resident_gpuaug c_step_sync"
FLAGS="--compile --compile-mode reduce-overhead --fused --channels-last"
job gpu-data-b2048-nosync 0 python benchmarks/gpu_data.py $FLAGS --batch-size 2048 --steps 150 --repeats 2 \
  --only $CONFIGS --out "$WORK/gpu_data_b2048_nosync.json" &
( job data-gpu-tests 1 python -m pytest -m gpu -q -p no:cacheprovider tests/data
  job gpu-data-b512-nosync 1 python benchmarks/gpu_data.py $FLAGS --batch-size 512 --steps 300 --repeats 2 \
    --only $CONFIGS --out "$WORK/gpu_data_b512_nosync.json" ) &
wait
TAIL_LINES=24 pack
