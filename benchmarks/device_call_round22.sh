#!/usr/bin/env bash
# Device call 2026-11-27 (session 7), one GPU; carry [".data", ".whl"]:
#   issue 5: float vs PTQ vs QAT with every layer quantized and learnable (LSQ) scales, 3 seeds
#   bash benchmarks/device_call_round22.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-280}"
job quant-accuracy-all-layers-lsq 0 python benchmarks/quant_accuracy.py --formats int4-g128-all-lsq w4a8-all-lsq \
  --seeds 0 1 2 --out "$WORK/quant_accuracy_all_layers_lsq.json"
TAIL_LINES=10 pack
