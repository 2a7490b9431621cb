#!/usr/bin/env bash
# Issue 8 (4 and 8 GPUs; kind nvidia-h100-x4 / -x8 or their H200 twins; carry [".data", ".whl"]):
# throughput of every strategy on all visible GPUs, NVLink and sockets, with the bandwidth measured and
# the cost model refit; then, time permitting, time to val loss 1.47 through sockets for DDP, local SGD,
# DiLoCo and gossip on the exponential graph (the 8-GPU comparison).
#   bash benchmarks/device_call_multigpu.sh [DEADLINE_S] [TTT_MINUTES]
# Not yet run: 4-GPU kinds stopped being lent before this session's last device call (2026-11-27).
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-560}"
n=$(nvidia-smi -L | wc -l)
gpus=$(seq -s, 0 $((n - 1)))
job "dist${n}-throughput" "$gpus" python benchmarks/distributed_charlm.py --devices "$n" --repeats 2 \
  --out "$WORK/distributed_charlm_${n}gpu.json"
job "dist${n}-ttt" "$gpus" python benchmarks/distributed_charlm.py --devices "$n" --mode ttt --networks sockets \
  --strategies ddp,local_sgd,diloco,gossip_exponential --max-minutes "${2:-2}" \
  --out "$WORK/distributed_charlm_${n}gpu_ttt.json"
pack
