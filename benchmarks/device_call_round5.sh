#!/usr/bin/env bash
# Issue 6, 2 GPUs at the 4-GPU run's global batch (64 sequences per GPU, 128 per step), WSD over 1500 steps:
# time to val loss 1.47 through sockets, local SGD then DDP (DDP's cap only has to exceed 2x local SGD's time).
#   bash benchmarks/device_call_round5.sh [DEADLINE_S]        (carry [".data", ".whl"])
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-290}"
job dist2-ttt-b64 0,1 python benchmarks/distributed_charlm.py --devices 2 --batch-size 64 --mode ttt \
  --networks sockets --strategies local_sgd,ddp --caps "local_sgd=1.3,ddp=2.4" --schedule-steps 1500 \
  --eval-every 50 --out "$WORK/distributed_charlm_2gpu_b64_ttt.json"
pack
