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


def _uuid_key(uuid: str) -> str:
    """``GPU-1a2b...`` (nvidia-smi, CUDA_VISIBLE_DEVICES) and ``1a2b...`` (torch) as one spelling."""
    uuid = uuid.strip().lower()
    return uuid[4:] if uuid.startswith("gpu-") else uuid


def smi_index(
    visible: str | None, smi_rows: str | None, ordinal: int = 0, uuid: str | None = None
) -> int | None:
    """nvidia-smi's index of the GPU this process calls CUDA device ``ordinal``, or None where it is unknown.

    ``smi_rows`` is ``nvidia-smi --query-gpu=index,uuid --format=csv,noheader`` (``"0, GPU-1a2b..."`` a line);
    ``visible`` is ``CUDA_VISIBLE_DEVICES``, whose entries are nvidia-smi indices or (prefixes of) UUIDs;
    ``uuid`` is the device's UUID as torch reports it, the surest key where given. A MIG instance, or a UUID
    nvidia-smi does not list, gives None: better no power reading than another GPU's.
    """
    rows: dict[str, int] = {}
    for line in (smi_rows or "").splitlines():
        index, _, row_uuid = line.partition(",")
        if index.strip().isdigit() and row_uuid.strip():
            rows[_uuid_key(row_uuid)] = int(index)
    if uuid:
        key = _uuid_key(uuid)
        if key in rows:
            return rows[key]
    entries = [e.strip() for e in (visible or "").split(",")] if visible is not None else []
    if visible is None or not visible.strip():
        return ordinal  # every GPU visible, in nvidia-smi's order (or none at all: nothing is sampled)
    if ordinal >= len(entries):
        return None
    entry = entries[ordinal]
    if entry.isdigit():
        return int(entry)
    if entry.lower().startswith("mig-"):
        return None
    matches = [i for key, i in rows.items() if key.startswith(_uuid_key(entry))]
    return matches[0] if len(matches) == 1 else None


def visible_gpu_index() -> int | None:
    """nvidia-smi's index of this process's current CUDA device (see :func:`smi_index`)."""
    ordinal = torch.cuda.current_device()
    uuid = None
    with contextlib.suppress(Exception):  # torch builds without the field
        uuid = str(torch.cuda.get_device_properties(ordinal).uuid)
    rows = _run(["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"])
    return smi_index(os.environ.get("CUDA_VISIBLE_DEVICES"), rows, ordinal, uuid)


class PowerSampler:
    """Mean power draw of one GPU while a run trains, from ``nvidia-smi`` sampled every ``interval_s``.

    ``gpu_index`` is nvidia-smi's index; None (the default): the GPU this process uses as its CUDA device, which
    under ``CUDA_VISIBLE_DEVICES`` need not be nvidia-smi's GPU 0 (:func:`visible_gpu_index`).
    ``mean_w`` is None where ``nvidia-smi`` reports no power (a CPU, or a GPU without the sensor).
    """

    def __init__(self, gpu_index: int | None = None, interval_s: float = 0.5) -> None:
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
        if not torch.cuda.is_available():
            return self
        if self.gpu_index is None:
            self.gpu_index = visible_gpu_index()
        if self.gpu_index is not None and self._read() is not None:
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
