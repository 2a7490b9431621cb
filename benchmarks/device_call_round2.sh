#!/usr/bin/env bash
# Second device call of 2026-11-27 (kind nvidia-h100-x4; carry [".data", ".whl"]):
#   GPUs 0,1  issue 6: distributed_charlm.py throughput on 2 GPUs, NVLink and sockets; then the multigpu tests
#   GPU 2     accuracy-only work at once: lr_range_validation.py (issue 3), quant_accuracy.py (issue 5) and the
#             gpu-marked tests (issues 3-5)
#   GPU 3     issue 3: char-lm, speedup (constant LR) vs speedup-onecycle vs speedup-wsd (peak 1e-3, 40 epochs)
#   bash benchmarks/device_call_round2.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-540}"
budget() { echo $((JOBS_DEADLINE - $(date +%s) - 30)); }  # bench starts no run after this
(job dist2 0,1 python benchmarks/distributed_charlm.py --devices 2 --out "$WORK/distributed_charlm_2gpu.json"
 job multigpu-tests 0,1 python -m pytest -m multigpu -q -p no:cacheprovider tests/distributed tests/data) &
(job lr-range 2 python benchmarks/lr_range_validation.py --out "$WORK/lr_range_validation.json" &
 job quant-accuracy 2 python benchmarks/quant_accuracy.py --out "$WORK/quant_accuracy.json" &
 job gpu-tests 2 python -m pytest -m gpu -q -p no:cacheprovider tests/data tests/quantization tests/schedules &
 wait) &
(job sched-charlm 3 lightning-speedup bench --time-budget $(budget) --task char-lm --recipe speedup \
  --recipe speedup-onecycle --recipe speedup-wsd --seeds 3 --out "$WORK/sched-charlm-v2") &
wait
pack
