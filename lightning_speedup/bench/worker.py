"""One bench run in its own process: ``python -m lightning_speedup.bench.worker SPEC.json RESULT.json``.

The bench starts one of these per recipe x seed, with the compile-cache variables of that run in its
environment (see ``runner.cache_environment``), so that every run compiles as a user's fresh process
would. The result, with the cache variables this process saw, is written to ``RESULT.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from lightning_speedup.bench.env import PowerSampler
from lightning_speedup.bench.runner import BenchConfig, cache_environment, run_one, write_atomic

_STARTED_AT = time.time()  # the interpreter has started and every import is done


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m lightning_speedup.bench.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    spec = json.loads(spec_path.read_text())
    cfg = BenchConfig(**spec["config"])
    launched_at = spec.get("launched_at")
    phases = {"imports_s": _STARTED_AT - launched_at} if launched_at is not None else {}
    t0 = time.time()
    with PowerSampler() as power:
        phases["power_sampler_s"] = time.time() - t0
        result = run_one(
            cfg, spec["recipe"], spec["seed"], Path(spec["run_dir"]), echo=lambda s: print(s, flush=True),
            label=spec["label"], launched_at=launched_at, phases=phases,
        )  # fmt: skip
    result.avg_power_w = power.mean_w
    result.cache_env = {k: os.environ[k] for k in cache_environment(Path()) if k in os.environ}
    result.pid = os.getpid()
    write_atomic(result_path, json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
