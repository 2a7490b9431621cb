#!/usr/bin/env bash
# Ran at commit fe6545a (the int4 "words" kernel); that kernel was measured no faster and reverted in 856e3d4.
# Device call prepared 2026-11-27 (session 6), a 4-GPU host; carry [".data", ".whl"]:
#   GPU 0  issue 5: the quantization GPU tests (the int4 "words" kernel, decoding in PTX, among them), then
#          decode/prefill of the 6.65B GPT with it
#   GPU 1  per-layer time at width 4096: the words kernel (every tile, autotuned) vs the first (bytes) kernel vs bf16
#   GPU 2  the same at width 2048
#   GPU 3  decode/prefill of the 1.31B GPT
#   bash benchmarks/device_call_round16.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-330}"
QCONF="int4_g32_triton int4_g32_tinygemm nf4_triton"
(job quant-gpu-tests 0 python -m pytest -m gpu -q -p no:cacheprovider tests/quantization
 job quant-speed-6b-words 0 python benchmarks/quant_speed.py --layers 32 --width 4096 --heads 32 --repeats 3 \
   --only $QCONF --out "$WORK/quant_speed_6b_words.json") &
job layers-int4-4096-words 1 python benchmarks/triton_gemv_layers.py --width 4096 --format int4 \
  --out "$WORK/layers_int4_4096_words.json" &
job layers-int4-2048-words 2 python benchmarks/triton_gemv_layers.py --width 2048 --format int4 \
  --out "$WORK/layers_int4_2048_words.json" &
job quant-speed-1b-words 3 python benchmarks/quant_speed.py --repeats 3 --only $QCONF --out "$WORK/quant_speed_1b_words.json" &
wait
TAIL_LINES=10 pack
