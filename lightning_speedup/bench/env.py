"""Hardware and software facts recorded with every result (docs/design.md: measured claims only)."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def environment() -> dict[str, Any]:
    """GPU name(s), driver, CUDA, torch/Lightning versions, host facts and the date (UTC)."""
    import lightning

    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda": torch.version.cuda,
        "gpu": None,
        "gpu_count": torch.cuda.device_count(),
        "driver": None,
    }
    try:
        import torchmetrics

        info["torchmetrics"] = torchmetrics.__version__
    except ImportError:  # pragma: no cover - a required dependency
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        smi = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
        if smi:
            # Every GPU of the host as nvidia-smi names it, and the driver of the first.
            info["nvidia_smi_gpus"] = [line.split(",")[0].strip() for line in smi.splitlines()]
            info["driver"] = smi.splitlines()[0].split(",")[-1].strip()
    repo = Path(__file__).resolve().parents[2]
    # The device machine's copy of the tree may carry a stale .git: a launcher that knows passes the commit.
    info["git_commit"] = os.environ.get("LIGHTNING_SPEEDUP_GIT_COMMIT") or _run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"]
    )
    return info


def device_label(info: dict[str, Any]) -> str:
    return info["gpu"] or f"CPU ({info['cpu_count']} cores)"
