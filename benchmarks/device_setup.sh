#!/usr/bin/env bash
# Source on a lent GPU machine (python3 with torch there, no network): makes this checkout importable,
# puts a `lightning-speedup` command on PATH, points the loaders at the carried .data/ folder.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export LIGHTNING_SPEEDUP_DATA=$PWD/.data LIGHTNING_SPEEDUP_TEST_DATA=$PWD/.data WORK=/tmp/work
mkdir -p /tmp/bin "$WORK"
printf '#!/bin/sh\nexec python3 -c "import sys; from lightning_speedup.cli import main; sys.exit(main())" "$@"\n' \
  >/tmp/bin/lightning-speedup
chmod +x /tmp/bin/lightning-speedup
export PATH=/tmp/bin:$PATH
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
