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
    "second-corpus-paired",
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


def test_ablation_from_continues_an_earlier_folder(tmp_path: Path) -> None:
    """ABLATION_FROM copies an earlier call's ladder into $WORK, and the bench resumes it there."""
    bin_dir, work, earlier = tmp_path / "bin", tmp_path / "work", tmp_path / "earlier"
    bin_dir.mkdir()
    (earlier / "runs").mkdir(parents=True)
    (earlier / "runs" / "baseline-seed0.json").write_text("{}")
    stub = bin_dir / "lightning-speedup"  # records its arguments and what its --out folder held
    stub.write_text('#!/bin/sh\necho "$@" > "$WORK/args"\nls "$WORK/ablation-charlm/runs" > "$WORK/held"\n')
    stub.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "WORK": str(work),
        "ABLATION_FROM": str(earlier),
    }
    done = subprocess.run(  # in an empty folder: no wheels or project for device_env.sh to install
        ["bash", str(RUNNER), "ablation-charlm", "120"], capture_output=True, text=True, timeout=30, env=env,
        cwd=bin_dir,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr  # without $OUT too (nothing to pack into)
    args = (work / "args").read_text()
    assert "--task char-lm --ablation --cache cold --seeds 1 --resume" in args
    assert args.rstrip().endswith(f"--out {work}/ablation-charlm")
    assert (work / "held").read_text().split() == ["baseline-seed0.json"]
