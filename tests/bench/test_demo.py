"""The demo on a CPU: fp32 for both recipes, a message that says so, a hint that the demo can follow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_speedup.bench.runner import BenchConfig, run_bench
from lightning_speedup.cli import EXIT_BAD_INPUT, EXIT_TERMINATED, main

REPO = Path(__file__).resolve().parents[2]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU demo")


def test_precision_override_runs_every_recipe_in_it(shakespeare_path: Path, tmp_path: Path, capfd) -> None:  # type: ignore[no-untyped-def]
    """bf16 autocast made speedup's CPU demo run about 4x longer than baseline's; the demo runs fp32 there."""
    cfg = BenchConfig(
        task="char-lm", recipes=["speedup"], target=9.9, max_epochs=1, data_path=str(shakespeare_path),
        train_subset=128, val_subset=4, model_kwargs={"n_layer": 1, "n_head": 1, "n_embd": 16, "block_size": 32},
        precision="32-true",
    )  # fmt: skip
    results, meta, complete = run_bench(cfg, tmp_path / "p")
    assert complete and results[0].error is None and results[0].reached
    assert meta["recipes"]["speedup"]["precision"] == "32-true" and meta["precision"] == "32-true"
    captured = capfd.readouterr()
    assert "bfloat16" not in captured.out + captured.err  # Lightning announces bf16 AMP when it is on
    assert "precision 32-true for every recipe" in captured.out


@cpu_only
def test_cpu_demo_says_what_it_runs(fashion_mnist_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "report.json").write_text(json.dumps({"command": "bench"}))  # refused: nothing runs
    assert main(["demo", "--out", str(earlier), "--data", str(fashion_mnist_dir)]) == EXIT_BAD_INPUT
    said = capsys.readouterr().out
    assert "Both recipes run in fp32 (32-true)" in said and "about 4-5 minutes" in said
    assert "torch.compile is skipped" not in said  # speedup does not compile


@cpu_only
def test_a_stopped_demo_says_to_run_the_demo_again(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_speedup.cli", "demo", "--out", str(out), "--data", str(fashion_mnist_dir)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / "runs" / "baseline-seed0" / "spec.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_TERMINATED, output
    assert "the demo cannot resume: run `lightning-speedup demo` again" in output
    assert "--resume" not in output  # `demo` has no --resume
    assert "run `lightning-speedup demo` again" in (out / "report.md").read_text()
