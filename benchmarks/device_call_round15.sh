#!/usr/bin/env bash
# Device call prepared 2026-11-27 (session 6), a 4-GPU host; carry [".data", ".whl"]:
#   GPUs 0,1  every gpu/multigpu test outside tests/quantization (and tests/tune: Ray is not on the device)
#   GPU 2     the quantization gpu tests (backend="auto" now picks Triton for 4-bit on CUDA)
#   GPU 3     issue 5: every 4-bit and W8A8 configuration on the 6.65B GPT in one run (one consistent table)
#   bash benchmarks/device_call_round15.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-330}"
job all-gpu-tests 0,1 python -m pytest -m "gpu or multigpu" -q -p no:cacheprovider --ignore tests/tune \
  --ignore tests/quantization tests &
job quant-gpu-tests 2 python -m pytest -m gpu -q -p no:cacheprovider tests/quantization &
job quant-speed-6b-all 3 python benchmarks/quant_speed.py --layers 32 --width 4096 --heads 32 --repeats 3 \
  --only w8a8_torch_int_mm w8a8_bnb int4_g32_tinygemm int4_g32_triton nf4_bnb nf4_triton fp4_bnb \
  --out "$WORK/quant_speed_6b_all.json" &
wait
TAIL_LINES=14 pack
