#!/usr/bin/env bash
# Device call prepared 2026-11-27 (session 5), a 4-GPU host; carry [".data", ".whl"]:
#   GPUs 0,1  issue 6 (a): PowerSGD with its compression replayed as CUDA graphs. First the NCCL comm-hook test
#             (graphs vs eager, resume), then powersgd_profile.py (hook host time, step time), then tokens/s
#             over NVLink of ddp / ddp_powersgd (graphs) / ddp_powersgd_eager / compute_only, interleaved.
#   GPUs 2,3  issue 6 (b): the 2-GPU time to val loss 1.47 through sockets that met the goal with seed 0
#             (64 sequences per GPU, dropout 0.3, local SGD 2.63x DDP), with seed 1.
#   bash benchmarks/device_call_round9.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-480}"
(job hook-tests 0,1 python -m pytest -q -p no:cacheprovider tests/distributed/test_multigpu.py -k comm_hooks
 job powersgd-profile-graphs 0,1 python benchmarks/powersgd_profile.py --devices 2 --sync-hook --profile-steps 0 \
   --out "$WORK/powersgd_profile_graphs.json"
 job dist2-powersgd-graphs 0,1 python benchmarks/distributed_charlm.py --devices 2 --repeats 2 --networks nvlink \
   --strategies ddp,ddp_powersgd,ddp_powersgd_eager,compute_only --out "$WORK/distributed_charlm_powersgd_graphs.json") &
job dist2-ttt-b64-drop3-seed1 2,3 python benchmarks/distributed_charlm.py --devices 2 --batch-size 64 --mode ttt \
  --networks sockets --strategies local_sgd,ddp --caps "local_sgd=1.6,ddp=3.4" --schedule-steps 1500 \
  --dropout 0.3 --eval-every 50 --seed 1 --out "$WORK/distributed_charlm_2gpu_b64_drop3_seed1_ttt.json" &
wait
pack
