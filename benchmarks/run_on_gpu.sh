#!/usr/bin/env bash
# Runs one named job set on a GPU machine and packs its results.
#
#   bash benchmarks/run_on_gpu.sh SET [SECONDS]      (SECONDS: wall-clock budget, default 540)
#
# SET is one of the functions named set_* below (`bash benchmarks/run_on_gpu.sh list` prints them).
# Each job runs on the GPUs it names, under the remaining budget; its console log and outputs go to
# $WORK (default /tmp/work) and, when $OUT is set, into $OUT/results.tgz. Result files that the docs
# cite are copied by hand into benchmarks/results/<topic>/ and indexed by benchmarks/results_index.py.
#
# To add a set: write a function `set_NAME` that calls `job NAME GPUS COMMAND...` for each job
# (background independent GPUs with `&` and end with `wait`).
set -u

# --- job plumbing -----------------------------------------------------------------------------
JOBS_START=$(date +%s)
JOBS_DEADLINE=$((JOBS_START + ${2:-540}))
export WORK=${WORK:-/tmp/work}
mkdir -p "$WORK"

# Seconds left for a command that must finish before the deadline (bench starts no run after it).
budget() {
  local left=$((JOBS_DEADLINE - $(date +%s) - 30))
  echo $((left > 0 ? left : 0))
}

# job NAME GPUS COMMAND...: run COMMAND on CUDA devices GPUS under the remaining budget, log to $WORK/NAME.log.
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

# Print the tail of every log (warnings dropped) and pack $WORK into $OUT/results.tgz.
pack() {
  for f in "$WORK"/*.log; do
    echo "=== $(basename "$f")"
    grep -v -i -E "warning|warn\(|^\s*$" "$f" | tail -n "${TAIL_LINES:-16}"
  done
  if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/results.tgz" --exclude="*.ckpt" --exclude="*.pt" -C "$(dirname "$WORK")" "$(basename "$WORK")"
  fi
}

# --- job sets ---------------------------------------------------------------------------------
# Headline time to target: baseline vs speedup recipe on both reference tasks (1 GPU each).
set_headline() {
  job headline-fashion 0 lightning-speedup bench --time-budget "$(budget)" --task fashion-mnist \
    --recipe baseline --recipe speedup --seeds 3 --out "$WORK/headline-fashion" &
  job headline-charlm 1 lightning-speedup bench --time-budget "$(budget)" --task char-lm \
    --recipe baseline --recipe speedup --seeds 3 --out "$WORK/headline-charlm" &
  wait
}

# LR schedules: schedule recipes side by side on both tasks, and the LR range test validation.
set_schedules() {
  job sched-fashion 0 lightning-speedup bench --time-budget "$(budget)" --task fashion-mnist \
    --recipe speedup --recipe speedup-onecycle --recipe speedup-wsd --seeds 3 --out "$WORK/sched-fashion" &
  job sched-charlm 1 lightning-speedup bench --time-budget "$(budget)" --task char-lm \
    --recipe speedup --recipe speedup-onecycle --recipe speedup-wsd --seeds 3 --out "$WORK/sched-charlm" &
  job lr-range 2 python benchmarks/lr_range_validation.py --out "$WORK/lr_range_validation.json" &
  wait
}

# GPU data path: loader configurations a-d at batch 2048 and 512 (median of 3), and the bench pair.
set_gpu_data() {
  local flags=(--compile --compile-mode reduce-overhead --fused --channels-last --repeats 3)
  local configs=(a_baseline b_prefetch_gpuaug b_async_metrics b_in_process c_resident_gpuaug c_async_metrics)
  job gpu-data-b2048 0 python benchmarks/gpu_data.py "${flags[@]}" --batch-size 2048 --steps 150 \
    --only "${configs[@]}" d_compute d_compute_prefetch --out "$WORK/gpu_data_b2048.json" &
  job gpu-data-b512 1 python benchmarks/gpu_data.py "${flags[@]}" --batch-size 512 --steps 300 \
    --only "${configs[@]}" --out "$WORK/gpu_data_b512.json" &
  job gpu-data-compute-pair 2 python benchmarks/gpu_data.py "${flags[@]}" \
    --only d_compute d_compute_prefetch d_compute_async d_compute_prefetch_async \
    --out "$WORK/gpu_data_compute_pair.json" &
  wait
}

# Quantization: accuracy of each format over 3 seeds, decode speed at 6B shape (eager and compiled).
set_quantization() {
  local six_b=(--layers 32 --width 4096 --heads 32 --repeats 3)
  job quant-accuracy 0 python benchmarks/quant_accuracy.py --seeds 0 1 2 --out "$WORK/quant_accuracy.json" &
  job quant-speed-6b-eager 1 python benchmarks/quant_speed.py "${six_b[@]}" \
    --only int4_g32_triton nf4_triton int4_g32_tinygemm nf4_bnb w8a8_triton w8a8_torch_int_mm w8a8_bnb \
    --out "$WORK/quant_speed_6b_eager.json" &
  job quant-speed-6b-compiled 2 python benchmarks/quant_speed.py "${six_b[@]}" --compile \
    --only int4_g32_triton nf4_triton w8a8_triton --out "$WORK/quant_speed_6b_compiled.json" &
  wait
}

# The char-LM's own inference: every format against bf16 on the bench's char-LM (its shape, random weights: speed,
# latency and memory; its accuracy after quantization is quant_accuracy.py's), eager with CUDA graphs, then the
# Triton formats compiled. bitsandbytes' formats run only where its wheel was carried in .whl/
# (`python benchmarks/gpu_wheels.py --bitsandbytes --out .whl`, 3.4 MiB; device_env.sh installs it).
set_quant_charlm() {
  job quant-speed-charlm 0 python benchmarks/quant_speed.py --model char-lm --repeats 5 \
    --out "$WORK/quant_speed_charlm.json"
  job quant-speed-charlm-compiled 0 python benchmarks/quant_speed.py --model char-lm --repeats 5 --compile \
    --only int4_g32_triton nf4_triton w8a8_triton --out "$WORK/quant_speed_charlm_compiled.json"
}

# Where a fresh process's start goes (imports, CUDA, nvidia-smi), alone and with another process holding the GPU
# open: every bench run pays it before its clock starts.
set_process_startup() {
  job process-startup 0 python benchmarks/process_startup.py --tries 5 --out "$WORK/process_startup.json"
}

# Distributed: throughput of every strategy and time to target over sockets, on all visible GPUs.
set_distributed() {
  local n k gpus
  n=$(nvidia-smi -L | wc -l)
  gpus=$(seq -s, 0 $((n - 1)))
  k=$n
  job "dist${k}-throughput" "$gpus" python benchmarks/distributed_charlm.py --devices "$k" --repeats 3 \
    --out "$WORK/distributed_charlm_${k}gpu.json"
  job "dist${k}-ttt" "$gpus" python benchmarks/distributed_charlm.py --devices "$k" --mode ttt \
    --networks sockets --max-minutes 3 --schedule-steps 1500 --eval-every 50 \
    --out "$WORK/distributed_charlm_${k}gpu_ttt.json"
}

# GPU and multi-GPU tests of the suite.
set_tests() {
  job gpu-tests 0 python -m pytest -m gpu -q -p no:cacheprovider tests --junitxml="$WORK/gpu-tests.xml"
  job multigpu-tests 0,1 python -m pytest -m multigpu -q -p no:cacheprovider tests \
    --junitxml="$WORK/multigpu-tests.xml"
}

# Pipeline on one GPU: the GPU tests, then the strategy's per-step cost over a bare schedule loop.
set_pipeline() {
  job pipeline-gpu-tests 0 python -m pytest -q -p no:cacheprovider tests/pipeline/test_pipeline_gpu.py \
    tests/compile/test_gpu.py
  job pipeline-overhead 0 python benchmarks/pipeline_overhead.py --repeats 3 --out "$WORK/pipeline_overhead.json"
}

# Cold start (every run a fresh process with empty compile caches), 3 seeds, one task per call: `baseline`
# against `speedup`; for Fashion-MNIST then the plain-PyTorch loop of `speedup` (CUDA graphs, no cuDNN
# benchmark mode), each seed its own process.
set_cold_fashion() {
  job cold-fashion 0 lightning-speedup bench --time-budget "$(($(budget) - 60))" --task fashion-mnist --cache cold \
    --recipe baseline --recipe speedup --seeds 3 --out "$WORK/cold-fashion"
  local seed
  for seed in 0 1 2; do
    job "reference-loop-speedup-$seed" 0 python benchmarks/reference_loop.py --seed "$seed" --cuda-graphs \
      --no-cudnn-benchmark --out "$WORK/reference_loop_speedup_seed$seed.json"
  done
}
# The plain-PyTorch loop of `speedup` beside `speedup` alone (no baseline), Fashion-MNIST, cold, 3 seeds each (the
# headline's loop comparison, headline/2026-12-05-h200-loop-fashion).
set_loop_fashion() {
  local seed
  for seed in 0 1 2; do
    job "reference-loop-speedup-$seed" 0 python benchmarks/reference_loop.py --seed "$seed" --cuda-graphs \
      --no-cudnn-benchmark --out "$WORK/reference_loop_speedup_seed$seed.json"
  done
  job loop-fashion-speedup 0 lightning-speedup bench --time-budget "$(budget)" --task fashion-mnist --cache cold \
    --recipe speedup --seeds 3 --out "$WORK/loop-fashion/fashion-mnist"
}
set_cold_charlm() {
  job cold-charlm 0 lightning-speedup bench --time-budget "$(budget)" --task char-lm --cache cold \
    --recipe baseline --recipe speedup --seeds 3 --out "$WORK/cold-charlm"
}
# Cold compile cost outside Lightning (each variant a fresh process): eager, whole-model, regional, regional from
# saved artifacts, on the 24- and 6-layer GPTs; each step timed on its own, recompilations counted.
set_compile_cold_start() {
  job compile-cold-start 0 python benchmarks/compile_cold_start.py --models gpt24 gpt6 \
    --out "$WORK/compile_cold_start.json"
}
# The LM's attention kernel on a cold start: the compile package's GPU tests (one prints the kernel PyTorch picks
# by default), then `speedup-lm-cudagraphs` (PyTorch's default attention, cuDNN on an H200) against `speedup`
# (SDPABackends(): no cuDNN attention), cold, 3 seeds. `cold-charlm` measures `speedup` against `baseline`.
set_attention_charlm() {
  job compile-gpu-tests 0 python -m pytest -q -s -p no:cacheprovider tests/compile/test_gpu.py \
    --junitxml="$WORK/compile-gpu-tests.xml"
  job attention-charlm 0 lightning-speedup bench --time-budget "$(budget)" --task char-lm --cache cold \
    --recipe speedup-lm-cudagraphs --recipe speedup --seeds 3 --resume --out "$WORK/attention-charlm"
}
# `speedup` warm beside cold on both tasks: per seed a cold run, then a fresh process reusing its caches.
set_warm() {
  job warm-fashion 0 lightning-speedup bench --time-budget "$(($(budget) / 3))" --task fashion-mnist \
    --cache both --recipe speedup --seeds 3 --out "$WORK/warm-fashion"
  set_warm_charlm
}
# The char-LM part of `warm` alone (Fashion-MNIST's is headline/2026-12-05-h200-warm).
set_warm_charlm() {
  job warm-charlm 0 lightning-speedup bench --time-budget "$(budget)" --task char-lm --cache both \
    --recipe speedup --seeds 3 --resume --out "$WORK/warm-charlm"
}
# The LM's compile candidates (which derive from `speedup-autotune`, the LM step eager) beside it and `speedup`
# (12 cold runs; where a call's limit cuts them short, run the set again on the warm machine: --resume continues).
set_compile_charlm() {
  job compile-charlm 0 lightning-speedup bench --time-budget "$(budget)" --task char-lm --cache cold \
    --recipe speedup --recipe speedup-autotune --recipe speedup-regional --recipe speedup-auto --seeds 3 \
    --resume --out "$WORK/compile-charlm"
}

# A second corpus no recipe was tuned on (issue 21): the King James Bible as Debian's bible-kjv prints it
# (`bible -p usr/lib "gen1:1-rev22:21"`, 4.3 MB, carried as .data/kjv/kjv.txt), with Tiny Shakespeare's epoch and
# validation sizes (3,840 training windows, 435 validation windows) so that the recipes' epoch budgets mean the
# same number of samples. One `baseline` run for 60 epochs (half its budget) calibrates the target
# (benchmarks/corpus_target.py: its best loss + 0.02, rounded up); then `baseline` against `speedup`, 3 seeds.
set_second_corpus() {
  local data=.data/kjv/kjv.txt sizes=(--train-subset 3840 --val-subset 435) target
  if [ ! -f "$data" ]; then  # built on the workstation (the GPU machine has no network) and carried in .data
    echo "second-corpus: $data is missing. Build it where apt works: apt-get download bible-kjv bible-kjv-text;" \
      "for d in bible-kjv*.deb; do dpkg-deb -x \$d kjv; done; (cd kjv && ./usr/bin/bible -p usr/lib" \
      "'gen1:1-rev22:21') > $data" >&2
    return 2
  fi
  # A call's limit can cut the set: SECOND_CORPUS_FROM=<a folder holding corpus-calibrate/ and second-corpus/ from an
  # earlier call, carried in the working tree> continues it (the calibration is not run again; --resume).
  if [ -n "${SECOND_CORPUS_FROM:-}" ] && [ ! -d "$WORK/corpus-calibrate" ]; then
    cp -r "$SECOND_CORPUS_FROM"/corpus-calibrate "$SECOND_CORPUS_FROM"/second-corpus "$WORK"/ 2>/dev/null
  fi
  if [ ! -f "$WORK/corpus-calibrate/report.json" ]; then
    job corpus-calibrate 0 lightning-speedup bench --task char-lm --data "$data" "${sizes[@]}" --cache cold \
      --recipe baseline --seeds 1 --target 0 --max-epochs 60 --out "$WORK/corpus-calibrate"
    # (exit 3 there is expected: target 0 is never reached; the script checks that the run finished)
  fi
  target=$(python3 benchmarks/corpus_target.py "$WORK/corpus-calibrate") || return
  echo "second corpus: target val loss $target"
  job second-corpus 0 lightning-speedup bench --time-budget "$(budget)" --task char-lm --data "$data" \
    "${sizes[@]}" --cache cold --target "$target" --recipe baseline --recipe speedup --seeds 3 --resume \
    --out "$WORK/second-corpus"
}

# The second corpus's `speedup` with a longer schedule (its 40-epoch one, tuned on Tiny Shakespeare, ends at about the
# target there: 1 of 3 runs reached it) beside `baseline`, interleaved by seed in one call so that the ratio compares
# runs of one machine: SECOND_CORPUS_EPOCHS (default 50) the schedule's length, at the target and sizes of
# set_second_corpus (TARGET, default 1.2, the calibrated one), 3 seeds, cold. Each recipe has its own folder (the
# bench's --max-epochs is one budget for all its recipes). A call's limit can cut it: SECOND_CORPUS_FROM=<the folder
# an earlier call brought back, carried in the working tree> continues it (--resume runs only the missing seeds).
set_second_corpus_paired() {
  local epochs=${SECOND_CORPUS_EPOCHS:-50} seed name
  local common=(--task char-lm --data .data/kjv/kjv.txt --train-subset 3840 --val-subset 435 --cache cold
    --target "${TARGET:-1.2}" --resume)
  local -A extra=([baseline]="" [speedup]="--max-epochs $epochs")
  local -A folder=([baseline]=second-corpus-baseline [speedup]="second-corpus-speedup-${epochs}ep")
  local -A need=([baseline]=150 [speedup]=60)  # a run's whole process on an H100 (2026-12-05), to the target
  if [ -n "${SECOND_CORPUS_FROM:-}" ]; then
    for name in baseline speedup; do
      [ -d "$WORK/${folder[$name]}" ] || cp -r "$SECOND_CORPUS_FROM/${folder[$name]}" "$WORK/" 2>/dev/null
    done
  fi
  for seed in 0 1 2; do
    for name in baseline speedup; do
      # one seed per bench, so it cannot judge the time a run needs from the seeds before: skip it here
      if [ "$(budget)" -lt "${need[$name]}" ]; then
        echo "[job ${folder[$name]}-seed$seed] skipped: $(budget) s left, a run needs about ${need[$name]} s"
        continue
      fi
      # shellcheck disable=SC2086  # extra holds whole arguments
      job "${folder[$name]}-seed$seed" 0 lightning-speedup bench --time-budget "$(budget)" "${common[@]}" \
        --recipe "$name" ${extra[$name]} --first-seed "$seed" --seeds 1 --out "$WORK/${folder[$name]}"
    done
  done
  for name in baseline speedup; do  # the report over the 3 seeds (runs nothing when every seed has run)
    # shellcheck disable=SC2086
    job "${folder[$name]}" 0 lightning-speedup bench --time-budget "$(budget)" "${common[@]}" \
      --recipe "$name" ${extra[$name]} --seeds 3 --out "$WORK/${folder[$name]}"
  done
}

# The ablation ladders, cold, one task per call (--resume continues a folder a call's limit cut short). A ladder is
# 17-19 recipes, so 3 seeds take longer than a session's device time: ABLATION_FROM=<the folder an earlier call
# brought back, carried in the working tree> continues it on a fresh machine (the report flags runs from different
# machines).
_ablation() {
  local task=$1 key=$2
  if [ -n "${ABLATION_FROM:-}" ] && [ ! -d "$WORK/ablation-$key" ]; then
    cp -r "$ABLATION_FROM" "$WORK/ablation-$key" || return
  fi
  job "ablation-$key" 0 lightning-speedup bench --time-budget "$(budget)" --task "$task" --ablation \
    --cache cold --seeds "${ABLATION_SEEDS:-1}" --resume --out "$WORK/ablation-$key"
}
set_ablation_fashion() { _ablation fashion-mnist fashion; }
set_ablation_charlm() { _ablation char-lm charlm; }

# Compile and CUDA-graph candidates on Fashion-MNIST (all with cuDNN benchmark mode), cold, 3 seeds; then the
# plain-PyTorch loop of `speedup-eager-step` and of `speedup-autotune` (3 seeds each, each its own process) for the
# cost of the Lightning integration.
set_compile_candidates() {
  job compile-candidates 0 lightning-speedup bench --time-budget "$(($(budget) - 90))" --task fashion-mnist \
    --cache cold --recipe speedup-eager-step --recipe speedup-autotune --recipe speedup-regional --recipe speedup-auto \
    --seeds 3 --out "$WORK/compile-candidates"
  local seed
  for seed in 0 1 2; do
    job "reference-loop-$seed" 0 python benchmarks/reference_loop.py --seed "$seed" \
      --out "$WORK/reference_loop_seed$seed.json"
    job "reference-loop-graphs-$seed" 0 python benchmarks/reference_loop.py --seed "$seed" --cuda-graphs \
      --out "$WORK/reference_loop_graphs_seed$seed.json"
  done
  # Warm beside cold: regional compilation starting from the artifacts a throw-away run saved.
  job compile-warm 0 lightning-speedup bench --time-budget "$(budget)" --task fashion-mnist --cache warm \
    --recipe speedup-regional --seeds 2 --out "$WORK/compile-warm"
}

# Regional compilation cold beside warm from the artifacts a throw-away run saved (--cache both), on both tasks,
# 2 seeds each, so that both sides of the comparison come from one machine (about 8 minutes).
set_compile_warm() {
  job compile-warm-fashion 0 lightning-speedup bench --time-budget "$(($(budget) / 2))" --task fashion-mnist \
    --cache both --recipe speedup-regional --seeds 2 --resume --out "$WORK/compile-warm-fashion"
  job compile-warm-charlm 0 lightning-speedup bench --time-budget "$(budget)" --task char-lm \
    --cache both --recipe speedup-regional --seeds 2 --resume --out "$WORK/compile-warm-charlm"
}

# Recipe sweeps by time to target with fractional GPUs (4 trials share the GPU): the GPU tests of the tuner,
# then a Bayesian sweep of the `speedup` recipe beside a random one with the same budget, on $TUNE_TASK (char-lm
# by default, or fashion-mnist). Ray and Optuna come from the carried wheels (benchmarks/gpu_wheels.py builds
# .whl/; device_env.sh installs them).
# A sweep that would end after the budget is not started (exit 4): run the set again on the warm machine and
# --resume adds the missing sweeps to the result file (the tests, once passed, are not run again).
set_tune() {
  local task=${TUNE_TASK:-char-lm}
  local key=${task//-/}
  if [ -d .whl ] && ! python3 -c "import ray.tune, optuna" >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  # TUNE_TESTS=0 skips them where a call's minutes are for the sweeps.
  if [ "${TUNE_TESTS:-1}" != 0 ] && ! grep -qs 'errors="0" failures="0"' "$WORK/tune-gpu-tests.xml"; then
    # (tests/tune/test_notebook.py needs nbformat, which the GPU image lacks; it has no GPU test.)
    job tune-gpu-tests 0 python -m pytest -q -p no:cacheprovider -m gpu tests/tune/test_sweep.py tests/tune/test_units.py \
      --junitxml="$WORK/tune-gpu-tests.xml"
  fi
  # TUNE_RESUME_FROM=<a committed result file> continues its sweeps (same settings) instead of starting afresh,
  # e.g. with a file whose Bayesian sweep ran (and TUNE_SAMPLES as it ran), only the missing random sweep runs.
  # Trials' DataLoader workers pass batches through /dev/shm; two trials of the random sweep on 2026-12-05 failed
  # when their workers exited, cause unknown: its size goes into the log.
  echo "/dev/shm: $(df -h /dev/shm 2>&1 | tail -n 1)" | tee "$WORK/shm.txt"
  if [ -n "${TUNE_RESUME_FROM:-}" ] && [ ! -f "$WORK/tune_recipe_$key.json" ]; then
    cp "$TUNE_RESUME_FROM" "$WORK/tune_recipe_$key.json"
  fi
  job "tune-recipe-$key" 0 python benchmarks/tune_recipe.py --device gpu --task "$task" --gpus-per-trial 0.25 \
    --num-samples "${TUNE_SAMPLES:-16}" --scheduler "${TUNE_SCHEDULER:-none}" --compare-random --time-budget "$(($(budget) - ${TUNE_CONFIRM_S:-0}))" \
    --resume --out "$WORK/tune_recipe_$key.json" --recipe-out "$WORK/speedup_tuned_$key.py"
  # The sweep's best against the hand-picked recipe, cold, alone on the GPU (TUNE_CONFIRM_S reserves the time).
  if [ "${TUNE_CONFIRM_S:-0}" -gt 0 ] && [ -f "$WORK/speedup_tuned_$key.py" ]; then
    LIGHTNING_SPEEDUP_RECIPES="$WORK/speedup_tuned_$key.py" job "tune-confirm-$key" 0 lightning-speedup bench \
      --time-budget "$(budget)" --task "$task" --cache cold --recipe speedup --recipe speedup-tuned --seeds 3 \
      --out "$WORK/tune-confirm-$key"
  fi
}

# --- main -------------------------------------------------------------------------------------
sets=$(declare -F | awk '{print $3}' | sed -n 's/^set_//p' | tr _ - | tr '\n' ' ')
name=${1:-}
if [ -z "$name" ] || [ "$name" = list ]; then
  echo "job sets: $sets"
  [ -z "$name" ] && exit 2 || exit 0
fi
fn="set_${name//-/_}"
if ! declare -F "$fn" >/dev/null; then
  echo "unknown job set '$name'; choose one of: $sets" >&2
  exit 2
fi
source "$(dirname "$0")/device_env.sh"
"$fn"
pack
