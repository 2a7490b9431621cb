#!/usr/bin/env bash
# Device call prepared 2026-11-27 (session 5), a 4-GPU host; carry [".data", ".whl"]:
#   GPU 0  issue 5: the quantization GPU tests (the new Triton 4-bit GEMV backend among them), then decode /
#          prefill speed of a 6.65B-parameter GPT (32 x 4096, random weights): Triton vs tinygemm vs bnb vs bf16
#   GPU 1  issue 5: the same configurations on the default 1.31B GPT (24 x 2048)
#   GPU 2  issue 4: the three input pipelines at batch 2048 (CUDA graphs + fused Adam, as `speedup` runs):
#          at batch 512 the resident step is bound by the host's per-step work
#   bash benchmarks/device_call_round12.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-420}"
QCONF="int4_g32_triton nf4_triton int4_g32_tinygemm nf4_bnb"
(job quant-gpu-tests 0 python -m pytest -m gpu -q -p no:cacheprovider tests/quantization
 job quant-speed-6b-triton 0 python benchmarks/quant_speed.py --layers 32 --width 4096 --heads 32 --repeats 3 \
   --only $QCONF --out "$WORK/quant_speed_6b_triton.json") &
job quant-speed-1b-triton 1 python benchmarks/quant_speed.py --repeats 3 --only $QCONF --out "$WORK/quant_speed_1b_triton.json" &
job gpu-data-2048 2 python benchmarks/gpu_data.py --compile --channels-last --compile-mode reduce-overhead --fused \
  --batch-size 2048 --steps 150 --repeats 2 --only a_baseline b_prefetch_gpuaug c_resident_gpuaug \
  --out "$WORK/gpu_data_b2048.json" &
wait
pack
