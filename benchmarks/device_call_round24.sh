#!/usr/bin/env bash
# Device call 2026-11-28 (session 8), a 2-GPU H100 host; carry [".data", ".whl"]:
#   GPU 0  issue 4 at batch 2048 (CUDA graphs, fused Adam, channels_last): a, b, b with num_workers=0 (the fetch
#          thread gathers, pins and copies: no worker processes), c; then which host-device synchronisations the
#          steps of b, b_in_process and c make (SyncProbe)
#   GPU 1  at the same time: the same at batch 512 (no probe)
#   then   GPUs 0,1: the multigpu data test (the prefetcher under ddp_spawn: the callback now pickles)
#   bash benchmarks/device_call_round24.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-560}"
CONFIGS="a_baseline b_prefetch_gpuaug b_in_process c_resident_gpuaug"
FLAGS="--compile --compile-mode reduce-overhead --fused --channels-last"
job gpu-data-b2048-inprocess 0 python benchmarks/gpu_data.py $FLAGS --batch-size 2048 --steps 150 --repeats 2 \
  --only $CONFIGS --sync-probe b_prefetch_gpuaug b_in_process c_resident_gpuaug \
  --out "$WORK/gpu_data_b2048_inprocess.json" &
job gpu-data-b512-inprocess 1 python benchmarks/gpu_data.py $FLAGS --batch-size 512 --steps 300 --repeats 2 \
  --only $CONFIGS --out "$WORK/gpu_data_b512_inprocess.json" &
wait
job data-multigpu-tests 0,1 python -m pytest -m multigpu -q -p no:cacheprovider tests/data
TAIL_LINES=24 pack
