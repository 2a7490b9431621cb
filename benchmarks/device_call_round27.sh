#!/usr/bin/env bash
# Device call 2026-11-28 (session 8), a 2-GPU host; carry [".data", ".whl"]:
#   GPU 0  issue 4: the prefetcher's cost on the compute-bound model (ResNet-9 width 256, batch 512), with and without
#          AsyncProgressBarMetrics (without it, Lightning's per-step sync puts the prefetcher's hand-over on the
#          critical path), median of 3
#   GPU 1  the data GPU tests (AsyncProgressBarMetrics' test fixed: Lightning moves results to the CPU after fit), then
#          the bench: speedup vs speedup-async-metrics, fashion-mnist, time to val_acc 0.94, 2 seeds
#   bash benchmarks/device_call_round27.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-400}"
job gpu-data-compute-pair 0 python benchmarks/gpu_data.py --compile --compile-mode reduce-overhead --fused \
  --channels-last --repeats 3 --only d_compute d_compute_prefetch d_compute_async d_compute_prefetch_async \
  --out "$WORK/gpu_data_compute_pair.json" &
( job data-gpu-tests 1 python -m pytest -m gpu -q -p no:cacheprovider tests/data
  job bench-async-metrics 1 lightning-speedup bench --task fashion-mnist --recipe speedup --recipe speedup-async-metrics \
    --seeds 2 --time-budget 250 --out "$WORK/bench-async-metrics" ) &
wait
TAIL_LINES=20 pack
