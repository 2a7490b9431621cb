#!/usr/bin/env bash
# Issues 6 and 8 (kind nvidia-h100-x4 / -x8 or their H200 twins, or -x2; carry [".data", ".whl"]).
#   bash benchmarks/device_call_multigpu.sh throughput [DEADLINE_S] [TTT_STRATEGIES] [CAPS] [SCHEDULE_STEPS]
#       throughput of every strategy on all visible GPUs, NVLink and sockets (bandwidth measured, cost model
#       refit), then time to val loss 1.47 through sockets for TTT_STRATEGIES (default local_sgd) with what is left
#   bash benchmarks/device_call_multigpu.sh ttt [DEADLINE_S] [TTT_STRATEGIES] [CAPS] [SCHEDULE_STEPS] [GPUS]
#       time to target only, on GPUS (default all visible)
# CAPS: per-strategy minutes, e.g. "ddp=4,local_sgd=2". SCHEDULE_STEPS: warm-up-stable-decay horizon in steps,
# the same for every strategy (0: constant LR).
set -u
mode=${1:-throughput}
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${2:-560}"
n=$(nvidia-smi -L | wc -l)
gpus=${6:-$(seq -s, 0 $((n - 1)))}
k=$(($(tr -cd , <<<"$gpus" | wc -c) + 1))
ttt_args=(--devices "$k" --mode ttt --networks sockets --strategies "${3:-local_sgd}" --caps "${4:-}"
  --max-minutes 3 --schedule-steps "${5:-1500}" --eval-every 50)
if [ "$mode" = throughput ]; then
  job "dist${k}-throughput" "$gpus" python benchmarks/distributed_charlm.py --devices "$k" --repeats 2 \
    --out "$WORK/distributed_charlm_${k}gpu.json"
fi
job "dist${k}-ttt" "$gpus" python benchmarks/distributed_charlm.py "${ttt_args[@]}" \
  --out "$WORK/distributed_charlm_${k}gpu_ttt.json"
pack
