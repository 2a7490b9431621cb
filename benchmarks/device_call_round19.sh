#!/usr/bin/env bash
# Ran 2026-11-27 on 2x H100 (results: quant-speed-6b-w8a8-fused; the compiled job ran out of time, see round 20).
# Device call 2026-11-27 (session 7), a 2-GPU host; carry [".data", ".whl"]:
#   GPU 0  issue 5: the quantization GPU tests (one-kernel activation quantization; the GEMM without FMA
#          contraction; a compiled model of Triton layers is one graph), then W8A8 on the 6.65B GPT, eager:
#          Triton int8 GEMM vs torch._int_mm vs bf16
#   GPU 1  the 6.65B GPT compiled (per-layer KV caches, the Triton kernels as custom ops: no graph breaks):
#          bf16, int4/nf4 Triton, tinygemm, W8A8 Triton and torch._int_mm
#   bash benchmarks/device_call_round19.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-500}"
SIX_B=(--layers 32 --width 4096 --heads 32 --repeats 3)
(
  job quant-gpu-tests 0 python -m pytest -m gpu -q -p no:cacheprovider tests/quantization
  job quant-speed-6b-w8a8-fused 0 python benchmarks/quant_speed.py "${SIX_B[@]}" \
    --only w8a8_triton w8a8_torch_int_mm --out "$WORK/quant_speed_6b_w8a8_fused.json"
) &
job quant-speed-6b-compiled-graphs 1 python benchmarks/quant_speed.py "${SIX_B[@]}" --compile \
  --only int4_g32_triton nf4_triton int4_g32_tinygemm w8a8_triton w8a8_torch_int_mm \
  --out "$WORK/quant_speed_6b_compiled_onegraph.json" &
wait
TAIL_LINES=12 pack
