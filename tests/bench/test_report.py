"""The report's numbers: what enters the medians, the epoch budgets, device-hours."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lightning_speedup.bench.report import summarize
from lightning_speedup.bench.runner import RunResult
from lightning_speedup.cli import EXIT_BAD_INPUT, EXIT_INCOMPLETE, main


def _run(recipe: str = "r", **kw: Any) -> RunResult:
    fields: dict[str, Any] = dict(
        task="fashion-mnist", recipe=recipe, seed=0, reached=True, time_to_target_s=36.0, epochs_to_target=1,
        steps_to_target=10, best_metric=0.9, final_metric=0.9, warmup_s=2.0, first_step_s=2.1, samples_per_s=100.0,
        peak_mem_mb=None, total_s=40.0, epochs=1, history=[], compile_s=1.0, sanity_s=0.5, process_s=50.0,
    )  # fmt: skip
    fields.update(kw)
    return RunResult(**fields)


def test_failed_runs_stay_out_of_the_warm_up_and_process_medians() -> None:
    failed = dict(reached=False, time_to_target_s=None, best_metric=None, warmup_s=0.0, compile_s=0.0,
                  sanity_s=0.0, process_s=7.0, samples_per_s=None, error="RuntimeError: boom")  # fmt: skip
    (row,) = summarize([_run(), _run(seed=1, **failed), _run(seed=2, **failed)], ["r"])
    assert row["cold"]["failed"] == 2 and not row["all_reached"]
    assert (row["warmup_s"], row["compile_s"], row["sanity_s"], row["process_s"]) == (2.0, 1.0, 0.5, 50.0)
    assert row["best_metric"] == 0.9 and row["samples_per_s"] == 100.0


def test_device_hours_count_every_device_of_a_run() -> None:
    one, four = summarize([_run("one"), _run("four", devices=4)], ["one", "four"], price=2.0)
    assert one["devices"] == 1 and one["gpu_hours_to_target"] == pytest.approx(
        0.01
    )  # older files: one device
    assert four["devices"] == 4 and four["gpu_hours_to_target"] == pytest.approx(0.04)
    assert four["cost_to_target"] == pytest.approx(0.08)


def test_report_gives_each_recipe_its_own_epoch_budget(
    fashion_mnist_dir: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "e"
    rc = main(["bench", "--task", "fashion-mnist", "--data", str(fashion_mnist_dir), "--out", str(out),
               "--recipe", "baseline", "--recipe", "speedup", "--time-budget", "0"])  # fmt: skip
    assert rc == EXIT_INCOMPLETE  # nothing runs: the report's header and columns are what is tested
    budgets = "each recipe's own epoch budget (baseline 30, speedup 10)"
    assert f"at most {budgets}" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert f"within {budgets}" in md and "within 30 epochs" not in md
    header = next(line for line in md.splitlines() if line.startswith("| recipe |")).split("|")
    column = header.index(" epoch budget ")
    cells = {line.split("|")[1].strip(): line.split("|")[column].strip() for line in md.splitlines()[1:]
             if line.startswith("| baseline |") or line.startswith("| speedup |")}  # fmt: skip
    assert cells == {"baseline": "30", "speedup": "10"}
    assert json.loads((out / "report.json").read_text())["epoch_budgets"] == {"baseline": 30, "speedup": 10}
    # --max-epochs sets every recipe's budget: one number again.
    assert main(["bench", "--task", "fashion-mnist", "--data", str(fashion_mnist_dir), "--out", str(out),
                 "--overwrite", "--recipe", "baseline", "--recipe", "speedup", "--time-budget", "0",
                 "--max-epochs", "3"]) == EXIT_INCOMPLETE  # fmt: skip
    assert "within 3 epochs" in (out / "report.md").read_text()


def test_input_that_would_fail_every_run_is_refused_up_front(
    fashion_mnist_dir: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    import torch

    out = tmp_path / "o"
    args = ["bench", "--task", "fashion-mnist", "--data", str(fashion_mnist_dir), "--out", str(out)]
    # speedup trains in batches of 512 and drops the last partial one: 300 samples would leave no batch.
    assert (
        main([*args, "--recipe", "baseline", "--recipe", "speedup", "--train-subset", "300"])
        == EXIT_BAD_INPUT
    )
    err = capsys.readouterr().err
    assert "--train-subset 300 is smaller than one batch of recipe 'speedup' (512 samples)" in err
    if not torch.cuda.is_available():
        for name in ("cuda", "gpu"):
            assert main([*args, "--recipe", "baseline", "--accelerator", name]) == EXIT_BAD_INPUT
            err = capsys.readouterr().err
            assert f"--accelerator {name}: this machine has no" in err and "--accelerator cpu" in err
    assert not out.exists()  # no run started, nothing written
