"""CPU smoke tests of the reference loop and the compile cold-start benchmark (toy sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str, *args: str, tmp_path: Path) -> dict:
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / name), *args, "--out", str(out)],
        env=env, check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return json.loads(out.read_text())


def test_reference_loop_reaches_a_toy_target_on_cpu(tmp_path: Path, fashion_mnist_dir) -> None:  # type: ignore[no-untyped-def]
    result = _script(
        "reference_loop.py", "--device", "cpu", "--data", str(fashion_mnist_dir), "--train-subset", "256",
        "--val-subset", "128", "--width", "4", "--batch-size", "64", "--max-epochs", "2", "--target", "0.0",
        tmp_path=tmp_path,
    )  # fmt: skip
    assert result["reached"] and result["time_to_target_s"] == result["history"][0]["elapsed_s"] > 0
    assert result["seed"] == 0 and result["torch"] and result["date"] and result["gpu"] is None
    assert result["args"]["compile"] == "none" and result["args"]["precision"] == "32"
    # cuDNN benchmark mode on, as `speedup-autotune`; --no-cudnn-benchmark as `speedup`.
    assert result["args"]["cudnn_benchmark"] is True
    # Cold by default: a fresh process with its compile caches (CUDA's included) in a folder of its own, removed.
    cuda_cache = Path(result["cache_env"]["CUDA_CACHE_PATH"])
    assert result["args"]["cache"] == "cold" and cuda_cache.parent.name.startswith("reference-loop-caches-")
    assert all(Path(v).parent == cuda_cache.parent for v in result["cache_env"].values() if "/" in str(v))
    assert not cuda_cache.parent.exists()
    assert 0.0 <= result["history"][0]["val_acc"] <= 1.0 and result["history"][0]["step"] == 4


def test_reference_loop_refuses_cuda_graphs_without_cuda(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reference_loop.py"), "--device", "cpu", "--cuda-graphs",
         "--out", str(tmp_path / "x.json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (
        proc.returncode == 2 and "--cuda-graphs graphs the uncompiled model on a CUDA device" in proc.stderr
    )
    assert not (tmp_path / "x.json").exists()


@pytest.mark.gpu
def test_reference_loop_with_cuda_graphs_reaches_a_toy_target(tmp_path: Path, fashion_mnist_dir) -> None:  # type: ignore[no-untyped-def]
    result = _script(
        "reference_loop.py", "--data", str(fashion_mnist_dir), "--train-subset", "2048", "--val-subset", "512",
        "--width", "8", "--max-epochs", "2", "--target", "0.0", "--cuda-graphs", tmp_path=tmp_path,
    )  # fmt: skip
    assert result["reached"] and result["args"]["cuda_graphs"] is True and result["gpu"]


@pytest.mark.parametrize("variants", [["eager", "regional+cache"]])
def test_compile_cold_start_runs_each_variant_in_a_fresh_process(tmp_path: Path, variants: list[str]) -> None:
    result = _script(
        "compile_cold_start.py", "--device", "cpu", "--tiny", "--backend", "aot_eager", "--models", "gpt6",
        "--steps", "2", "--variants", *variants, tmp_path=tmp_path,
    )  # fmt: skip
    rows = result["rows"]
    assert [r["variant"] for r in rows] == variants
    assert all("error" not in r and r["first_step_s"] > 0 and r["steps_s"] > 0 for r in rows), rows
    assert all(0 < r["step_ms_median"] <= r["step_ms_max"] for r in rows), rows
    # Eager compiles nothing; the regional blocks compile one graph in the first step and none after it.
    assert [(r["graphs_first_step"], r["graphs_later"]) for r in rows] == [(0, 0), (1, 0)], rows
