#!/usr/bin/env bash
# Device calls of 2026-11-27's fourth session (a 4-GPU host; carry [".data", ".whl"]); round 6's plan split in two
# calls so that no job depends on a long one before it:
#   part a  GPUs 0,1  issue 6 (b): 2-GPU time to val loss 1.47 through sockets at 64 sequences per GPU (the 4-GPU
#                     run's 128 per step, where local SGD reached 1.47), local SGD then DDP, WSD over 1500 steps
#           GPU 2     issue 5: float vs PTQ vs QAT, int4 g128 and W4A8 with absmax and learnable (LSQ) scales, 3 seeds;
#                     then the single-GPU test suite (pytest -m gpu)
#           GPU 3     issue 4: where the resident step's time goes (gpu_data.py --profile), then bench speedup vs
#                     speedup-cudagraphs vs speedup-gpu-data, 2 seeds
#   part b  GPUs 0,1  issue 6 (a): PowerSGD's throughput after the once-per-step rewrite (DDP, PowerSGD, compute-only,
#                     NVLink and sockets), then the GPU tests (pytest -m multigpu, -m gpu)
#           GPUs 2,3  issue 6 (b): part a's 2-GPU time to target with dropout 0.3 (both overfit at 0.2)
#   part c  GPUs 0,1  issue 6 (a): PowerSGD again after Gram-Schmidt replaced the per-matrix cuSOLVER QR; then the GPU
#                     tests together (multigpu first, as tests/conftest.py orders them)
#           GPU 2     issue 4: gpu_data a/b/c/d compiled, default mode vs CUDA graphs + fused Adam (the profile of part a
#                     put Adam's foreach step first in host time)
#           GPU 3     issue 4: bench speedup vs speedup-cudagraphs (now with fused Adam), 3 seeds
#   part d  GPUs 0,1  the GPU tests together again (multigpu tests spawn once bitsandbytes' import initialized CUDA)
#           GPUs 2,3  issue 6 (a): where PowerSGD's ~20 ms per step go (powersgd_profile.py: hook host time, GPU time,
#                     torch.profiler tables)
#   part e  GPUs 0,1  issue 6 (a): PowerSGD over NVLink after the foreach/baddbmm rewrite of the hook's copies
#           GPUs 2,3  the same through powersgd_profile.py, then the prefetcher-hides-the-copy GPU test alone
#   part f  GPUs 0-3  README's headline: baseline vs today's speedup side by side on Fashion-MNIST, one seed per GPU
#                     (seeds 0-3), after a one-epoch speedup run that fills Inductor's cache (warm, as any later run)
#   bash benchmarks/device_call_round7.sh a|b|c|d|e|f [DEADLINE_S]
# Keep DEADLINE_S well under the call's limit: the machine's start-up counts against it.
set -u
part=${1:?part a or b}
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${2:-500}"
budget() { echo $((JOBS_DEADLINE - $(date +%s) - 30)); }  # bench starts no run after this
if [ "$part" = a ]; then
  job dist2-ttt-b64 0,1 python benchmarks/distributed_charlm.py --devices 2 --batch-size 64 --mode ttt \
    --networks sockets --strategies local_sgd,ddp --caps "local_sgd=2,ddp=4" --schedule-steps 1500 \
    --eval-every 50 --out "$WORK/distributed_charlm_2gpu_b64_ttt.json" &
  (job quant-accuracy 2 python benchmarks/quant_accuracy.py --formats int4-g128 w4a8 int4-g128-lsq w4a8-lsq \
    --seeds 0 1 2 --out "$WORK/quant_accuracy_4bit.json"
   job gpu-tests 2 python -m pytest -m gpu -q -p no:cacheprovider tests) &
  (job gpu-data-profile 3 python benchmarks/gpu_data.py --compile --channels-last --repeats 1 \
    --only a_baseline c_resident_gpuaug --profile a_baseline c_resident_gpuaug --out "$WORK/gpu_data_profile.json"
   job data-bench 3 lightning-speedup bench --time-budget "$(budget)" --task fashion-mnist --recipe speedup \
    --recipe speedup-cudagraphs --recipe speedup-gpu-data --seeds 2 --out "$WORK/data-bench") &
elif [ "$part" = c ]; then
  (job dist2-powersgd-gs 0,1 python benchmarks/distributed_charlm.py --devices 2 --repeats 2 \
    --strategies ddp,ddp_powersgd,compute_only --out "$WORK/distributed_charlm_2gpu_powersgd_gs.json"
   job all-gpu-tests 0,1 python -m pytest -m "gpu or multigpu" -q -p no:cacheprovider --ignore tests/tune tests) &
  (job gpu-data-default 2 python benchmarks/gpu_data.py --compile --channels-last --repeats 2 \
    --out "$WORK/gpu_data_compiled_default.json"
   job gpu-data-graphs 2 python benchmarks/gpu_data.py --compile --compile-mode reduce-overhead --fused \
    --channels-last --repeats 2 --out "$WORK/gpu_data_compiled_cudagraphs_fused.json") &
  job data-bench-graphs 3 lightning-speedup bench --time-budget "$(budget)" --task fashion-mnist --recipe speedup \
    --recipe speedup-cudagraphs --seeds 3 --out "$WORK/data-bench-graphs" &
elif [ "$part" = d ]; then
  job all-gpu-tests 0,1 python -m pytest -m "gpu or multigpu" -q -p no:cacheprovider --ignore tests/tune tests &
  job powersgd-profile 2,3 python benchmarks/powersgd_profile.py --devices 2 --sync-hook \
    --out "$WORK/powersgd_profile.json" &
elif [ "$part" = e ]; then
  job dist2-powersgd-foreach 0,1 python benchmarks/distributed_charlm.py --devices 2 --repeats 2 --networks nvlink \
    --strategies ddp,ddp_powersgd,compute_only --out "$WORK/distributed_charlm_2gpu_powersgd_foreach.json" &
  (job powersgd-profile-foreach 2,3 python benchmarks/powersgd_profile.py --devices 2 --sync-hook --profile-steps 0 \
    --out "$WORK/powersgd_profile_foreach.json"
   job monitor-test 3 python -m pytest -q -p no:cacheprovider \
    tests/data/test_gpu_data_gpu.py::test_monitor_sees_the_copy_and_the_prefetcher_hides_it) &
elif [ "$part" = f ]; then
  for g in 0 1 2 3; do
    (job "warm-cache-$g" "$g" lightning-speedup bench --task fashion-mnist --recipe speedup --seeds 1 --first-seed 9 \
      --max-epochs 1 --out "$WORK/warm-cache-$g"
     job "final-fashion-$g" "$g" lightning-speedup bench --task fashion-mnist --recipe baseline --recipe speedup \
      --seeds 1 --first-seed "$g" --out "$WORK/final-fashion-seed$g") &
  done
else
  # ray is not installed on the device: the tuning tests are CPU tests anyway
  (job dist2-powersgd 0,1 python benchmarks/distributed_charlm.py --devices 2 --repeats 2 \
    --strategies ddp,ddp_powersgd,compute_only --out "$WORK/distributed_charlm_2gpu_powersgd.json"
   job multigpu-tests 0,1 python -m pytest -m multigpu -q -p no:cacheprovider --ignore tests/tune tests
   job gpu-tests 0 python -m pytest -m gpu -q -p no:cacheprovider --ignore tests/tune tests) &
  # part a: both strategies overfit the 1M-character corpus from step ~1000 (best 1.478 / 1.484); more dropout
  job dist2-ttt-b64-drop3 2,3 python benchmarks/distributed_charlm.py --devices 2 --batch-size 64 --mode ttt \
    --networks sockets --strategies local_sgd,ddp --caps "local_sgd=1.6,ddp=3.4" --schedule-steps 1500 \
    --dropout 0.3 --eval-every 50 --out "$WORK/distributed_charlm_2gpu_b64_drop3_ttt.json" &
fi
wait
pack
