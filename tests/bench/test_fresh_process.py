"""The bench runs every run in a fresh process with compile caches of its own; cold and warm side by side."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lightning_speedup.bench.runner import RunResult, describe_process
from lightning_speedup.cli import EXIT_OK, main

TINY = ["--train-subset", "600", "--val-subset", "128", "--max-epochs", "1", "--model-arg", "width=4"]


def _bench(data: Path, out: Path, *extra: str) -> int:
    return main(
        ["bench", "--task", "fashion-mnist", "--data", str(data), "--out", str(out), "--recipe", "baseline",
         "--target", "0.05", *TINY, *extra]
    )  # fmt: skip


def _runs(out: Path) -> list[dict]:
    return json.loads((out / "report.json").read_text())["runs"]


def test_cache_both_gives_each_seed_its_own_cache_and_the_warm_run_reuses_it(
    fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "both"
    assert (
        _bench(fashion_mnist_dir, out, "--cache", "both", "--seeds", "2", "--price-per-gpu-hour", "2")
        == EXIT_OK
    )
    runs = _runs(out)
    # Interleaved by seed, a cold run before the warm run that reuses its caches.
    assert [(r["seed"], r["cache"]) for r in runs] == [(0, "cold"), (0, "warm"), (1, "cold"), (1, "warm")]
    pids = {r["pid"] for r in runs}
    assert len(pids) == 4 and os.getpid() not in pids  # every run in a process of its own
    seen = [r["cache_env"] for r in runs]  # what each process saw in os.environ
    for env in seen:
        for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_CACHE_PATH"):
            assert Path(env[var]).is_relative_to(out / "caches")
    assert seen[0] == seen[1] and seen[2] == seen[3]  # warm reuses its seed's cold cache
    assert seen[0]["TORCHINDUCTOR_CACHE_DIR"] != seen[2]["TORCHINDUCTOR_CACHE_DIR"]  # seeds do not share
    assert not (out / "caches").exists()  # cleaned up without --keep-caches
    assert (out / "runs" / "baseline-seed0.json").exists() and (
        out / "runs" / "baseline-seed0-warm.json"
    ).exists()
    row = json.loads((out / "report.json").read_text())["summary"][0]
    assert row["cold"]["runs"] == 2 and row["warm"]["runs"] == 2 and row["headline"] == "cold"
    assert row["ttt_median_s"] == row["cold"]["ttt_median_s"]
    assert row["warm"]["ttt_median_s"] is not None
    assert row["compile_s"] == 0.0 and row["sanity_s"] is not None and row["cudagraph_s"] is None
    # Each process's whole life, measured from outside it: longer than its fit, which time to target is part of.
    assert all(r["process_s"] > r["total_s"] > 0 for r in runs)
    # Its part before fit (interpreter, imports, data and model set-up) leaves the fit and teardown after it.
    assert all(0 < r["startup_s"] < r["process_s"] - r["total_s"] for r in runs)
    # Where the time before the clock went, phase by phase: together it is more than the startup (to fit's call)
    # by the fit's own set-up before the clock, and it fits in the process beside the fit.
    for r in runs:
        phases = r["startup_phases"]
        assert list(phases) == [
            "imports_s",
            "power_sampler_s",
            "data_and_model_s",
            "trainer_s",
            "fit_until_clock_s",
        ]
        assert all(v >= 0 for v in phases.values()) and phases["imports_s"] > 0
        before_fit = sum(v for k, v in phases.items() if k != "fit_until_clock_s")
        # the same timestamps, less the worker's own few steps between them
        assert 0 <= r["startup_s"] - before_fit < 1.0
        assert r["startup_s"] < sum(phases.values()) < r["process_s"] - r["total_s"]
        line = describe_process(
            RunResult(**{k: v for k, v in r.items() if k in RunResult.__dataclass_fields__})
        )
        assert line.startswith(f"process {r['process_s']:.1f} s, before the clock ") and "imports " in line
    cold = [r["process_s"] for r in runs if r["cache"] == "cold"]
    assert row["process_s"] == pytest.approx(sum(cold) / 2)  # the median of the headline (cold) runs
    md = (out / "report.md").read_text()
    assert (
        "cold: time to target" in md and "warm: time to target" in md and "| compile | sanity check |" in md
    )
    cells = next(line for line in md.splitlines() if line.startswith("| baseline |")).split("|")
    assert cells[2].strip().endswith(")") and cells[4].strip().endswith(")")  # both columns filled
    header = next(line for line in md.splitlines() if line.startswith("| recipe |")).split("|")
    assert cells[header.index(" process ")].strip() == (
        f"{row['process_s']:.1f} s ({row['startup_s']:.1f} s before fit)"
    )
    # Cost: the headline (cold) median time in device-hours at the given price; no power sensor on a CPU.
    assert row["gpu_hours_to_target"] == pytest.approx(row["cold"]["ttt_median_s"] / 3600)
    assert row["cost_to_target"] == pytest.approx(2 * row["gpu_hours_to_target"])
    assert row["energy_to_target_wh"] is None and all(r["avg_power_w"] is None for r in runs)
    assert "| GPU-hours | cost | energy |" in md and "Price: 2.0 $ per GPU-hour" in md
    # The report describes what ran (a reduced budget), not the full task; numbers rounded for people.
    report = json.loads((out / "report.json").read_text())
    assert report["task_description"] not in md and "Reduced budget" in md and "'width': 4" in md
    assert "0.0000000" not in md
    data = report["data"]
    assert data["path"] == str(fashion_mnist_dir.resolve()) and len(data["sha256"]) == 64


def test_cache_warm_fills_once_then_measures_runs_that_reuse_it(
    fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "warm"
    assert _bench(fashion_mnist_dir, out, "--cache", "warm", "--seeds", "2", "--keep-caches") == EXIT_OK
    runs = _runs(out)
    assert [(r["seed"], r["cache"]) for r in runs] == [(0, "warm"), (1, "warm")]  # the fill is no run
    assert runs[0]["cache_env"] == runs[1]["cache_env"]
    cache = Path(runs[0]["cache_env"]["TORCHINDUCTOR_CACHE_DIR"]).parent
    assert cache == out / "caches" / "baseline-warm" and cache.is_dir()  # kept with --keep-caches
    fill = json.loads((out / "runs" / "baseline-fill" / "result.json").read_text())
    assert fill["cache_env"] == runs[0]["cache_env"] and fill["pid"] not in {r["pid"] for r in runs}
    report = json.loads((out / "report.json").read_text())
    assert report["warm_fills"]["baseline"]["total_s"] > 0
    assert report["summary"][0]["headline"] == "warm" and report["summary"][0]["cold"]["runs"] == 0
    assert "Throw-away runs that filled the warm caches" in (out / "report.md").read_text()


@pytest.mark.gpu
def test_cold_run_compiles_and_the_warm_run_reuses_its_caches_on_gpu(
    fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """On a GPU `speedup-compiled` compiles: the cold run pays Inductor's compile, the warm run hits its caches."""
    out = tmp_path / "gpu"
    rc = main(
        ["bench", "--task", "fashion-mnist", "--data", str(fashion_mnist_dir), "--out", str(out), "--recipe",
         "speedup-compiled", "--target", "0.05", *TINY, "--cache", "both", "--keep-caches"]
    )  # fmt: skip
    assert rc == EXIT_OK
    cold, warm = _runs(out)
    assert cold["compile_s"] > 0 and warm["compile_s"] < cold["compile_s"]
    assert any(Path(cold["cache_env"]["TORCHINDUCTOR_CACHE_DIR"]).iterdir())  # the cold run filled it
    assert warm["avg_power_w"] is None or warm["avg_power_w"] > 0


@pytest.mark.gpu
def test_eager_cuda_graph_capture_is_its_own_warm_up_column_on_gpu(
    fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "graphs"
    rc = main(
        ["bench", "--task", "fashion-mnist", "--data", str(fashion_mnist_dir), "--out", str(out), "--recipe",
         "speedup", "--target", "0.05", *TINY]
    )  # fmt: skip
    assert rc == EXIT_OK
    (run,) = _runs(out)
    assert run["cudagraph_s"] is not None and run["cudagraph_s"] > 0 and run["compile_s"] == 0.0
