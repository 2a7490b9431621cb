#!/usr/bin/env bash
# Device call prepared 2026-11-27 (session 5), a 4-GPU host; carry [".data", ".whl"]:
#   GPUs 0,1  issue 6 (a): PowerSGD graphs with the approximation written straight into the gradients and
#             gradient_as_bucket_view: NCCL hook test, kernel profile of the graphed step, tokens/s over NVLink
#             and sockets against DDP (interleaved), then every gpu/multigpu test.
#   GPU 2     issue 5: coarse nf4 blocks (1024, 4096; absmax and LSQ scales), 3 seeds.
#   GPU 3     issue 5: decode/prefill speed on a 6.4B-parameter GPT (32 layers x 4096, random weights):
#             is bf16 decode closer to the memory bound at this size, and do 4-bit / W8A8 win there?
#   bash benchmarks/device_call_round10.sh [DEADLINE_S]
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-470}"
(job hook-tests 0,1 python -m pytest -q -p no:cacheprovider tests/distributed/test_multigpu.py -k comm_hooks
 job powersgd-profile-kernels 0,1 python benchmarks/powersgd_profile.py --devices 2 --profile-steps 5 \
   --configs compute_only ddp ddp_powersgd --out "$WORK/powersgd_profile_kernels.json"
 job dist2-powersgd-direct 0,1 python benchmarks/distributed_charlm.py --devices 2 --repeats 2 \
   --strategies ddp,ddp_powersgd,ddp_powersgd_eager,compute_only --out "$WORK/distributed_charlm_powersgd_direct.json"
 job all-gpu-tests 0,1 python -m pytest -m "gpu or multigpu" -q -p no:cacheprovider --ignore tests/tune tests) &
job quant-accuracy-coarse 2 python benchmarks/quant_accuracy.py --formats nf4 nf4-b1024 nf4-b4096 nf4-b4096-lsq \
  --seeds 0 1 2 --out "$WORK/quant_accuracy_nf4_coarse.json" &
job quant-speed-6b 3 python benchmarks/quant_speed.py --layers 32 --width 4096 --heads 32 --repeats 3 \
  --only w8a8_torch_int_mm w8a8_bnb int4_g32_tinygemm nf4_bnb --out "$WORK/quant_speed_6b.json" &
wait
pack
