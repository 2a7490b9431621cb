"""benchmarks/tune_recipe.py: a recipe sweep by time to target on a real local Ray cluster, its result
file, the ``Recipe.extended`` call it prints, and the arguments it refuses."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'lightning-speedup[tune]'")
import lightning as L
import ray
from ray import cloudpickle

from lightning_speedup.bench import recipes
from lightning_speedup.bench.recipes import Recipe, get_recipe
from lightning_speedup.bench.runner import build_trainer_parts
from lightning_speedup.bench.tasks import RunContext, get_task
from lightning_speedup.tune import init_ray

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tune_recipe.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tune_recipe", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    # Ray's workers cannot import a script by name: its trial function travels by value, as when it runs
    # as `python benchmarks/tune_recipe.py`.
    cloudpickle.register_pickle_by_value(module)
    return module


tr = _load_script()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    address = init_ray(num_cpus=2, log_to_driver=False)
    yield address
    ray.shutdown()


def test_smoke_sweep_writes_trials_best_config_and_trials_to_target(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tune_recipe.json"
    argv = [
        "--task", "fashion-mnist", "--device", "cpu", "--smoke", "--num-samples", "2", "--compare-random",
        "--max-concurrent", "2", "--data", str(fashion_mnist_dir), "--out", str(out),
    ]  # fmt: skip
    # A budget that the first sweep uses up: the random sweep is not started (exit 4), and --resume adds it.
    assert tr.main([*argv, "--time-budget", "1"]) == 4
    first = json.loads(out.read_text())
    assert [sw["searcher"] for sw in first["sweeps"]] == ["bayes"]
    assert first["skipped_sweeps"] == [{"searcher": "random", "seed": 0}] and first["complete"] is False
    capsys.readouterr()
    rc = tr.main([*argv, "--resume"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "--resume: keeping the finished sweeps [('bayes', 0)]" in printed
    result = json.loads(out.read_text())
    assert result["sweeps"][0] == first["sweeps"][0]
    assert result["skipped_sweeps"] == []
    smoke = tr.SMOKE["fashion-mnist"]
    assert (result["task"], result["recipe"], result["metric"], result["mode"]) == (
        "fashion-mnist", "speedup", "val_acc", "max",
    )  # fmt: skip
    assert result["target"] == smoke.target and result["complete"] is True
    env = result["environment"]
    for key in ("gpu", "driver", "torch", "lightning", "ray", "optuna", "date", "seeds"):
        assert key in env, key
    assert env["ray"] == ray.__version__ and env["lightning"] == L.__version__ and env["seeds"] == [0]
    assert result["settings"]["resources_per_trial"] == {"cpu": 1.0, "gpu": 0.0}
    assert result["hand_picked"] == {"batch_size": 512, "peak_lr": 4e-3, "epochs": 10, "warmup": 0.3,
                                     "in_space": False}  # fmt: skip

    # Seed 0 runs the Bayesian sweep first, then the random one with the same budget.
    assert [(sw["searcher"], sw["seed"]) for sw in result["sweeps"]] == [("bayes", 0), ("random", 0)]
    for sweep in result["sweeps"]:
        assert sweep["error"] is None and sweep["complete"]
        assert [t["trial"] for t in sweep["trials"]] == [1, 2]
        for t in sweep["trials"]:
            assert t["status"] == "finished" and t["error"] is None
            assert smoke.space.contains(t["config"]), t
            assert t["reached"] == (t["best_metric"] >= smoke.target), t
            assert (t["time_to_target_s"] is not None) == t["reached"]
            if t["reached"]:
                assert t["time_to_target_s"] == t["score"] > 0
                assert t["validations"] <= t["config"]["epochs"]
            else:
                # A miss ran its own schedule to the end (RecipeEpochs), not the sweep's longest one, and
                # scored the penalty on its own full run: 2 x fit time x (1 + shortfall), the fit time within
                # the trial's wall time.
                assert t["validations"] == t["config"]["epochs"]
                shortfall = (smoke.target - t["best_metric"]) / smoke.target
                assert 0 < t["score"] / (2 * (1 + shortfall)) <= t["time_s"]
        reached = [t for t in sweep["trials"] if t["reached"]]
        best = sweep["best"]
        expected = min(reached, key=lambda t: t["time_to_target_s"]) if reached else None
        if expected is not None:
            assert best["reached"] and best["config"] == expected["config"]
            assert best["time_to_target_s"] == expected["time_to_target_s"]
        assert best["recipe_overrides"]["batch_size"] == best["config"]["batch_size"]
    assert result["best_per_sweep"][0]["config"] == result["sweeps"][0]["best"]["config"]

    # Trials to target, recomputed from the trials.
    ttt = result["trials_to_target"]
    times = [t["time_to_target_s"] for sw in result["sweeps"] for t in sw["trials"] if t["reached"]]
    assert ttt["fastest_time_to_target_s"] == (min(times) if times else None)
    for sweep in result["sweeps"]:
        first = next((t["trial"] for t in sweep["trials"] if t["reached"]), 3)
        assert ttt[sweep["searcher"]]["reach"] == [first]
        assert ttt[sweep["searcher"]]["reach_median"] == first

    # The best config is one Recipe.extended accepts: the printed call (the last line) builds it.
    best = result["best"]
    assert best is not None and best["searcher"] in ("bayes", "random")
    assert printed.strip().splitlines()[-1] == best["recipe_extended"]
    namespace = {
        "get_recipe": get_recipe,
        "schedule": recipes.schedule,
        "async_metrics": recipes.async_metrics,
    }
    tuned = eval(best["recipe_extended"], namespace)
    assert isinstance(tuned, Recipe) and tuned.name == "speedup"
    assert (tuned.batch_size, tuned.max_epochs) == (best["config"]["batch_size"], best["config"]["epochs"])
    assert tr.schedule_of(tuned, "fashion-mnist")[1:] == (
        "OneCycle", {"max_lr": best["config"]["peak_lr"], "pct_start": best["config"]["warmup"]},
    )  # fmt: skip
    assert [getattr(f, "__name__", "") for f in tuned.callbacks][1:] == ["AsyncProgressBarMetrics()"]
    base = get_recipe("speedup").for_task("fashion-mnist")
    assert (
        base.extended(**tr.recipe_overrides(base, "fashion-mnist", best["config"])).summary()
        == tuned.summary()
    )

    # --resume refuses a file whose sweeps ran with other settings.
    with pytest.raises(SystemExit) as exit_info:
        tr.main([*argv, "--resume", "--target", "0.25"])
    assert exit_info.value.code == 2
    assert "--resume: the sweeps in" in capsys.readouterr().err and json.loads(out.read_text()) == result


def test_recipe_epochs_ends_the_trial_and_the_schedule_at_its_own_epochs(fashion_mnist_dir: Path) -> None:
    task = get_task("fashion-mnist")
    base = get_recipe("speedup").for_task("fashion-mnist")
    config = {"batch_size": 64, "peak_lr": 5e-3, "epochs": 2, "warmup": 0.25}
    recipe = base.extended(**tr.recipe_overrides(base, task.name, config), num_workers=0)
    ctx = RunContext(task=task, recipe=recipe, seed=0, data_path=str(fashion_mnist_dir), train_subset=256,
                     val_subset=64, model_kwargs={"width": 4}, accelerator="cpu")  # fmt: skip
    module, dm, callbacks, _ = build_trainer_parts(task, ctx)
    trainer = L.Trainer(
        max_epochs=5, callbacks=[*callbacks, tr.RecipeEpochs(2)], accelerator="cpu", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    steps = 2 * (256 // 64)  # the speedup recipe drops the last partial batch
    assert trainer.current_epoch == 2 and trainer.global_step == steps
    # The schedule and the time-to-target report's projection span the trial's 2 epochs, not the Trainer's 5.
    (one_cycle,) = [cb for cb in callbacks if type(cb).__name__ == "OneCycle"]
    assert one_cycle.state_dict()["total_steps"] == steps
    assert trainer.estimated_stepping_batches == steps

    with pytest.raises(ValueError, match="schedule has 6 epochs but the sweep's Trainer allows 5"):
        L.Trainer(max_epochs=5, callbacks=[tr.RecipeEpochs(6)], logger=False).fit(module, datamodule=dm)
    with pytest.raises(ValueError, match="max_epochs must be an integer >= 1, got 0"):
        tr.RecipeEpochs(0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--gpus-per-trial", "0.3"],
            r"--gpus-per-trial 0.3 needs --device gpu; with --device cpu leave it out",
        ),
        (
            ["--task", "mnist"],
            r"argument --task: invalid choice: 'mnist' \(choose from '?char-lm'?, '?fashion-mnist'?\)",
        ),
        (["--recipe", "baseline"], r"Recipe 'baseline' for task 'fashion-mnist' has 0 schedule callbacks"),
        (["--recipe", "speedupp"], r"Unknown recipe 'speedupp'. Did you mean 'speedup'\?"),
        (
            ["--searcher", "random", "--compare-random"],
            r"--compare-random runs a random sweep beside --searcher",
        ),
        (["--target", "1.5"], r"Target 1.5 is outside the range of val_acc"),
        (["--num-samples", "0"], r"--num-samples must be >= 1, got 0"),
        (["--data", "/nonexistent/fmnist"], r"--data /nonexistent/fmnist does not exist"),
    ],
)
def test_a_bad_argument_exits_2_with_what_to_do(
    args: list[str], message: str, fashion_mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never.json"
    argv = ["--task", "fashion-mnist", "--device", "cpu", "--smoke", "--data", str(fashion_mnist_dir)]
    with pytest.raises(SystemExit) as exit_info:
        tr.main([*argv, "--out", str(out), *args])  # a later --task or --data wins
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_gpu_device_without_cuda_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if tr.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as exit_info:
        tr.main(["--task", "char-lm", "--device", "gpu", "--smoke", "--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert "--device gpu, but torch" in capsys.readouterr().err


@pytest.mark.gpu
def test_smoke_sweep_on_a_shared_gpu(ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tune_recipe_gpu.json"
    rc = tr.main([
        "--task", "fashion-mnist", "--device", "gpu", "--gpus-per-trial", "0.5", "--cpus-per-trial", "1",
        "--smoke", "--num-samples", "2", "--data", str(fashion_mnist_dir), "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["settings"]["resources_per_trial"] == {"cpu": 1.0, "gpu": 0.5}
    assert result["environment"]["gpu"] is not None
    trials = result["sweeps"][0]["trials"]
    assert len(trials) == 2 and all(t["error"] is None for t in trials)
    assert all(math.isfinite(t["score"]) for t in trials)


def test_asha_sweep_records_its_scheduler_and_resumes_only_with_it(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "asha.json"
    argv = ["--task", "fashion-mnist", "--device", "cpu", "--smoke", "--num-samples", "2", "--max-concurrent", "2",
            "--data", str(fashion_mnist_dir), "--out", str(out)]  # fmt: skip
    assert tr.main([*argv, "--scheduler", "asha"]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["scheduler"] == "asha" and result["complete"] is True
    assert len(result["sweeps"][0]["trials"]) == 2 and result["best"] is not None
    capsys.readouterr()
    # The default (no scheduler) is another sweep: --resume refuses to mix them, naming the setting.
    with pytest.raises(SystemExit) as exit_info:
        tr.main([*argv, "--resume", "--compare-random"])
    assert exit_info.value.code == 2
    assert "ran with other settings (scheduler: {'scheduler': 'asha'})" in capsys.readouterr().err


def _sweep(searcher: str, gpu: str | None, times: list[float | None]) -> dict:
    trials = [{"trial": i + 1, "reached": t is not None, "time_to_target_s": t} for i, t in enumerate(times)]
    return {"searcher": searcher, "seed": 0, "gpu": gpu, "trials": trials}


def test_trials_to_target_leaves_near_best_out_when_the_sweeps_ran_on_different_gpus(
    capsys: pytest.CaptureFixture[str],
) -> None:
    same = [_sweep("bayes", "H200", [None, 60.0, 61.0]), _sweep("random", "H200", [None, None, 30.0])]
    ttt = tr.trials_to_target(same, ["bayes", "random"], 3, 0.1)
    assert ttt["times_comparable"] and ttt["gpus"] == ["H200"] and ttt["fastest_time_to_target_s"] == 30.0
    assert (ttt["bayes"]["reach"], ttt["bayes"]["near_best"]) == ([2], [4])  # never within 10% of 30 s
    assert (ttt["random"]["reach"], ttt["random"]["near_best"]) == ([3], [3])

    mixed = [same[0], {**same[1], "gpu": "H100"}]
    ttt = tr.trials_to_target(mixed, ["bayes", "random"], 3, 0.1)
    assert not ttt["times_comparable"] and ttt["gpus"] == ["H100", "H200"]
    assert ttt["fastest_time_to_target_s"] is None and ttt["near_best_s"] is None
    assert (ttt["bayes"]["reach"], ttt["random"]["reach"]) == ([2], [3])  # a metric threshold still compares
    for searcher in ("bayes", "random"):
        assert ttt[searcher]["near_best"] is None and ttt[searcher]["near_best_got_there"] is None
    result = {"trials_to_target": ttt, "metric": "val_loss", "mode": "min", "target": 1.47,
              "settings": {"searchers": ["bayes", "random"]}, "best": None}  # fmt: skip
    tr.print_summary(result, Path("out.json"))
    out = capsys.readouterr().out
    assert "ran on different GPUs, H100 and H200" in out
    assert re.search(r"random\s+3\s+1/1\s+-\s+-", out)
