"""What users do to a bench: SIGTERM, two benches on one folder, bad input, corrupt files, resume."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_speedup import __version__
from lightning_speedup.bench.runner import OutLock, _check_accelerator
from lightning_speedup.cli import EXIT_BAD_INPUT, EXIT_OK, EXIT_TERMINATED, main

REPO = Path(__file__).resolve().parents[2]
TINY = ["--train-subset", "600", "--val-subset", "128", "--max-epochs", "1", "--model-arg", "width=4"]


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "--task", "fashion-mnist", "--data", str(data), "--out", str(out), "--recipe", "baseline",
            "--target", "0.05", *TINY, *extra]  # fmt: skip


@pytest.mark.parametrize("to_group", [False, True], ids=["main-process", "process-group"])
def test_sigterm_saves_what_finished_and_resume_completes(
    fashion_mnist_dir: Path, tmp_path: Path, to_group: bool
) -> None:
    out = tmp_path / "t"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_speedup.cli", *_args(fashion_mnist_dir, out, "--seeds", "2")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    first = out / "runs" / "baseline-seed0.json"
    deadline = time.monotonic() + 300
    while not (out / "runs" / "baseline-seed1" / "spec.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    time.sleep(2)  # the second run's process is starting up
    if to_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_TERMINATED, output
    assert "SIGTERM" in output and "--resume" in output
    report = json.loads((out / "report.json").read_text())
    assert [r["seed"] for r in report["runs"]] == [0] and report["stopped"] == "SIGTERM"
    assert first.exists() and not (out / "runs" / "baseline-seed1.json").exists()  # no fake failure saved
    assert main(_args(fashion_mnist_dir, out, "--seeds", "2", "--resume")) == EXIT_OK
    runs = json.loads((out / "report.json").read_text())["runs"]
    assert [(r["seed"], r["error"]) for r in runs] == [(0, None), (1, None)]


def test_resume_retries_a_failed_run(fashion_mnist_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "f"
    assert main(_args(fashion_mnist_dir, out)) == EXIT_OK
    saved = out / "runs" / "baseline-seed0.json"
    run = json.loads(saved.read_text())
    saved.write_text(json.dumps({**run, "error": "RuntimeError: cause since fixed", "reached": False}))
    capsys.readouterr()
    assert main(_args(fashion_mnist_dir, out, "--resume")) == EXIT_OK
    printed = capsys.readouterr().out
    assert "failed earlier (RuntimeError: cause since fixed); running it again" in printed
    best = re.search(r"best val_acc (\S+),", printed)
    assert best and len(best.group(1)) <= 6  # rounded for people (was 0.8080000281333923)
    assert json.loads(saved.read_text())["error"] is None


def test_a_second_bench_on_a_locked_folder_fails_at_once(
    fashion_mnist_dir: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "l"
    with OutLock(out):
        t0 = time.monotonic()
        assert main(_args(fashion_mnist_dir, out)) == EXIT_BAD_INPUT
        assert time.monotonic() - t0 < 60
    assert f"in use by another bench (pid {os.getpid()})" in capsys.readouterr().err
    assert not (out / "runs").exists()


def test_demo_never_deletes_a_report_it_did_not_write(
    fashion_mnist_dir: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    earlier = tmp_path / "earlier"
    (earlier / "runs").mkdir(parents=True)
    (earlier / "report.md").write_text("earlier results")
    (earlier / "report.json").write_text(json.dumps({"command": "bench"}))
    (earlier / "runs" / "baseline-seed0.json").write_text("{}")
    for seeds in ("0", "1"):
        rc = main(["demo", "--out", str(earlier), "--seeds", seeds, "--data", str(fashion_mnist_dir)])
        assert rc == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--seeds must be >= 1" in err and "the demo did not write" in err
    assert (earlier / "report.md").read_text() == "earlier results"
    assert (earlier / "runs" / "baseline-seed0.json").exists()


def test_corrupt_file_is_named(fashion_mnist_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "c"
    out.mkdir()
    (out / "bench.json").write_text('{"task": "fashion-mnist", ')
    assert main(_args(fashion_mnist_dir, out, "--resume")) == EXIT_BAD_INPUT
    assert f"{out / 'bench.json'} is not valid JSON" in capsys.readouterr().err


def _truncated_fashion(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        raw = f.read_bytes()
        if f.name.startswith("train-images"):
            raw = gzip.compress(gzip.decompress(raw)[:5000])
        (dst / f.name).write_bytes(raw)
    return dst


def test_bad_input_is_rejected_before_the_first_run(
    fashion_mnist_dir: Path, shakespeare_path: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o"
    truncated = _truncated_fashion(fashion_mnist_dir, tmp_path / "trunc")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        (["--max-epochs", "0"], "--max-epochs must be >= 1"),
        (["--time-budget", "-5"], "--time-budget must be a finite number >= 0"),
        (["--train-subset", "0"], "--train-subset must be >= 1"),
        (["--model-arg", "width=-4"], "width=-4: sizes and counts must be >= 1"),
        (["--accelerator", "bogus"], "--accelerator must be one of"),
        (["--price-per-gpu-hour", "-1"], "--price-per-gpu-hour must be a finite number >= 0"),
        (["--data", str(tmp_path / "nonexistent")], "nonexistent does not exist"),
        (["--data", str(truncated)], "cannot be read"),
    ]
    for extra, message in cases:
        assert main([*_args(fashion_mnist_dir, out), *extra]) == EXIT_BAD_INPUT, extra
        assert message in capsys.readouterr().err, extra
    rc = main(["bench", "--task", "char-lm", "--recipe", "baseline", "--data", str(empty), "--out", str(out)])
    assert rc == EXIT_BAD_INPUT
    assert "holds 0 characters" in capsys.readouterr().err
    assert not out.exists()  # nothing written, no run started


def test_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_speedup.cli", "--version"], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)}, check=True,
    )  # fmt: skip
    assert proc.stdout.strip() == f"lightning-speedup {__version__}"


def test_demo_replaces_only_its_own_report(tmp_path: Path) -> None:
    from lightning_speedup.bench.report import remove_demo_report

    own = tmp_path / "demo-out"
    (own / "runs").mkdir(parents=True)
    (own / "report.json").write_text(json.dumps({"command": "demo"}))
    (own / "notes.txt").write_text("mine")
    remove_demo_report(own)
    assert not (own / "runs").exists() and not (own / "report.json").exists()
    assert (own / "notes.txt").read_text() == "mine"  # only the report's own files go
    (own / "report.json").write_text("{not json")
    with pytest.raises(FileExistsError, match="the demo did not write"):
        remove_demo_report(own)
    assert (own / "report.json").exists()


def test_accelerator_takes_lightnings_names_and_its_gpu_alias() -> None:
    """``--accelerator gpu`` is Lightning's alias (benchmarks/step_overhead.py passes it on CUDA); the registry
    of accelerators lists only ``cuda``, ``mps``, ... and refusing ``gpu`` failed that script on the GPU."""
    for name in ("auto", "gpu", "cpu", "cuda"):
        _check_accelerator(name)
    with pytest.raises(ValueError, match=r"--accelerator must be one of \[.*'gpu'.*\], got 'bogus'"):
        _check_accelerator("bogus")
