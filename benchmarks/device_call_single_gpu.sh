#!/usr/bin/env bash
# One device call (kind nvidia-h100-x4) that runs the single-GPU measurements of issues 3, 4 and 5 side by
# side, one job per GPU (carry [".data", ".whl"]; .whl holds the stripped bitsandbytes wheel):
#   GPU 0  issue 3: fashion-mnist, speedup (constant LR) vs speedup-onecycle vs speedup-wsd, 3 seeds
#   GPU 1  issue 3: char-lm, speedup vs speedup-onecycle, 3 seeds
#   GPU 2  issue 4: gpu_data.py compiled (a/b/c/d), then speedup vs speedup-gpu-data vs speedup-resident
#   GPU 3  issue 5: quant_speed.py alone (timing), then the accuracy-only work at once: quant_accuracy.py,
#          lr_range_validation.py (issue 3) and the gpu-marked tests of data/quantization/schedules
#   bash benchmarks/device_call_single_gpu.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-540}"
budget() { echo $((JOBS_DEADLINE - $(date +%s) - 30)); }  # bench starts no run after this
(job sched-fashion 0 lightning-speedup bench --time-budget $(budget) --task fashion-mnist --recipe speedup --recipe speedup-onecycle --recipe speedup-wsd \
  --seeds 3 --out "$WORK/sched-fashion") &
(job sched-charlm 1 lightning-speedup bench --time-budget $(budget) --task char-lm --recipe speedup --recipe speedup-onecycle --seeds 3 \
  --out "$WORK/sched-charlm") &
(job gpu-data 2 python benchmarks/gpu_data.py --compile --channels-last --out "$WORK/gpu_data_compiled.json"
 job data-bench 2 lightning-speedup bench --time-budget $(budget) --task fashion-mnist --recipe speedup --recipe speedup-gpu-data --recipe speedup-resident \
  --seeds 2 --out "$WORK/data-fashion") &
(job quant-speed 3 python benchmarks/quant_speed.py --out "$WORK/quant_speed.json"
 job quant-accuracy 3 python benchmarks/quant_accuracy.py --out "$WORK/quant_accuracy.json" &
 job lr-range 3 python benchmarks/lr_range_validation.py --out "$WORK/lr_range_validation.json" &
 job gpu-tests 3 python -m pytest -m gpu -q -p no:cacheprovider tests/data tests/quantization tests/schedules \
  --junitxml="$WORK/gpu-tests.xml" &
 wait) &
wait
pack
