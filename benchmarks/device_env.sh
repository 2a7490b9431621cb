#!/usr/bin/env bash
# Source this on the device machine (see ../shared/DEVICE.md): installs carried wheels from .whl/ that
# the image lacks, installs the project without touching the image's torch, points the loaders at .data/.
#   carry: [".data", ".whl"]      command: source benchmarks/device_env.sh && lightning-speedup bench ...
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/tmp/pip-install.log 2>&1 || cat /tmp/pip-install.log
export LIGHTNING_SPEEDUP_DATA="$PWD/.data"
export PATH="$HOME/.local/bin:$PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'gpus', torch.cuda.device_count())"
