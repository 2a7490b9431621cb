#!/usr/bin/env bash
# One call on a 4-GPU host (carry [".data", ".whl"]), 2026-11-27 round 4:
#   GPUs 0,1  issue 6: 2-GPU time to val loss 1.47 through sockets, local SGD then DDP, WSD over 2500 steps
#   GPU 2     issue 5: quant_speed.py --compile (fused quantized paths)
#   GPU 3     issue 4: gpu_data.py --compile --channels-last, then issue 5: quant_accuracy.py int4-g128/w4a8
# Throughput of the single-GPU jobs is compared only within each job (same GPU, interleaved); the 2-GPU
# time-to-target runs share the host's CPUs with them (recorded in the notes).
#   bash benchmarks/device_call_round4.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-570}"
job dist2-ttt 0,1 python benchmarks/distributed_charlm.py --devices 2 --mode ttt --networks sockets \
  --strategies local_sgd,ddp --caps "local_sgd=2.5,ddp=5.5" --schedule-steps 2500 --eval-every 50 \
  --out "$WORK/distributed_charlm_2gpu_ttt.json" &
job quant-speed 2 python benchmarks/quant_speed.py --compile --out "$WORK/quant_speed_compiled.json" &
(
  job gpu-data 3 python benchmarks/gpu_data.py --compile --channels-last --out "$WORK/gpu_data.json"
  job quant-accuracy 3 python benchmarks/quant_accuracy.py --formats int4-g128 w4a8 --seeds 0 \
    --out "$WORK/quant_accuracy_4bit.json"
) &
wait
pack
