"""`lightning-speedup`: exit codes, report files, --out protection, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_speedup.cli import EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_NOT_REACHED, EXIT_OK, main

TINY = ["--train-subset", "600", "--val-subset", "128", "--max-epochs", "1", "--model-arg", "width=4"]


def _bench(data: Path, out: Path, *extra: str) -> int:
    return main(["bench", "--task", "fashion-mnist", "--data", str(data), "--out", str(out), *TINY, *extra])


def test_help_lists_subcommands() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_speedup.cli", "--help"], capture_output=True, text=True, check=True
    )
    for word in ("bench", "demo", "list"):
        assert word in proc.stdout


def test_reached_writes_reports_and_exits_0(fashion_mnist_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    rc = _bench(fashion_mnist_dir, out, "--recipe", "baseline", "--recipe", "speedup", "--target", "0.05")
    assert rc == EXIT_OK
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["torch"] and report["seeds"] == [0] and report["target"] == 0.05
    base, fast = report["summary"]
    assert (base["recipe"], fast["recipe"]) == ("baseline", "speedup")
    assert base["speedup"] == pytest.approx(1.0)
    assert fast["speedup"] == pytest.approx(base["ttt_median_s"] / fast["ttt_median_s"])
    assert all(run["reached"] for run in report["runs"])
    assert report["recipes"]["speedup"]["precision"] == "bf16-mixed"
    md = (out / "report.md").read_text()
    assert "| baseline |" in md and "| speedup |" in md and "time to target" in md
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "[1/2] baseline seed=0" in printed and "epoch 1/1" in printed  # progress lines


def test_not_reached_exits_3(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    rc = _bench(fashion_mnist_dir, tmp_path / "o", "--recipe", "baseline", "--target", "0.999")
    assert rc == EXIT_NOT_REACHED
    md = (tmp_path / "o" / "report.md").read_text()
    assert "not reached (0/1 runs reached)" in md


def test_bad_input_exits_2_and_never_overwrites(fashion_mnist_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert _bench(fashion_mnist_dir, tmp_path / "a", "--recipe", "nope") == EXIT_BAD_INPUT
    assert "Unknown recipe 'nope'" in capsys.readouterr().err
    assert main(["bench", "--task", "mnist", "--recipe", "baseline"]) == EXIT_BAD_INPUT
    assert (
        _bench(fashion_mnist_dir, tmp_path / "a", "--recipe", "baseline", "--recipe", "baseline")
        == EXIT_BAD_INPUT
    )
    assert (
        _bench(fashion_mnist_dir, tmp_path / "a", "--recipe", "baseline", "--target", "2") == EXIT_BAD_INPUT
    )
    assert (
        _bench(fashion_mnist_dir, tmp_path / "a", "--recipe", "baseline", "--first-seed", "-1")
        == EXIT_BAD_INPUT
    )
    assert "--first-seed must be >= 0" in capsys.readouterr().err
    # Accepted before: a string for a size (the run then failed, recorded as not reached), NaN and infinity.
    for bad, message in (
        (("--model-arg", "width=abc"), "ImageClassifier's width takes int values like its default, 64"),
        (("--model-arg", "width=2.5"), "width takes int values"),
        (("--price-per-gpu-hour", "nan"), "--price-per-gpu-hour must be a finite number >= 0"),
        (("--time-budget", "inf"), "--time-budget must be a finite number >= 0"),
    ):
        assert _bench(fashion_mnist_dir, tmp_path / "a", "--recipe", "baseline", *bad) == EXIT_BAD_INPUT
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # nothing written for bad input
    a_file = tmp_path / "a-file"
    a_file.write_text("kept")
    assert _bench(fashion_mnist_dir, a_file, "--recipe", "baseline") == EXIT_BAD_INPUT
    assert "is a file; --out names the folder" in capsys.readouterr().err
    assert a_file.read_text() == "kept"
    out = tmp_path / "kept"
    out.mkdir()
    (out / "report.md").write_text("earlier results")
    assert _bench(fashion_mnist_dir, out, "--recipe", "baseline") == EXIT_BAD_INPUT
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "report.md").read_text() == "earlier results"


def test_time_budget_then_resume_runs_only_what_is_left(
    fashion_mnist_dir: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r"
    args = ("--recipe", "baseline", "--target", "0.05")
    # A spent budget starts nothing and says how to go on.
    assert _bench(fashion_mnist_dir, out, *args, "--seeds", "2", "--time-budget", "0") == EXIT_INCOMPLETE
    assert "rerun with --resume" in capsys.readouterr().out
    assert _bench(fashion_mnist_dir, out, *args, "--seeds", "1", "--resume") == EXIT_OK
    first = out / "runs" / "baseline-seed0.json"
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    assert _bench(fashion_mnist_dir, out, *args, "--seeds", "2", "--resume") == EXIT_OK
    assert "done earlier" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == stamp  # the finished run was not redone
    assert len(json.loads((out / "report.json").read_text())["runs"]) == 2
    # The report names the machine the runs ran on, not the one that resumed; a mix is flagged.
    stored = json.loads(first.read_text())
    assert stored["environment"]["cpu_count"] == os.cpu_count()
    first.write_text(json.dumps({**stored, "environment": {**stored["environment"], "gpu": "Elsewhere GPU"}}))
    assert _bench(fashion_mnist_dir, out, *args, "--seeds", "2", "--resume") == EXIT_OK
    report = (out / "report.md").read_text()
    assert "Hardware: Elsewhere GPU" in report and "several machines" in report
    # Resuming with other settings is refused.
    assert _bench(fashion_mnist_dir, out, *args, "--resume", "--max-epochs", "2") == EXIT_BAD_INPUT
    # A budget shorter than the recipe's longest run so far starts no run of it that would overrun the budget.
    # A run's length is its whole process (imports, set-up, fit, teardown), not its fit alone: a budget longer
    # than both fits but shorter than their processes starts nothing.
    capsys.readouterr()
    done = [json.loads((out / "runs" / f"baseline-seed{s}.json").read_text()) for s in (0, 1)]
    budget = 1.5 * max(r["total_s"] for r in done)
    assert budget < max(r["process_s"] for r in done)
    assert _bench(
        fashion_mnist_dir, out, *args, "--seeds", "3", "--resume", "--time-budget", str(budget)
    ) == (EXIT_INCOMPLETE)
    assert "too short for baseline" in capsys.readouterr().out
    assert not (out / "runs" / "baseline-seed2.json").exists()


def test_missing_data_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("LIGHTNING_SPEEDUP_DATA", raising=False)
    rc = main(["bench", "--task", "char-lm", "--recipe", "baseline", "--data", str(tmp_path / "none.txt"),
               "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == EXIT_BAD_INPUT
    assert "none.txt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    monkeypatch.chdir(tmp_path)  # no --data and nothing to find: the search's own message
    rc = main(["bench", "--task", "char-lm", "--recipe", "baseline", "--out", str(tmp_path / "o")])
    assert rc == EXIT_BAD_INPUT
    assert "char-lm needs a UTF-8 text file" in capsys.readouterr().err


def test_list(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["list"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "fashion-mnist" in out and "char-lm" in out and "baseline" in out and "speedup" in out


def test_console_script_installed() -> None:
    exe = Path(sys.executable).parent / "lightning-speedup"
    assert exe.exists(), "pip install -e . installs the lightning-speedup command"
    proc = subprocess.run([str(exe), "list"], capture_output=True, text=True, env={**os.environ}, check=False)
    assert proc.returncode == 0 and "recipes:" in proc.stdout


def test_gpu_data_recipe_trains_end_to_end_on_cpu(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    """On a CPU the prefetcher passes batches through and GPUAugment runs on the CPU tensors."""
    rc = _bench(
        fashion_mnist_dir,
        tmp_path / "g",
        "--recipe",
        "speedup-gpu-data",
        "--target",
        "0.05",
        "--first-seed",
        "2",
    )
    assert rc == EXIT_OK
    report = json.loads((tmp_path / "g" / "report.json").read_text())
    run = report["runs"][0]
    assert run["reached"] and run["error"] is None
    assert report["seeds"] == [2] and run["seed"] == 2  # --first-seed: seeds 2 .. 2+SEEDS-1


def test_model_args_read_switches_numbers_and_strings() -> None:
    from lightning_speedup.cli import parse_model_args

    assert parse_model_args(["width=16", "dropout=0.1", "log_train_loss=false", "flag=True", "name=x"]) == {
        "width": 16, "dropout": 0.1, "log_train_loss": False, "flag": True, "name": "x",
    }  # fmt: skip
    assert isinstance(parse_model_args(["log_train_loss=False"])["log_train_loss"], bool)
    with pytest.raises(ValueError, match="expects KEY=VALUE"):
        parse_model_args(["width"])
