"""benchmarks/step_overhead.py runs end to end on the CPU at toy sizes and writes both paths and the profile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_step_overhead_script_times_both_paths_and_splits_the_lightning_step(
    fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "step_overhead.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_overhead.py"), "--data", str(fashion_mnist_dir),
         "--device", "cpu", "--batch-size", "4", "--width", "1", "--steps", "3", "--val-steps", "2", "--epochs", "2",
         "--repeats", "1", "--profile-steps", "6", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    record = json.loads(out.read_text())
    assert record["benchmark"] == "step_overhead" and record["device"] == "cpu"
    assert record["environment"]["gpu"] is None
    assert set(record["ms_per_step"]) == {"lightning", "lightning_no_step_log", "plain"}
    for path in ("lightning", "lightning_no_step_log", "plain"):
        assert record["ms_per_step"][path]["median"] > 0
        assert [r["epochs"] for r in record["runs"][path]] == [2]
        assert (
            record["ms_per_epoch"][path] > 3 * record["ms_per_step"][path]["median"]
        )  # 3 steps + validation
    lightning, plain = record["ms_per_step"]["lightning"]["median"], record["ms_per_step"]["plain"]["median"]
    assert record["lightning_minus_plain_ms"] == pytest.approx(lightning - plain)
    profile = record["profile"]
    assert profile["steps"] == 6  # 2 epochs of 3 steps
    buckets = profile["buckets_ms_per_step"]
    assert {"self.log", "ours: GPUAugment", "ours: schedule callback", "backward"} <= set(buckets)
    assert buckets["ours: GPUAugment"] > 0 and buckets["self.log"] > 0 and buckets["backward"] > 0
    assert buckets["Lightning: everything else in the step"] > 0
    # The buckets split the profiled step without gaps or overlaps.
    assert sum(buckets.values()) == pytest.approx(profile["ms_per_step_profiled"])
    assert sum(profile["buckets_share"].values()) == pytest.approx(1.0)
    lightning = profile["lightning_self_ms_per_step"]
    assert lightning and all(
        "lightning" in row["function"] and row["calls_per_step"] >= 1 for row in lightning
    )


@pytest.mark.gpu
def test_step_overhead_script_on_cuda(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "step_overhead.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_overhead.py"), "--data", str(fashion_mnist_dir),
         "--device", "cuda", "--steps", "5", "--val-steps", "2", "--epochs", "2", "--repeats", "1",
         "--profile-steps", "10", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    record = json.loads(out.read_text())
    assert record["device"] == "cuda" and record["environment"]["gpu"]
    assert all(record["ms_per_step"][path]["median"] > 0 for path in ("lightning", "plain"))
