#!/usr/bin/env bash
# Device call 2026-11-27 (session 7), a 2-GPU host; carry [".data", ".whl"]:
#   GPU 0  issue 5: the quantization GPU tests (quantize_rows' scale as torch computes it on CUDA), then every
#          4-bit/W8A8 backend on the 6.65B GPT, eager (this host's baseline for the compiled table);
#          issue 4: a, b (whole batches gathered), b (per-sample fetch, as before), c at batch 2048 with CUDA
#          graphs, fused Adam, channels_last (the setting of ...-gpu-data-b2048.json), 2 repeats interleaved
#   GPU 1  the 6.65B GPT compiled (per-layer KV caches, the Triton kernels as custom ops: no graph breaks):
#          bf16, int4 and nf4 on the Triton GEMV, W8A8 on the Triton int8 GEMM; then the data GPU tests
#          (the only gpu tests outside tests/quantization and tests/tune)
#   bash benchmarks/device_call_round20.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-530}"
SIX_B=(--layers 32 --width 4096 --heads 32 --repeats 3)
(
  job quant-gpu-tests 0 python -m pytest -m gpu -q -p no:cacheprovider tests/quantization
  job quant-speed-6b-eager 0 python benchmarks/quant_speed.py "${SIX_B[@]}" \
    --only int4_g32_triton nf4_triton int4_g32_tinygemm nf4_bnb w8a8_triton w8a8_torch_int_mm w8a8_bnb \
    --out "$WORK/quant_speed_6b_eager.json"
  job gpu-data-b2048-batched 0 python benchmarks/gpu_data.py --compile --compile-mode reduce-overhead --fused \
    --channels-last --batch-size 2048 --steps 150 --repeats 2 \
    --only a_baseline b_prefetch_gpuaug b_per_sample_fetch c_resident_gpuaug --out "$WORK/gpu_data_b2048_batched.json"
) &
(
  job quant-speed-6b-compiled 1 python benchmarks/quant_speed.py "${SIX_B[@]}" --compile \
    --only int4_g32_triton nf4_triton w8a8_triton --out "$WORK/quant_speed_6b_compiled_onegraph.json"
  job data-gpu-tests 1 python -m pytest -m gpu -q -p no:cacheprovider tests/data
) &
wait
TAIL_LINES=14 pack
