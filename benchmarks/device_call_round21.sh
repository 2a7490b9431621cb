#!/usr/bin/env bash
# Device call 2026-11-27 (session 7), a 2-GPU host; carry [".data", ".whl"]:
#   GPU 0  issue 4: a, b (whole batches gathered), b (per-sample fetch), c at batch 2048 (CUDA graphs, fused Adam,
#          channels_last) with nothing else running on the host (round 20 shared it with a compile job)
#   then   issue 5: float vs PTQ vs QAT with every layer quantized (int4 g128, W4A8), 3 seeds, GPU 0
#          and at the same time the multigpu test of tests/data (the prefetcher under DDP), GPUs 0 and 1
#   bash benchmarks/device_call_round21.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-540}"
job gpu-data-b2048-quiet 0 python benchmarks/gpu_data.py --compile --compile-mode reduce-overhead --fused \
  --channels-last --batch-size 2048 --steps 150 --repeats 2 \
  --only a_baseline b_prefetch_gpuaug b_per_sample_fetch c_resident_gpuaug --out "$WORK/gpu_data_b2048_quiet.json"
job quant-accuracy-all-layers 0 python benchmarks/quant_accuracy.py --formats int4-g128-all w4a8-all --seeds 0 1 2 \
  --out "$WORK/quant_accuracy_all_layers.json" &
job data-multigpu-tests 0,1 python -m pytest -m multigpu -q -p no:cacheprovider tests/data &
wait
TAIL_LINES=16 pack
