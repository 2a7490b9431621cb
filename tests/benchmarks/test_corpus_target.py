"""benchmarks/corpus_target.py: the second corpus's target from a real calibration bench of `baseline`."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from lightning_speedup.cli import EXIT_NOT_REACHED, main

ROOT = Path(__file__).resolve().parents[2]


def _module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("corpus_target", ROOT / "benchmarks" / "corpus_target.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ct = _module()


def test_the_target_is_the_calibrated_best_loss_plus_the_margin_rounded_up(
    shakespeare_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "calibrate"
    tiny = ["--train-subset", "256", "--val-subset", "8", "--max-epochs", "2", "--model-arg", "n_layer=1",
            "--model-arg", "n_embd=32", "--model-arg", "n_head=2", "--model-arg", "block_size=32"]  # fmt: skip
    argv = ["bench", "--task", "char-lm", "--data", str(shakespeare_path), "--recipe", "baseline", "--seeds", "1",
            "--target", "0", "--out", str(out), *tiny]  # fmt: skip
    assert main(argv) == EXIT_NOT_REACHED  # an unreachable target: the run trains its whole budget
    (run,) = (json.loads(p.read_text()) for p in (out / "runs").glob("baseline-seed*.json"))
    assert run["epochs"] == 2 and run["best_metric"] > 0
    expected = math.ceil((run["best_metric"] + 0.02) * 100) / 100
    assert ct.corpus_target(out) == pytest.approx(expected)
    assert expected - 0.01 < run["best_metric"] + 0.02 <= expected
    capsys.readouterr()
    assert ct.main([str(out), "--margin", "0"]) == 0
    assert float(capsys.readouterr().out) == pytest.approx(math.ceil(run["best_metric"] * 100) / 100)


def test_an_empty_or_foreign_folder_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert ct.main([str(tmp_path)]) == 2
    assert "no finished `baseline` run" in capsys.readouterr().err
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "baseline-seed0.json").write_text(
        json.dumps({"task": "fashion-mnist", "best_metric": 0.9})
    )
    with pytest.raises(ValueError, match="must be char-lm runs"):
        ct.corpus_target(tmp_path)
    with pytest.raises(ValueError, match="--margin must be >= 0"):
        ct.corpus_target(tmp_path, margin=-1)
