#!/usr/bin/env bash
# The denominator of every speed-up claim (issue 2): baseline vs speedup on both reference tasks.
#   run on the device with carry [".data", ".whl", ".bench-state"]:
#     bash benchmarks/foundation_baselines.sh 3 420 fashion-mnist char-lm
# Args: SEEDS BUDGET_S TASK...  Starts no new run after BUDGET_S seconds; finished runs live in
# .bench-state/TASK and are resumed by the next call, so a bench can span several 10-minute calls.
# Each task's state comes back as $OUT/TASK.tgz (extract into .bench-state/ for the next call).
set -u
source benchmarks/device_env.sh
seeds=$1; budget=$2; shift 2
start=$(date +%s); rc=0
for task in "$@"; do
  left=$(( budget - ($(date +%s) - start) ))
  state=.bench-state/$task
  if [ "$left" -le 0 ]; then echo "no time left for $task"; rc=4; break; fi
  args=(--task "$task" --recipe baseline --recipe speedup --seeds "$seeds" --out "$state" --time-budget "$left")
  [ -f "$state/bench.json" ] && args+=(--resume)
  lightning-speedup bench "${args[@]}" 2>&1 | grep --line-buffered -v -i -E "warning|warn\(|^\s*$"
  r=${PIPESTATUS[0]}; [ "$r" -ne 0 ] && rc=$r
  [ -n "${OUT:-}" ] && tar czf "$OUT/$task.tgz" -C .bench-state "$task"
done
exit $rc
