"""Logging a number from a callback or strategy without stalling the GPU."""

from __future__ import annotations

from typing import Any

import torch
from lightning import LightningModule

__all__ = ["log_number"]


def log_number(module: LightningModule, name: str, value: float, **kwargs: Any) -> None:
    """``module.log(name, value, **kwargs)`` for a Python number, without a host-device sync.

    ``LightningModule.log`` turns a number into a tensor on the module's device, and on CUDA that copy
    from pageable host memory blocks until the GPU's stream has drained (``torch.tensor(x,
    device="cuda")`` synchronises), which every step keeps the host from running ahead of the GPU.
    Logged as a CPU tensor, the value stays on the host and reaches loggers and the progress bar the same.
    """
    module.log(name, torch.tensor(float(value), dtype=torch.float64), **kwargs)
