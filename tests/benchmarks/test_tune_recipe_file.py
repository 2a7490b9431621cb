"""benchmarks/tune_recipe.py --recipe-out: the recipes file of a sweep's best config, loaded the way the bench
loads one (``$LIGHTNING_SPEEDUP_RECIPES``), and the result files it refuses. No Ray: no sweep runs here."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from lightning_speedup.bench import recipes
from lightning_speedup.bench.recipes import (
    _RECIPES,
    RECIPES_ENV,
    get_recipe,
    load_recipe_files,
    register_recipe,
)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tune_recipe.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tune_recipe_file", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tr = _load_script()
CONFIG = {"batch_size": 256, "peak_lr": 2.5e-3, "epochs": 30, "warmup": 0.08}


def _result(task: str = "char-lm", recipe: str = "speedup", best: bool = True) -> dict[str, Any]:
    """A result file as a sweep writes it, reduced to what the recipes file reads."""
    entry = {"searcher": "bayes", "seed": 1, "trial": 7, "config": CONFIG, "reached": True,
             "time_to_target_s": 61.25, "best_metric": 1.46}  # fmt: skip
    return {
        "benchmark": "tune_recipe", "task": task, "recipe": recipe, "metric": "val_loss", "target": 1.47,
        "environment": {"date": "2026-12-04T18:00:00+0000"},
        "sweeps": [{"searcher": "random", "seed": 1, "date": "2026-12-04T15:00:00+0000"},
                   {"searcher": "bayes", "seed": 1, "date": "2026-12-04T16:00:00+0000"}],
        "best": entry if best else None,
    }  # fmt: skip


@pytest.fixture
def forget_tuned() -> Iterator[None]:
    """The registry is the process's: the recipes a test file registered leave with the test."""
    before = set(_RECIPES)
    yield
    for name in set(_RECIPES) - before:
        del _RECIPES[name]


def _write_result(tmp_path: Path, result: dict[str, Any]) -> Path:
    path = tmp_path / "tune_recipe_charlm.json"
    path.write_text(json.dumps(result))
    return path


def test_recipe_file_registers_the_tuned_recipe_as_the_sweep_built_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forget_tuned: None, capsys: pytest.CaptureFixture[str]
) -> None:
    result_path, out = _write_result(tmp_path, _result()), tmp_path / "tuned.py"
    argv = ["--task", "char-lm", "--from-result", str(result_path), "--recipe-out", str(out)]
    assert tr.main(argv) == 0
    assert f"{RECIPES_ENV}={out} lightning-speedup bench --task char-lm" in capsys.readouterr().out
    source = out.read_text()
    assert (
        "from lightning_speedup.bench.recipes import async_metrics, attention_without_cudnn, get_recipe, "
        "register_recipe, schedule\n" in (source)
    )
    assert f"--from-result {result_path} --recipe-out {out}" in source  # the docstring names the command

    assert "speedup-tuned" not in _RECIPES
    monkeypatch.setenv(RECIPES_ENV, str(out))
    load_recipe_files()
    tuned = get_recipe("speedup-tuned").for_task("char-lm")
    base = get_recipe("speedup").for_task("char-lm")
    expected = base.extended(**tr.recipe_overrides(base, "char-lm", CONFIG))
    assert (tuned.batch_size, tuned.max_epochs) == (256, 30) == (expected.batch_size, expected.max_epochs)
    # The schedule factory's closure, as the sweep's trial built it; the other callbacks by name.
    assert tr.schedule_of(tuned, "char-lm") == tr.schedule_of(expected, "char-lm")
    (index, name, kwargs) = tr.schedule_of(tuned, "char-lm")
    assert (name, kwargs) == ("WarmupStableDecay", {"peak_lr": 2.5e-3, "warmup": 0.08, "decay": 0.3})
    assert inspect.getclosurevars(tuned.callbacks[index]).nonlocals["kwargs"] == kwargs
    assert [f.__name__ for f in tuned.callbacks] == [f.__name__ for f in expected.callbacks]
    assert [f.__name__ for f in tuned.callbacks][1:] == ["AsyncProgressBarMetrics()", "SDPABackends()"]
    assert {**tuned.summary(), "name": "", "description": ""} == {
        **expected.summary(),
        "name": "",
        "description": "",
    }
    # Specialised for char-lm: another task gets the char-LM settings too, and the description says so.
    assert tuned.per_task == {} and get_recipe("speedup-tuned").for_task("fashion-mnist") == tuned
    for said in ("bayes sweep, seed 1, trial 7", str(result_path), "2026-12-04T16:00:00+0000",
                 "time to target 61.25 s while sharing the device", "Specialised for char-lm"):  # fmt: skip
        assert said in tuned.description, said


def test_the_recipe_file_runs_in_a_fresh_process(tmp_path: Path, forget_tuned: None) -> None:
    out = tmp_path / "tuned.py"
    result_path = _write_result(tmp_path, _result())
    assert tr.main(["--task", "char-lm", "--from-result", str(result_path), "--recipe-out", str(out),
                    "--tuned-name", "lm-tuned"]) == 0  # fmt: skip
    code = (
        "from lightning_speedup.bench.recipes import get_recipe; r = get_recipe('lm-tuned'); "
        "print(r.batch_size, r.max_epochs, [f.__name__ for f in r.callbacks])"
    )
    env = {**os.environ, RECIPES_ENV: str(out)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == (
        "256 30 ['WarmupStableDecay(peak_lr=0.0025, warmup=0.08, decay=0.3)', 'AsyncProgressBarMetrics()', "
        "'SDPABackends()']"
    )


@pytest.mark.parametrize(
    ("result", "args", "message"),
    [
        (_result(best=False), [], r"has no best config .* there is no tuned recipe to write"),
        (_result(task="fashion-mnist"), [], r"was made for task 'fashion-mnist', not 'char-lm'; pass --task"),
        (_result(recipe="speedup-compiled"), [], r"tuned recipe 'speedup-compiled', not --recipe 'speedup'"),
        ({**_result(), "benchmark": "bench"}, [], r"is not a result file of tune_recipe.py"),
        (_result(), ["--tuned-name", "speedup"], r"--tuned-name 'speedup' would replace the recipe"),
    ],
)
def test_a_result_without_a_usable_best_writes_no_file(
    result: dict[str, Any], args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tuned.py"
    argv = [
        "--task",
        "char-lm",
        "--from-result",
        str(_write_result(tmp_path, result)),
        "--recipe-out",
        str(out),
    ]
    with pytest.raises(SystemExit) as exit_info:
        tr.main([*argv, *args])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_missing_inputs_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in (
        (["--from-result", str(tmp_path / "none.json"), "--recipe-out", "x.py"], "does not exist"),
        (["--from-result", str(tmp_path / "none.json")], "name it with --recipe-out PATH"),
        ([], "--out is required"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            tr.main(["--task", "char-lm", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_callback_factory_without_a_name_is_refused(
    tmp_path: Path, forget_tuned: None, capsys: pytest.CaptureFixture[str]
) -> None:
    def made_here(ctx: Any) -> Any:
        return recipes.async_metrics(ctx)

    register_recipe(get_recipe("speedup").for_task("char-lm").extended(
        name="tmp-unnamed-callbacks", callbacks=(recipes.wsd(1e-3), made_here)))  # fmt: skip
    out = tmp_path / "tuned.py"
    result_path = _write_result(tmp_path, _result(recipe="tmp-unnamed-callbacks"))
    with pytest.raises(SystemExit):
        tr.main(["--task", "char-lm", "--recipe", "tmp-unnamed-callbacks", "--from-result", str(result_path),
                 "--recipe-out", str(out)])  # fmt: skip
    assert "callback factories ['<made_here>'] that are not names of" in capsys.readouterr().err
    assert not out.exists()
    # The sweep refuses it before sweeping, not after.
    with pytest.raises(SystemExit):
        tr.main(["--task", "char-lm", "--recipe", "tmp-unnamed-callbacks", "--device", "cpu", "--smoke",
                 "--out", str(tmp_path / "r.json"), "--recipe-out", str(out)])  # fmt: skip
    assert "--recipe-out: recipe 'tmp-unnamed-callbacks' has callback factories" in capsys.readouterr().err


def test_from_searcher_writes_that_searchers_best_and_refuses_one_that_did_not_sweep(
    tmp_path: Path, forget_tuned: None, capsys: pytest.CaptureFixture[str]
) -> None:
    result = _result()
    bayes_cfg, random_cfg = CONFIG, {**CONFIG, "batch_size": 64, "epochs": 43}
    result["sweeps"] = [
        {"searcher": "bayes", "seed": 1, "date": "2026-12-04T16:00:00+0000",
         "best": {"trial": 7, "config": bayes_cfg, "reached": True, "time_to_target_s": 61.25}},
        {"searcher": "random", "seed": 1, "date": "2026-12-05T12:00:00+0000",
         "best": {"trial": 9, "config": random_cfg, "reached": True, "time_to_target_s": 23.3}},
    ]  # fmt: skip
    result["best"] = {"searcher": "random", "seed": 1, **result["sweeps"][1]["best"]}  # the fastest of all
    path = _write_result(tmp_path, result)
    for searcher, batch, date in (("bayes", 256, "2026-12-04T16:00"), ("random", 64, "2026-12-05T12:00")):
        out = tmp_path / f"{searcher}.py"
        argv = [
            "--task",
            "char-lm",
            "--from-result",
            str(path),
            "--from-searcher",
            searcher,
            "--recipe-out",
            str(out),
        ]
        assert tr.main(argv) == 0
        source = out.read_text()
        assert f"batch_size={batch}" in source and f"{searcher} sweep, seed 1" in source and date in source
    with pytest.raises(SystemExit) as exc:
        tr.main(
            [
                "--task",
                "char-lm",
                "--from-result",
                str(path),
                "--from-searcher",
                "tpe",
                "--recipe-out",
                "x.py",
            ]
        )
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--from-searcher 'tpe': " in err and "its searchers: ['bayes', 'random']" in err
