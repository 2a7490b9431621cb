#!/usr/bin/env bash
# Device call prepared 2026-11-27 (session 6), a 4-GPU host; carry [".data", ".whl"]:
#   GPUs 0-3  issue 5: per-layer time of the Triton 4-bit GEMV, every tile with and without software
#             prefetching, vs cuBLAS bf16 (int4 g32 and nf4 b64, widths 4096 and 2048)
#   GPU 0/1   then decode speed at 6.65B / 1.31B with the prefetching tiles in the autotune space
#   bash benchmarks/device_call_round13.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-480}"
QCONF="int4_g32_triton nf4_triton int4_g32_tinygemm"
(job layers-int4-4096 0 python benchmarks/triton_gemv_layers.py --width 4096 --format int4 --out "$WORK/layers_int4_4096.json"
 job quant-speed-6b-prefetch 0 python benchmarks/quant_speed.py --layers 32 --width 4096 --heads 32 --repeats 3 \
   --only $QCONF --out "$WORK/quant_speed_6b_prefetch.json") &
(job layers-nf4-4096 1 python benchmarks/triton_gemv_layers.py --width 4096 --format nf4 --out "$WORK/layers_nf4_4096.json"
 job quant-speed-1b-prefetch 1 python benchmarks/quant_speed.py --repeats 3 --only $QCONF --out "$WORK/quant_speed_1b_prefetch.json") &
job layers-int4-2048 2 python benchmarks/triton_gemv_layers.py --width 2048 --format int4 --out "$WORK/layers_int4_2048.json" &
job layers-nf4-2048 3 python benchmarks/triton_gemv_layers.py --width 2048 --format nf4 --out "$WORK/layers_nf4_2048.json" &
wait
TAIL_LINES=8 pack
