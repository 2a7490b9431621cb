#!/usr/bin/env bash
# Helpers to run several measurements in one device call, each pinned to its own GPU.
#   source benchmarks/gpu_jobs.sh DEADLINE_S     (after benchmarks/device_env.sh)
#   job NAME GPU COMMAND...     runs COMMAND with CUDA_VISIBLE_DEVICES=GPU, stdout+stderr to $WORK/NAME.log,
#                               killed at the deadline; prints one line when it ends
#   pack                        tars $WORK into $OUT/results.tgz (the device returns few files) and prints
#                               the last lines of every log
# Timing comparisons are only ever made between configurations of one job (same GPU, interleaved);
# jobs that share a GPU at the same time are accuracy-only (their numbers do not depend on speed).
JOBS_START=$(date +%s)
JOBS_DEADLINE=$((JOBS_START + ${1:-540}))
export WORK=${WORK:-/tmp/work}
mkdir -p "$WORK"

job() {
  local name=$1 gpu=$2
  shift 2
  local left=$((JOBS_DEADLINE - $(date +%s)))
  if [ "$left" -le 5 ]; then
    echo "[job $name] skipped: no time left" | tee "$WORK/$name.log"
    return 4
  fi
  local t0=$(date +%s)
  CUDA_VISIBLE_DEVICES=$gpu timeout --signal=INT --kill-after=20 "$left" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "[job $name] gpu $gpu rc=$rc after $(($(date +%s) - t0)) s (t=$(($(date +%s) - JOBS_START)) s)"
  return $rc
}

pack() {
  for f in "$WORK"/*.log; do
    echo "=== $(basename "$f")"
    grep -v -i -E "warning|warn\(|^\s*$" "$f" | tail -n "${TAIL_LINES:-12}"
  done
  [ -n "${OUT:-}" ] && tar czf "$OUT/results.tgz" --exclude="*.ckpt" --exclude="*.pt" -C "$(dirname "$WORK")" "$(basename "$WORK")"
}
