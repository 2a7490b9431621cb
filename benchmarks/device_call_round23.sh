#!/usr/bin/env bash
# Device call 2026-11-28 (session 8), a 2-GPU H100 host; carry [".data", ".whl"]:
#   GPU 0  issue 4 at batch 2048 (CUDA graphs, fused Adam, channels_last), host otherwise idle: a, b (GPUPrefetcher
#          with its new fetch thread), b with fetching on the training thread (as before), c, and the compute-bound
#          pair d/d' (the prefetcher's cost, now with the fetch thread)
#   then   GPU 1: the single-GPU data tests; GPU 0 at the same time: the same configurations at batch 512
#   then   GPUs 0,1: the multigpu data test (prefetcher under DDP)
#   bash benchmarks/device_call_round23.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-570}"
CONFIGS="a_baseline b_prefetch_gpuaug b_training_thread c_resident_gpuaug d_compute d_compute_prefetch"
job gpu-data-b2048-thread 0 python benchmarks/gpu_data.py --compile --compile-mode reduce-overhead --fused \
  --channels-last --batch-size 2048 --steps 150 --repeats 2 --only $CONFIGS --out "$WORK/gpu_data_b2048_thread.json"
job data-gpu-tests 1 python -m pytest -m gpu -q -p no:cacheprovider tests/data &
job gpu-data-b512-thread 0 python benchmarks/gpu_data.py --compile --compile-mode reduce-overhead --fused \
  --channels-last --batch-size 512 --steps 300 --repeats 2 --only $CONFIGS --out "$WORK/gpu_data_b512_thread.json" &
wait
job data-multigpu-tests 0,1 python -m pytest -m multigpu -q -p no:cacheprovider tests/data
TAIL_LINES=16 pack
