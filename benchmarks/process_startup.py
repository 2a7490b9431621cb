"""Where a fresh process's start goes on this machine, and whether a process that holds the GPU open shortens it.

Every bench run is a fresh process, and what a process spends before its clock starts is device time that the
measurements do not use (the CHANGELOG says how much the device showed). Each try here starts a fresh
``python`` that reports timestamps: the interpreter's start, ``import torch``, ``import lightning``,
``import lightning_speedup``, CUDA's initialisation and its first allocation (the context), and one
``nvidia-smi`` query (the bench's power sampler runs it). Two configurations, interleaved try by try after one
throw-away try that warms the file cache:

* ``alone``: nothing else has the GPU open (as between two bench runs);
* ``gpu-held``: another process holds a CUDA context on the same GPU while the try runs (what a bench whose
  parent kept the GPU open would give its runs). Skipped without CUDA.

    python benchmarks/process_startup.py --tries 5 --out $OUT/process_startup.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _cli import tries_and_out

CHILD = r"""
import json, subprocess, sys, time
t = {"started": time.time()}
import torch
t["torch"] = time.time()
import lightning
t["lightning"] = time.time()
import lightning_speedup
t["lightning_speedup"] = time.time()
if torch.cuda.is_available():
    torch.cuda.init()
    t["cuda_init"] = time.time()
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    t["cuda_context"] = time.time()
    try:
        subprocess.run(["nvidia-smi", "--query-gpu=power.draw", "--format=csv,noheader"], capture_output=True,
                       timeout=20, check=False)
        t["nvidia_smi"] = time.time()
    except OSError:
        pass
print(json.dumps(t))
"""

HOLDER = (
    "import sys, torch; torch.empty(1, device='cuda'); torch.cuda.synchronize(); print('ready', flush=True); "
    "sys.stdin.read()"
)


def _phases(launched: float, stamps: dict[str, float]) -> dict[str, float]:
    """Seconds per phase: each stamp minus the one before it (the first minus the launch)."""
    out, before = {}, launched
    for name in (
        "started",
        "torch",
        "lightning",
        "lightning_speedup",
        "cuda_init",
        "cuda_context",
        "nvidia_smi",
    ):
        if name in stamps:
            out["interpreter" if name == "started" else name] = stamps[name] - before
            before = stamps[name]
    out["total"] = before - launched
    return out


def _one_try(env: dict[str, str]) -> dict[str, float]:
    launched = time.time()
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return _phases(launched, json.loads(done.stdout.strip().splitlines()[-1]))


def _holder(env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the process meant to hold the GPU open did not start")
    return proc


def _write(
    out: Path, tries: dict[str, list[dict[str, float]]], planned: int, done: int, env: dict[str, object]
) -> dict[str, dict[str, float]]:
    medians = {c: {k: statistics.median(t[k] for t in ts) for k in ts[0]} for c, ts in tries.items()}
    record = {
        "what": "a fresh process's start by phase (median of the tries), alone and with the GPU held open",
        "tries_per_configuration": done,
        "tries_planned": planned,
        "medians_s": medians,
        "tries": tries,
        "command": "python benchmarks/process_startup.py " + " ".join(sys.argv[1:]),
        "env": env,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    return medians


def main() -> None:
    args = tries_and_out(__doc__, 5)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    from lightning_speedup.bench.env import environment

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    configs = ["alone", "gpu-held"] if torch.cuda.is_available() else ["alone"]
    env_record = environment()
    _one_try(env)  # throw-away: warms the file cache
    tries: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    for i in range(args.tries):
        for config in configs:
            holder = _holder(env) if config == "gpu-held" else None
            try:
                tries[config].append(_one_try(env))
            finally:
                if holder is not None:
                    holder.communicate(input="", timeout=60)
            print(f"try {i + 1}/{args.tries} {config}: " + ", ".join(
                f"{k} {v:.2f} s" for k, v in tries[config][-1].items()), flush=True)  # fmt: skip
        # Written after every round, so a call's time limit keeps the rounds that finished.
        medians = _write(args.out, tries, args.tries, i + 1, env_record)
    for config, m in medians.items():
        print(f"{config:9s} " + ", ".join(f"{k} {v:.2f} s" for k, v in m.items()))


if __name__ == "__main__":
    main()
