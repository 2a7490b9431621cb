"""Hardware and software facts recorded with every result (docs/design.md: measured claims only)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import threading
from pathlib import Path
from typing import Any

import torch


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


OPTIONAL_PACKAGES = ("bitsandbytes", "ray", "optuna")


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
    # The optional dependencies a result may depend on (quantization's bitsandbytes formats, the tuner), by
    # their installed metadata: nothing is imported, and a package that is absent is left out.
    for package in OPTIONAL_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
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


class PowerSampler:
    """Mean power draw of one GPU while a run trains, from ``nvidia-smi`` sampled every ``interval_s``.

    ``mean_w`` is None where ``nvidia-smi`` reports no power (a CPU, or a GPU without the sensor).
    """

    def __init__(self, gpu_index: int = 0, interval_s: float = 0.5) -> None:
        self.gpu_index, self.interval_s = gpu_index, interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float | None:
        out = _run(
            ["nvidia-smi", "--query-gpu=power.draw", "--format=csv,noheader,nounits", f"-i={self.gpu_index}"]
        )
        try:
            return float(out) if out else None
        except ValueError:  # "[N/A]" on boards without the sensor
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            watts = self._read()
            if watts is None:
                return
            self.samples.append(watts)

    def __enter__(self) -> PowerSampler:
        if torch.cuda.is_available() and self._read() is not None:
            self._thread = threading.Thread(target=self._loop, name="power-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def mean_w(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None
