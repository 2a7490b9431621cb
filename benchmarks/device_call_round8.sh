#!/usr/bin/env bash
# Next device call (a 4-GPU host; carry [".data", ".whl"]), prepared 2026-11-27 after round 7:
#   GPUs 0,1  issue 6 (b): the 2-GPU time to val loss 1.47 through sockets that met the goal (64 sequences
#             per GPU, dropout 0.3, local SGD 2.63x DDP with seed 0), with seed 1: is 2x robust to the seed?
#   GPU 2     issue 5: coarse nf4 blocks (1024, 4096; absmax and LSQ scales), 3 seeds: a setting where PTQ
#             should cost more than the run-to-run spread, so that QAT's recovered share is measurable
#   GPU 3     README: baseline vs speedup on Fashion-MNIST, seeds 0-1, alone on its GPU (round 7f ran four
#             pairs at once on a shared host), after a cache-filling run
#   bash benchmarks/device_call_round8.sh [DEADLINE_S]
# Keep DEADLINE_S well under the call's limit: the machine's start-up counts against it.
set -u
source benchmarks/device_env.sh
source benchmarks/gpu_jobs.sh "${1:-500}"
job dist2-ttt-b64-drop3-seed1 0,1 python benchmarks/distributed_charlm.py --devices 2 --batch-size 64 --mode ttt \
  --networks sockets --strategies local_sgd,ddp --caps "local_sgd=1.6,ddp=3.4" --schedule-steps 1500 \
  --dropout 0.3 --eval-every 50 --seed 1 --out "$WORK/distributed_charlm_2gpu_b64_drop3_seed1_ttt.json" &
job quant-accuracy-coarse 2 python benchmarks/quant_accuracy.py --formats nf4 nf4-b1024 nf4-b4096 nf4-b4096-lsq \
  --seeds 0 1 2 --out "$WORK/quant_accuracy_nf4_coarse.json" &
(job warm-cache 3 lightning-speedup bench --task fashion-mnist --recipe speedup --seeds 1 --first-seed 9 \
  --max-epochs 1 --out "$WORK/warm-cache"
 job final-fashion 3 lightning-speedup bench --task fashion-mnist --recipe baseline --recipe speedup --seeds 2 \
  --out "$WORK/final-fashion") &
wait
pack
