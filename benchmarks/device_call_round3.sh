#!/usr/bin/env bash
# Third and fourth device calls of 2026-11-27 (kind nvidia-h100-x2; carry [".data", ".whl"]); the x4 kind
# was no longer lent, so the jobs that had shared one x4 call run in two:
#   bash benchmarks/device_call_round3.sh ttt [DEADLINE_S] [TTT_MINUTES] [STRATEGIES]
#     GPUs 0,1  issue 6: time to val loss 1.47 through sockets, DDP vs DiLoCo (2026-11-27; next: ddp,local_sgd
#               with longer caps: local SGD lost the least per step on CPU and ran 3.2x DDP's tokens/s)
#   bash benchmarks/device_call_round3.sh final [DEADLINE_S]
#     GPU 0     the final recipe on fashion-mnist: baseline vs speedup (3 seeds); then the gpu-marked tests alone
#     GPU 1     the final recipe on char-lm: baseline vs speedup (2 seeds)
set -u
part=$1
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${2:-540}"
budget() { echo $((JOBS_DEADLINE - $(date +%s) - 30)); }  # bench starts no run after this
if [ "$part" = ttt ]; then
  job ttt-sockets 0,1 python benchmarks/distributed_charlm.py --devices 2 --mode ttt --networks sockets \
    --strategies "${4:-ddp,diloco}" --max-minutes "${3:-3}" --out "$WORK/distributed_charlm_2gpu_ttt.json"
else
  (job final-fashion 0 lightning-speedup bench --time-budget $(budget) --task fashion-mnist --recipe baseline \
    --recipe speedup --seeds 3 --out "$WORK/final-fashion"
   job gpu-tests 0 python -m pytest -m gpu -q -p no:cacheprovider tests/data tests/quantization tests/schedules) &
  (job final-charlm 1 lightning-speedup bench --time-budget $(budget) --task char-lm --recipe baseline \
    --recipe speedup --seeds 2 --out "$WORK/final-charlm") &
  wait
fi
pack
