"""benchmarks/run_on_gpu.sh: lists its job sets and refuses an unknown one before touching the machine."""

from __future__ import annotations

import subprocess
from pathlib import Path

RUNNER = Path(__file__).resolve().parents[2] / "benchmarks" / "run_on_gpu.sh"
SETS = {
    "headline",
    "schedules",
    "gpu-data",
    "quantization",
    "distributed",
    "tests",
    "pipeline",
    "cold-fashion",
    "compile-warm",
    "cold-charlm",
    "loop-fashion",
    "attention-charlm",
    "compile-cold-start",
    "compile-charlm",
    "warm",
    "warm-charlm",
    "quant-charlm",
    "process-startup",
    "second-corpus",
    "ablation-fashion",
    "ablation-charlm",
    "compile-candidates",
    "tune",
}


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(RUNNER), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "WORK": str(tmp_path)},
    )


def test_list_names_every_job_set(tmp_path: Path) -> None:
    out = _run("list", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split(":", 1)[1].split()) == SETS


def test_an_unknown_set_is_refused_with_the_choices(tmp_path: Path) -> None:
    out = _run("round7", tmp_path=tmp_path)
    assert out.returncode == 2
    assert "unknown job set 'round7'; choose one of:" in out.stderr
    assert "gpu-data" in out.stderr
    assert not list(tmp_path.glob("*.log"))  # nothing ran
