#!/usr/bin/env bash
# Third device call of 2026-11-27 (kind nvidia-h100-x4; carry [".data", ".whl"]):
#   GPUs 0,1  issue 6: time to val loss 1.47 through sockets, DDP vs DiLoCo (2 GPUs)
#   GPU 2     the final recipe on fashion-mnist: baseline vs speedup (3 seeds); then the gpu-marked tests alone
#   GPU 3     the final recipe on char-lm: baseline vs speedup (2 seeds)
#   bash benchmarks/device_call_round3.sh [DEADLINE_S] [TTT_MINUTES]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-540}"
budget() { echo $((JOBS_DEADLINE - $(date +%s) - 30)); }  # bench starts no run after this
(job ttt-sockets 0,1 python benchmarks/distributed_charlm.py --devices 2 --mode ttt --networks sockets \
  --strategies ddp,diloco --max-minutes "${2:-3}" --out "$WORK/distributed_charlm_2gpu_ttt.json") &
(job final-fashion 2 lightning-speedup bench --time-budget $(budget) --task fashion-mnist --recipe baseline \
  --recipe speedup --seeds 3 --out "$WORK/final-fashion"
 job gpu-tests 2 python -m pytest -m gpu -q -p no:cacheprovider tests/data tests/quantization tests/schedules) &
(job final-charlm 3 lightning-speedup bench --time-budget $(budget) --task char-lm --recipe baseline \
  --recipe speedup --seeds 2 --out "$WORK/final-charlm") &
wait
pack
