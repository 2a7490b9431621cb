#!/usr/bin/env bash
# Device call prepared 2026-11-27 (session 6), a 4-GPU host; carry [".data", ".whl"]:
#   GPU 0  issue 5: the quantization GPU tests (the one-kernel Triton dequantization among them), then decode
#          and prefill of the 6.65B GPT: Triton (GEMV decode, Triton-dequantized prefill) vs tinygemm vs bnb
#   GPU 1  the same at 1.31B
#   GPU 2  the same at 6.65B, torch.compile'd (the decode step's glue fused; W8A8's quantization fused)
#   GPU 3  SASS of the GEMV as the device's Triton compiles it (offline instruction counts)
#   bash benchmarks/device_call_round14.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-480}"
QCONF="int4_g32_triton nf4_triton int4_g32_tinygemm nf4_bnb"
BIG="--layers 32 --width 4096 --heads 32"
(job quant-gpu-tests 0 python -m pytest -m gpu -q -p no:cacheprovider tests/quantization
 job quant-speed-6b-dequant 0 python benchmarks/quant_speed.py $BIG --repeats 3 --only $QCONF \
   --out "$WORK/quant_speed_6b_dequant.json") &
job quant-speed-1b-dequant 1 python benchmarks/quant_speed.py --repeats 3 --only $QCONF --out "$WORK/quant_speed_1b_dequant.json" &
job quant-speed-6b-compiled 2 python benchmarks/quant_speed.py $BIG --repeats 3 --compile \
  --only int4_g32_triton w8a8_torch_int_mm int4_g32_tinygemm --out "$WORK/quant_speed_6b_compiled.json" &
job triton-sass-device 3 python benchmarks/triton_gemv_sass.py --out "$WORK/triton_gemv_sass_device.json" &
wait
TAIL_LINES=10 pack
