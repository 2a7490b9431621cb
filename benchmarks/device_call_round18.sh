#!/usr/bin/env bash
# NOT RUN as written: superseded by device_call_round19.sh (the same jobs on a 2-GPU host, plus compiled decode).
# Device call prepared 2026-11-27 (session 6), a 4-GPU host; carry [".data", ".whl"]:
#   GPU 0  issue 5: the quantization GPU tests (one-kernel activation quantization; the GEMM without FMA contraction)
#   GPU 1  W8A8 prefill/decode on the 6.65B GPT: Triton int8 GEMM vs torch._int_mm vs bf16
#   GPU 2  the same on the 1.31B GPT
#   bash benchmarks/device_call_round18.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-170}"
job quant-gpu-tests 0 python -m pytest -m gpu -q -p no:cacheprovider tests/quantization &
job quant-speed-6b-w8a8-fused 1 python benchmarks/quant_speed.py --layers 32 --width 4096 --heads 32 --repeats 3 \
  --only w8a8_triton w8a8_torch_int_mm --out "$WORK/quant_speed_6b_w8a8_fused.json" &
job quant-speed-1b-w8a8-fused 2 python benchmarks/quant_speed.py --repeats 3 --only w8a8_triton w8a8_torch_int_mm \
  --out "$WORK/quant_speed_1b_w8a8_fused.json" &
wait
TAIL_LINES=10 pack
