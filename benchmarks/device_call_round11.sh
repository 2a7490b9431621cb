#!/usr/bin/env bash
# Device call prepared 2026-11-27 (session 5), a 4-GPU host; carry [".data", ".whl"]. A quiet host this time
# (rounds 9-10 ran PowerSGD next to CPU-heavy jobs, and DDP's own step moved by 25% between repeats):
#   GPUs 0,1  issue 6 (a): PowerSGD graphs (state bound once): NCCL hook test, tokens/s over NVLink against DDP,
#             3 interleaved repeats, then the hook's host time (powersgd_profile.py).
#   GPU 2     the GPU data tests again (a DataLoader worker died in round 10 while four jobs shared the host).
#   bash benchmarks/device_call_round11.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-300}"
(job hook-tests 0,1 python -m pytest -q -p no:cacheprovider tests/distributed/test_multigpu.py -k comm_hooks
 job dist2-powersgd-quiet 0,1 python benchmarks/distributed_charlm.py --devices 2 --repeats 3 --networks nvlink \
   --strategies ddp,ddp_powersgd,compute_only --out "$WORK/distributed_charlm_powersgd_quiet.json"
 job powersgd-profile-quiet 0,1 python benchmarks/powersgd_profile.py --devices 2 --sync-hook --profile-steps 0 \
   --out "$WORK/powersgd_profile_quiet.json") &
job gpu-data-tests 2 python -m pytest -m gpu -q -p no:cacheprovider tests/data &
wait
pack
