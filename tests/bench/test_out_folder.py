"""What a bench does with its --out folder: --overwrite, --resume's checks and hints, Ctrl-C, the commits."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_speedup.cli import EXIT_BAD_INPUT, EXIT_INCOMPLETE, EXIT_INTERRUPTED, EXIT_OK, main

REPO = Path(__file__).resolve().parents[2]
# The fastest bench on a CPU: a one-layer char-LM, one batch per epoch, one epoch.
TINY_LM = ["--task", "char-lm", "--recipe", "baseline", "--train-subset", "128", "--val-subset", "4",
           "--max-epochs", "1", "--model-arg", "n_layer=1", "--model-arg", "n_head=1", "--model-arg", "n_embd=16",
           "--model-arg", "block_size=32"]  # fmt: skip


def _args(data: Path, out: Path, *extra: str, target: str = "9.9") -> list[str]:
    return ["bench", *TINY_LM, "--data", str(data), "--out", str(out), "--target", target, *extra]


@pytest.fixture(scope="module")
def finished(shakespeare_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-run bench (target 9.9, reached at once); tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished") / "bench"
    assert main(_args(shakespeare_path, out, "--seeds", "2")) == EXIT_OK
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bench"
    shutil.copytree(finished, out)
    return out


def test_overwrite_removes_the_earlier_bench_and_resume_refuses_runs_of_other_settings(
    finished: Path, shakespeare_path: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    out = _copy(finished, tmp_path)
    (out / "notes.txt").write_text("mine")
    # A run made under another target is never reported as this bench's, even where bench.json (whose check
    # came first) is gone or was rewritten: each run file records its settings.
    (out / "bench.json").unlink()
    capsys.readouterr()
    assert main(_args(shakespeare_path, out, "--seeds", "2", "--resume", target="1.0")) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "baseline-seed0.json was run with other settings" in err and "target: 9.9 there, 1.0 now" in err
    assert "--overwrite" in err
    # --overwrite removes the earlier bench's own files (and says so) before anything runs; a budget of 0 runs
    # nothing, so whatever is left under runs/ would be the earlier bench's.
    rc = main(_args(shakespeare_path, out, "--seeds", "2", "--overwrite", "--time-budget", "0", target="1.0"))
    assert rc == EXIT_INCOMPLETE
    printed = capsys.readouterr().out
    assert (
        f"--overwrite: removed the earlier bench's runs, report.json, report.md, report.png from {out}"
        in printed
    )
    assert not (out / "runs").exists()
    assert (out / "notes.txt").read_text() == "mine"  # never a file the bench did not write
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == 1.0 and report["runs"] == []
    assert json.loads((out / "bench.json").read_text())["target"] == 1.0
    # --resume and --overwrite contradict each other.
    assert main(_args(shakespeare_path, out, "--resume", "--overwrite")) == EXIT_BAD_INPUT
    assert "pass one of them" in capsys.readouterr().err


def test_resume_refuses_other_data_stop_or_accelerator_and_accepts_old_files(
    finished: Path, shakespeare_path: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    out = _copy(finished, tmp_path)
    saved = json.loads((out / "bench.json").read_text())
    assert (
        saved["stop_at_target"] is True and saved["accelerator"] == "auto" and len(saved["data_sha256"]) == 64
    )
    other_text = tmp_path / "other.txt"
    other_text.write_text(shakespeare_path.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    for extra, named in (
        (["--data", str(other_text)], "data file (sha256)"),
        (["--no-stop"], "stop at target (--no-stop): True there, False now"),
        (["--accelerator", "cpu"], "--accelerator: 'auto' there, 'cpu' now"),
    ):
        # (a second --data replaces the first)
        assert main([*_args(shakespeare_path, out, "--seeds", "2", "--resume"), *extra]) == EXIT_BAD_INPUT, (
            extra
        )
        err = capsys.readouterr().err
        assert "holds a bench with different settings" in err and named in err, err
    # A bench.json and run files from before these settings were recorded: unknown, accepted.
    later = ("data_sha256", "stop_at_target", "accelerator", "precision")
    (out / "bench.json").write_text(json.dumps({k: v for k, v in saved.items() if k not in later}))
    for path in (out / "runs").glob("*.json"):
        run = json.loads(path.read_text())
        run["settings"] = {k: v for k, v in run["settings"].items() if k not in later}
        path.write_text(json.dumps(run))
    assert (
        main([*_args(shakespeare_path, out, "--seeds", "2", "--resume"), "--accelerator", "cpu"]) == EXIT_OK
    )
    assert capsys.readouterr().out.count("done earlier") == 2
    report = json.loads((out / "report.json").read_text())
    assert report["accelerator"] == "cpu" and report["stop_at_target"] is True and report["data_sha256"]


def test_resume_needs_out_and_the_hints_name_the_folder(
    shakespeare_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    args = ["bench", *TINY_LM, "--data", str(shakespeare_path), "--target", "9.9"]
    assert main([*args, "--resume"]) == EXIT_BAD_INPUT
    assert "--resume needs --out" in capsys.readouterr().err
    assert not (tmp_path / "bench-out").exists()  # no fresh folder started
    out = tmp_path / "my bench"
    assert main([*args, "--out", str(out), "--time-budget", "0"]) == EXIT_INCOMPLETE
    printed = capsys.readouterr().out
    assert f"incomplete: the time budget ran out; rerun with --resume --out '{out}'" in printed
    assert f"rerun with --resume --out '{out}'" in (out / "report.md").read_text()


def test_ctrl_c_stops_the_worker_writes_the_partial_report_and_exits_130(
    shakespeare_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "i"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_speedup.cli", *_args(shakespeare_path, out, "--seeds", "2")],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not (out / "runs" / "baseline-seed1" / "spec.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    time.sleep(2)  # the second run's process is starting up
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C at a terminal does: the whole foreground group
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_INTERRUPTED, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "SIGINT: the running run was stopped and is not recorded" in output
    assert (
        f"stopped by SIGINT: the finished runs are saved in {out}; rerun with --resume --out {out}" in output
    )
    report = json.loads((out / "report.json").read_text())
    assert report["stopped"] == "SIGINT" and [r["seed"] for r in report["runs"]] == [0]
    assert "**Incomplete**: stopped by SIGINT" in (out / "report.md").read_text()
    assert not (out / "runs" / "baseline-seed1.json").exists() and not (out / "caches").exists()


def test_ablation_keeps_recipes_also_named_with_recipe_once(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    from lightning_speedup.bench.ablation import ablation_recipes

    out = tmp_path / "a"
    rc = main(["bench", "--task", "fashion-mnist", "--data", str(fashion_mnist_dir), "--out", str(out),
               "--recipe", "speedup", "--recipe", "baseline", "--ablation", "--time-budget", "0"])  # fmt: skip
    assert rc == EXIT_INCOMPLETE  # accepted; the spent budget runs nothing
    recipes = list(json.loads((out / "report.json").read_text())["recipes"])
    ladder = ablation_recipes("fashion-mnist")
    assert recipes == ["speedup", "baseline"] + [n for n in ladder if n not in ("speedup", "baseline")]


def test_report_lists_every_commit_of_a_resumed_bench(
    finished: Path, shakespeare_path: Path, tmp_path: Path
) -> None:
    out = _copy(finished, tmp_path)
    second = out / "runs" / "baseline-seed1.json"
    run = json.loads(second.read_text())
    first_commit = run["environment"]["git_commit"]
    run["environment"]["git_commit"] = "abc1234"  # continued by a later checkout
    second.write_text(json.dumps(run))
    assert main(_args(shakespeare_path, out, "--seeds", "2", "--resume")) == EXIT_OK
    md = (out / "report.md").read_text()
    assert f"commits {first_commit} (1 run), abc1234 (1 run)" in md and "several commits" in md
    assert json.loads((out / "report.json").read_text())["commits"] == {str(first_commit): 1, "abc1234": 1}
