"""Sweeps on a real local Ray cluster (started once for this module) with a tiny real Fashion-MNIST task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'lightning-speedup[tune]'")
import ray
import torch
from ray import tune

from lightning_speedup.tune import (
    InsufficientResourcesError,
    MetricNotReportedError,
    NoValidationError,
    TimeToTargetObjective,
    config_in_space,
    init_ray,
    tune_lightning,
)
from lightning_speedup.tune.sweep import SETTINGS_FILE
from tests.tune.tasks import TinyMLP, build_mlp

QUIET: dict[str, Any] = {"verbose": 0}


@pytest.fixture(scope="module")
def ray_cluster() -> Any:
    address = init_ray(num_cpus=2, log_to_driver=False)
    yield address
    ray.shutdown()


def _small_space(data_dir: Path, **constants: Any) -> dict[str, Any]:
    """The learning rate searched on 512 training and 256 validation images, plus ``constants``."""
    return {
        "lr": tune.loguniform(1e-4, 1e-2),
        "data_dir": str(data_dir),
        "n_train": 512,
        "n_val": 256,
        **constants,
    }


def _markers(folder: Path) -> dict[str, int]:
    """Trial id -> how many times build() ran for it."""
    counts: dict[str, int] = {}
    for p in folder.iterdir():
        trial_id = p.name.split(".")[0]
        counts[trial_id] = counts.get(trial_id, 0) + 1
    return counts


def test_local_cluster_listens_on_localhost_only(ray_cluster: str) -> None:
    assert ray_cluster.startswith("127.0.0.1:")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert [n["NodeManagerAddress"] for n in nodes] == ["127.0.0.1"]
    assert ray.cluster_resources()["CPU"] == 2


def test_init_ray_while_connected_refuses_another_cluster_and_passes_the_same_one_again(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An address or size of another cluster was ignored: the sweep ran on the connected cluster."""
    port = ray_cluster.rsplit(":", 1)[1]
    # A notebook re-runs its cells: nothing, or the same cluster again, keeps the connection.
    for kwargs in (
        {},
        {"num_cpus": 2},
        {"num_gpus": 0},
        {"address": ray_cluster},
        {"address": f"localhost:{port}"},
    ):
        assert init_ray(**kwargs) == ray_cluster, kwargs
    with pytest.raises(
        ValueError, match=r"num_cpus=4 \(it has 2\), but this process is already connected.*ray\.shutdown\(\)"
    ):
        init_ray(num_cpus=4)
    with pytest.raises(ValueError, match=r"num_gpus=1 \(it has 0\)"):
        init_ray(num_gpus=1)
    with pytest.raises(ValueError, match=r"num_cpus/num_gpus size a new local cluster"):
        init_ray(address=ray_cluster, num_cpus=2)
    space = {"lr": tune.loguniform(1e-4, 1e-2), "data_dir": str(fashion_mnist_dir)}
    with pytest.raises(
        ValueError, match=r"address='10\.255\.255\.1:6379', but .*already connected.*ray\.shutdown\(\)"
    ):
        tune_lightning(
            build_mlp, space, "val_acc", "max", 1, scheduler=None, address="10.255.255.1:6379",
            trainer_kwargs={"max_epochs": 1}, storage_path=tmp_path, name="elsewhere", **QUIET,
        )  # fmt: skip
    assert not (tmp_path / "elsewhere").exists()
    with caplog.at_level("WARNING", logger="lightning_speedup.tune"):
        assert init_ray(address="ray://10.255.255.1:10001") == ray_cluster
    assert "address='ray://10.255.255.1:10001' is ignored" in caplog.text and "ray.shutdown()" in caplog.text
    assert ray.get_runtime_context().gcs_address == ray_cluster


@pytest.mark.parametrize("searcher", ["bayes", "tpe", "random"])
def test_four_trial_sweep_finds_best_reported_config(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path, searcher: str
) -> None:
    space = {
        "lr": tune.loguniform(1e-4, 3e-2),
        "hidden": tune.choice([16, 32]),
        "data_dir": str(fashion_mnist_dir),
    }
    results = tune_lightning(
        build_mlp, space, "val_acc", "max", 4, searcher=searcher, scheduler=None, seed=0, max_concurrent=2,
        trainer_kwargs={"max_epochs": 1}, storage_path=tmp_path, name=searcher, **QUIET,
    )  # fmt: skip
    df, history = results.dataframe(), results.history()
    assert results.complete and len(df) == 4 and (df["status"] == "finished").all()
    assert history["trial_id"].nunique() == 4
    # The best is the best value any trial reported, and its config is the config of that trial.
    best_row = history.loc[history["val_acc"].idxmax()]
    assert results.best_metric == pytest.approx(best_row["val_acc"], abs=0)
    assert results.best_trial_id == best_row["trial_id"]
    assert (
        results.best_config["lr"] == best_row["config/lr"]
        and results.best_config["hidden"] == best_row["config/hidden"]
    )
    ray_best = results.result_grid.get_best_result("val_acc", "max", scope="all")  # Ray's own pick
    assert ray_best.config == results.best_config
    assert config_in_space(results.best_config, space)
    assert all(config_in_space({"lr": lr, "hidden": h, "data_dir": str(fashion_mnist_dir)}, space)
               for lr, h in zip(df["config/lr"], df["config/hidden"]))  # fmt: skip
    # Every logged metric reaches Tune, and the trials learned something.
    assert {"val_acc", "val_loss", "train_loss", "epoch", "step", "fit_time_s"} <= set(history.columns)
    assert results.best_metric > 0.5
    # The best weights are kept (weights only) and reproduce the best metric.
    ckpt = torch.load(results.best_checkpoint_path, weights_only=True, map_location="cpu")
    assert "optimizer_states" not in ckpt and "state_dict" in ckpt
    model = TinyMLP.load_from_checkpoint(results.best_checkpoint_path, map_location="cpu")
    assert model.hparams.lr == results.best_config["lr"]


def test_asha_stops_weak_trials_and_resume_returns_the_finished_sweep_as_recorded(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """The two good trials are the same run (same lr, data and seed): an exact tie for the best, as is
    common (an accuracy on 1024 images takes 1025 values). Ray lists a restored sweep's trials in
    another order than the run that recorded them; the tie must still go to the same trial."""
    good, weak = 3e-3, 1e-6  # after one epoch: val_acc ~0.7 vs ~0.1
    space = {"lr": tune.grid_search([good, good, weak, weak]), "data_dir": str(fashion_mnist_dir)}
    kwargs: dict[str, Any] = dict(
        searcher="random", scheduler="asha", seed=0, max_concurrent=1, trainer_kwargs={"max_epochs": 3},
        storage_path=tmp_path, name="asha", **QUIET,
    )  # fmt: skip
    results = tune_lightning(build_mlp, space, "val_acc", "max", 1, **kwargs)
    df, history = results.dataframe(), results.history()
    assert results.complete and len(df) == 4 and (df["status"] == "finished").all()
    assert df.loc[df["config/lr"] == good, "iterations"].tolist() == [3, 3]
    assert df.loc[df["config/lr"] == weak, "iterations"].tolist() == [1, 1]
    assert results.best_config["lr"] == good
    goods = df[df["config/lr"] == good]
    assert goods["val_acc"].tolist() == [results.best_metric] * 2
    assert results.best_trial_id == goods["trial_id"].iloc[0], "the earlier trial wins a tie"

    for _ in range(2):  # the second resume starts from the state the first one saved
        again = tune_lightning(build_mlp, space, "val_acc", "max", 1, resume=True, **kwargs)
        assert again.complete
        pd.testing.assert_frame_equal(again.dataframe(), df)
        pd.testing.assert_frame_equal(again.history(), history)
        assert (again.best_trial_id, again.best_metric, again.best_config, again.best_checkpoint_path) == (
            results.best_trial_id, results.best_metric, results.best_config, results.best_checkpoint_path
        )  # fmt: skip


def test_asha_lets_the_trials_it_keeps_run_their_whole_budget_when_validating_within_epochs(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """8 batches per epoch validated every 2 batches: 8 validations in 2 epochs. ASHA's max_t counted one
    validation per epoch (2) and stopped the good trial at its second validation, a quarter of its run."""
    good, weak = 3e-3, 1e-6
    space = {
        "lr": tune.grid_search([good, weak]),
        "data_dir": str(fashion_mnist_dir),
        "n_train": 1024,
        "n_val": 512,
    }
    results = tune_lightning(
        build_mlp, space, "val_acc", "max", 1, searcher="random", scheduler="asha", seed=0, max_concurrent=1,
        trainer_kwargs={"max_epochs": 2, "val_check_interval": 2}, storage_path=tmp_path, name="asha_vci", **QUIET,
    )  # fmt: skip
    df, history = results.dataframe(), results.history()
    assert results.complete and (df["status"] == "finished").all()
    kept = history[history["config/lr"] == good]
    assert kept["validation"].tolist() == list(range(1, 9)) and kept["step"].iloc[-1] == 16
    assert kept["budget_fraction"].iloc[-1] == 1.0
    assert df.loc[df["config/lr"] == weak, "iterations"].tolist() == [1], "ASHA still stops the weak trial"


class _InterruptAfter(tune.Callback):
    """Sends this process SIGINT (as Ctrl+C or a notebook's interrupt does) once ``n`` trials finished.

    Ray stores run callbacks with the sweep and restores them on resume: the flag file keeps the
    restored copy from interrupting again.
    """

    def __init__(self, n: int, flag: Path) -> None:
        self.n, self.flag, self.finished = n, flag, 0

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.finished += 1
        if self.finished >= self.n and not self.flag.exists():
            self.flag.touch()
            os.kill(os.getpid(), signal.SIGINT)


def _interrupted_sweep(
    space: dict[str, Any], num_samples: int, finished: int, flag: Path, kwargs: dict[str, Any]
) -> tuple[Any, Any]:
    """A sweep of ``build_mlp`` interrupted once ``finished`` trials have finished: its results and those trials."""
    first = tune_lightning(
        build_mlp,
        space,
        "val_acc",
        "max",
        num_samples,
        tune_callbacks=[_InterruptAfter(finished, flag)],
        **kwargs,
    )
    assert not first.complete
    done = first.dataframe().query("status == 'finished'")
    assert len(done) == finished
    return first, done


class _InterruptAtReport(tune.Callback):
    """Sends this process SIGINT (as Ctrl+C does) at the first report of the ``n``-th trial, which then runs."""

    def __init__(self, n: int) -> None:
        self.n, self.started, self.sent = n, 0, False

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.started += 1

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        if self.started >= self.n and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_while_the_last_trial_runs_leaves_the_sweep_incomplete_with_the_resume_call(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl+C while the last trial runs: Ray stops it and marks it TERMINATED, as it marks a trial that
    ran to its end, so the results called it finished and the sweep complete (no resume call given),
    although it had done one of its two epochs."""
    space = {
        "lr": tune.loguniform(1e-4, 3e-2),
        "data_dir": str(fashion_mnist_dir),
        "n_train": 512,
        "n_val": 256,
    }
    with caplog.at_level("WARNING", logger="lightning_speedup.tune"):
        results = tune_lightning(
            build_mlp, space, "val_acc", "max", 2, searcher="random", scheduler=None, seed=0, max_concurrent=1,
            trainer_kwargs={"max_epochs": 2}, storage_path=tmp_path, name="ctrl_c",
            tune_callbacks=[_InterruptAtReport(2)], **QUIET,
        )  # fmt: skip
    df = results.dataframe()
    assert df["status"].tolist() == ["finished", "unfinished"] and df["iterations"].tolist() == [2, 1]
    assert not results.complete and "INCOMPLETE" in repr(results)
    assert (
        f"(1 did). Continue it with tune_lightning(..., storage_path={str(tmp_path)!r}, name='ctrl_c', resume=True)"
        in caplog.text
    )


def test_resume_after_interrupt_does_not_rerun_finished_trials(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    space = {
        "lr": tune.loguniform(1e-4, 3e-2),
        "data_dir": str(fashion_mnist_dir),
        "marker_dir": str(markers),
    }
    kwargs: dict[str, Any] = dict(
        searcher="tpe", scheduler=None, seed=0, max_concurrent=1, trainer_kwargs={"max_epochs": 1},
        storage_path=tmp_path / "sweeps", name="resumable", **QUIET,
    )  # fmt: skip
    first, done = _interrupted_sweep(space, 4, 2, tmp_path / "flag", kwargs)
    before = first.history().set_index("trial_id")

    with pytest.raises(ValueError, match="already exists"):
        tune_lightning(build_mlp, space, "val_acc", "max", 4, **kwargs)
    with pytest.raises(ValueError, match="num_samples: was 4, now 5"):
        tune_lightning(build_mlp, space, "val_acc", "max", 5, resume=True, **kwargs)

    for changed in ({"lr": tune.loguniform(1e-5, 3e-2)}, {"lr": tune.uniform(1e-4, 3e-2)}):
        with pytest.raises(
            ValueError, match=r"search_space: was \{'lr': 'float\(0.0001, 0.03, LogUniform\)'}, now"
        ):
            tune_lightning(build_mlp, {**space, **changed}, "val_acc", "max", 4, resume=True, **kwargs)
    second = tune_lightning(build_mlp, space, "val_acc", "max", 4, resume=True, **kwargs)
    df = second.dataframe()
    assert second.complete and len(df) == 4 and (df["status"] == "finished").all()
    runs = _markers(markers)
    assert set(runs) == set(df["trial_id"])
    for trial_id in done["trial_id"]:
        assert runs[trial_id] == 1, f"finished trial {trial_id} ran again"
    after = second.history().set_index("trial_id")
    for trial_id in done["trial_id"]:
        # Same reports (same wall-clock timestamps): kept, not recomputed.
        assert after.loc[[trial_id], "val_acc"].tolist() == before.loc[[trial_id], "val_acc"].tolist()
        assert (
            after.loc[[trial_id], "time_total_s"].tolist() == before.loc[[trial_id], "time_total_s"].tolist()
        )
    assert second.best_metric == pytest.approx(second.history()["val_acc"].max(), abs=0)


def test_a_resumed_sweep_gives_build_the_current_constants_and_refuses_added_or_removed_ones(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """A constant such as a data path may move between a sweep and its resume: Ray restores the trials'
    configurations with the old value, which build got for every trial run after the resume."""
    before, after = tmp_path / "before", tmp_path / "after"
    before.mkdir()
    after.mkdir()
    space = {
        "lr": tune.loguniform(1e-4, 3e-2), "data_dir": str(fashion_mnist_dir), "marker_dir": str(before),
        "n_train": 512, "n_val": 256,
    }  # fmt: skip
    kwargs: dict[str, Any] = dict(
        searcher="random", scheduler=None, seed=0, max_concurrent=1, trainer_kwargs={"max_epochs": 1},
        storage_path=tmp_path / "sweeps", name="moved", **QUIET,
    )  # fmt: skip
    _, finished = _interrupted_sweep(space, 3, 1, tmp_path / "flag", kwargs)
    done = set(finished["trial_id"])

    constants = r"constants: was \['data_dir', 'marker_dir', 'n_train', 'n_val'\], now "
    with pytest.raises(
        ValueError, match=constants + r"\['data_dir', 'hidden', .*may change its value on resume"
    ):
        tune_lightning(build_mlp, {**space, "hidden": 16}, "val_acc", "max", 3, resume=True, **kwargs)
    without = {k: v for k, v in space.items() if k != "n_val"}
    with pytest.raises(ValueError, match=constants + r"\['data_dir', 'marker_dir', 'n_train'\]\)"):
        tune_lightning(build_mlp, without, "val_acc", "max", 3, resume=True, **kwargs)

    second = tune_lightning(
        build_mlp, {**space, "marker_dir": str(after)}, "val_acc", "max", 3, resume=True, **kwargs
    )
    df = second.dataframe()
    assert second.complete and len(df) == 3 and (df["status"] == "finished").all()
    rest = set(df["trial_id"]) - done
    assert set(_markers(after)) == rest, "every trial run after the resume got the new constant"
    assert done <= set(_markers(before))
    recorded = dict(zip(df["trial_id"], df["config/marker_dir"]))
    assert {t: recorded[t] for t in done} == {t: str(before) for t in done}
    assert {t: recorded[t] for t in rest} == {t: str(after) for t in rest}, "results show what build got"


def test_a_trial_that_never_validates_fails_naming_the_likely_causes(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """A trial that trains without validating reports nothing. Ray marked it finished without a result,
    or failed the whole sweep with an error about its own metric check; now the trial fails saying why,
    and while no trial has reported (every other trial would likely do the same) the sweep stops there."""
    markers = tmp_path / "markers"
    markers.mkdir()
    space = _small_space(fashion_mnist_dir, validate=False, marker_dir=str(markers))
    kwargs: dict[str, Any] = dict(
        searcher="random", scheduler=None, max_concurrent=1, trainer_kwargs={"max_epochs": 1}, storage_path=tmp_path,
        **QUIET,
    )  # fmt: skip
    with pytest.raises(
        NoValidationError,
        match=r"without a single validation, so it never reported 'val_acc'.*val_dataloader",
    ):
        tune_lightning(build_mlp, space, "val_acc", "max", 3, name="noval", **kwargs)
    assert sum(_markers(markers).values()) == 1, "the sweep should stop at the first trial"

    # Once a trial has reported, a trial that cannot validate fails alone and the sweep goes on.
    mixed = {**space, "validate": tune.grid_search([True, False]), "marker_dir": None}
    results = tune_lightning(build_mlp, mixed, "val_acc", "max", 1, name="mixed", **kwargs)
    df = results.dataframe().set_index("config/validate")
    assert df.loc[True, "status"] == "finished" and df.loc[False, "status"] == "error"
    assert (
        "NoValidationError" in df.loc[False, "error"]
        and "without a single validation" in df.loc[False, "error"]
    )
    assert results.best_trial_id == df.loc[True, "trial_id"]


def test_a_file_uri_storage_path_keeps_and_checks_the_settings_like_a_local_path(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    space = _small_space(fashion_mnist_dir)
    kwargs: dict[str, Any] = dict(
        searcher="random", scheduler=None, seed=0, trainer_kwargs={"max_epochs": 1},
        storage_path=f"file://{tmp_path}/sweeps", name="uri", **QUIET,
    )  # fmt: skip
    first = tune_lightning(build_mlp, space, "val_acc", "max", 1, **kwargs)
    assert first.complete and first.best_metric is not None
    saved = json.loads((tmp_path / "sweeps" / "uri" / SETTINGS_FILE).read_text())
    assert saved["num_samples"] == 1 and saved["metric"] == "val_acc"
    with pytest.raises(
        ValueError, match=r"\(metric: was 'val_acc', now 'val_loss'; .*num_samples: was 1, now 2"
    ):
        tune_lightning(build_mlp, space, "val_loss", "min", 2, resume=True, **kwargs)
    again = tune_lightning(build_mlp, space, "val_acc", "max", 1, resume=True, **kwargs)
    assert again.complete and again.best_trial_id == first.best_trial_id


def test_a_single_model_checkpoint_callback_keeps_lightning_checkpoints_and_verbose_0_prints_nothing(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """One Callback (not a list), as Lightning takes it; a ModelCheckpoint turns the trial's default
    enable_checkpointing=False on. Ray's output engine printed its header even at verbose=0."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt_dir = tmp_path / "lightning"
    space = _small_space(fashion_mnist_dir)
    results = tune_lightning(
        build_mlp, space, "val_acc", "max", 1, searcher="random", scheduler=None,
        trainer_kwargs={"max_epochs": 1, "callbacks": ModelCheckpoint(dirpath=ckpt_dir, filename="best")},
        storage_path=tmp_path / "sweeps", name="ckpt", **QUIET,
    )  # fmt: skip
    assert results.complete and results.best_metric is not None and not results.errors
    assert [p.name for p in ckpt_dir.iterdir()] == ["best.ckpt"]
    printed = capfd.readouterr()
    for line in ("Configuration for experiment", "View detailed results", "Wrote the latest version"):
        assert line not in printed.out + printed.err


def test_a_learning_rate_monitor_gets_a_logger_in_the_trials_folder(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """Trials default to logger=False, which Lightning refuses for a LearningRateMonitor: every trial failed."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    space = _small_space(fashion_mnist_dir)
    results = tune_lightning(
        build_mlp, space, "val_acc", "max", 1, searcher="random", scheduler=None,
        trainer_kwargs={"max_epochs": 1, "log_every_n_steps": 1, "callbacks": [LearningRateMonitor()]},
        storage_path=tmp_path, name="lr_monitor", **QUIET,
    )  # fmt: skip
    assert results.complete and not results.errors and results.best_metric is not None
    trial_dir = tmp_path / "lr_monitor" / f"trial_{results.best_trial_id}"
    assert list(trial_dir.glob("lightning_logs/version_0/*")), "the logger writes under the trial's folder"


def test_metric_no_trial_reports_stops_the_sweep_and_lists_logged_keys(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    markers = tmp_path / "markers"
    markers.mkdir()
    space = {
        "lr": tune.loguniform(1e-4, 1e-2), "log_metrics": False, "data_dir": str(fashion_mnist_dir),
        "marker_dir": str(markers),
    }  # fmt: skip
    with pytest.raises(MetricNotReportedError) as info:
        tune_lightning(
            build_mlp, space, "val_acc", "max", 4, searcher="random", scheduler=None, max_concurrent=1,
            trainer_kwargs={"max_epochs": 1}, storage_path=tmp_path, name="nometric", **QUIET,
        )  # fmt: skip
    message = str(info.value)
    assert "'val_acc'" in message and "val_error" in message and "train_loss" in message
    assert sum(_markers(markers).values()) == 1, "the sweep should stop at the first trial"


@pytest.mark.parametrize(
    ("resources", "match"),
    [({"cpu": 64}, r"'CPU': 64\.0.*'CPU': 2\.0"), ({"cpu": 1, "gpu": 0.5}, r"'GPU': 0\.5.*'GPU': 0\.0")],
)
def test_unsatisfiable_resources_fail_before_any_trial(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path, resources: dict[str, float], match: str
) -> None:
    space = {"lr": tune.loguniform(1e-4, 1e-2), "data_dir": str(fashion_mnist_dir)}
    with pytest.raises(InsufficientResourcesError, match=match):
        tune_lightning(
            build_mlp, space, "val_acc", "max", 2, resources_per_trial=resources, scheduler=None,
            trainer_kwargs={"max_epochs": 1}, storage_path=tmp_path, name="toobig", **QUIET,
        )  # fmt: skip
    assert not (tmp_path / "toobig").exists()


def test_time_to_target_scores_time_and_penalises_misses(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    objective = TimeToTargetObjective(metric="val_acc", target=0.6, penalty=2.0)
    space = {"lr": tune.grid_search([3e-3, 1e-6]), "data_dir": str(fashion_mnist_dir)}
    results = tune_lightning(
        build_mlp, space, num_samples=1, objective=objective, searcher="random", scheduler=None, seed=0,
        max_concurrent=2, trainer_kwargs={"max_epochs": 3}, storage_path=tmp_path, name="ttt", **QUIET,
    )  # fmt: skip
    assert results.metric == "time_to_target_s" and results.reached_target
    history = results.history()
    hit = history[history["config/lr"] == 3e-3]
    miss = history[history["config/lr"] == 1e-6]
    # The good trial stops at its first validation at or past the target, scored by its fit time.
    first = hit[hit["val_acc"] >= 0.6].iloc[0]
    assert len(hit) == first["training_iteration"] and hit["reached_target"].iloc[-1] == 1
    assert results.best_metric == pytest.approx(first["fit_time_s"])
    assert results.best_config["lr"] == 3e-3
    # The weak trial runs all epochs and is charged penalty * projected run time * (1 + shortfall).
    last = miss.iloc[-1]
    assert len(miss) == 3 and last["reached_target"] == 0
    shortfall = (0.6 - miss["val_acc"].max()) / 0.6
    assert last["time_to_target_s"] == pytest.approx(2.0 * last["projected_total_s"] * (1 + shortfall))
    assert last["projected_total_s"] == pytest.approx(last["fit_time_s"], rel=1e-6)
    assert not results.dataframe()["time_to_target_s"].isna().any()


@pytest.mark.gpu
def test_fractional_gpu_trials_share_the_gpu(
    ray_cluster: str, fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """Two trials with half a GPU each run at once, each on the GPU Ray assigned (devices=1)."""
    space = {"lr": tune.grid_search([3e-3, 1e-3]), "data_dir": str(fashion_mnist_dir)}
    results = tune_lightning(
        build_mlp, space, "val_acc", "max", 1, searcher="random", scheduler=None, seed=0, max_concurrent=2,
        resources_per_trial={"cpu": 1, "gpu": 0.5}, trainer_kwargs={"max_epochs": 2, "precision": "bf16-mixed"},
        storage_path=tmp_path, name="gpu", **QUIET,
    )  # fmt: skip
    history = results.history()
    assert results.complete and history["trial_id"].nunique() == 2
    assert (history["on_cuda"] == 1.0).all()
    assert results.best_metric > 0.5


@pytest.mark.parametrize("searcher", ["tpe", "random"])
def test_resume_after_interrupt_in_the_middle_of_a_trial_finishes_the_sweep(
    fashion_mnist_dir: Path, tmp_path: Path, searcher: str
) -> None:
    """Ctrl+C while the third of four trials runs, then resume: Ray's restart of an unfinished trial gave
    it a new id, which the Optuna searcher did not know (KeyError) and the random searcher waited on."""
    markers = tmp_path / "markers"
    markers.mkdir()
    cmd = [
        sys.executable, "-m", "tests.tune.interrupted_sweep",
        searcher, str(tmp_path / "sweeps"), str(markers), str(fashion_mnist_dir.resolve()),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    sweep = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(list(markers.iterdir())) < 3 and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sweep.poll() is None, f"the sweep ended before its third trial started:\n{sweep.stdout.read()}"
    sweep.send_signal(signal.SIGINT)  # the third trial is in its first batches (each sleeps 0.05 s)
    sweep.communicate(timeout=60)
    first = _markers(markers)
    assert len(first) == 3

    resumed = subprocess.run([*cmd, "resume"], env=env, capture_output=True, text=True, timeout=150)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    outcome = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert outcome["complete"]
    assert sorted(outcome["status"].values()) == ["finished"] * 4
    runs = _markers(markers)
    assert set(first) <= set(outcome["status"]), "every trial of the first run is kept under its id"
    assert sorted(runs.values()) == [1, 1, 1, 2], f"only the interrupted trial runs again: {runs}"


def test_a_trial_resumed_after_its_first_report_counts_its_validations_from_one(
    fashion_mnist_dir: Path, tmp_path: Path
) -> None:
    """Ctrl+C after the third trial's first validation (which reported and checkpointed), then resume: the
    trial reruns from its first epoch while Ray's training_iteration continued from the checkpoint (2, 3, 4
    for validations 1, 2, 3), which moved ASHA's rungs and the results' counts."""
    markers, val_markers = tmp_path / "markers", tmp_path / "val_markers"
    markers.mkdir()
    val_markers.mkdir()
    cmd = [
        sys.executable, "-m", "tests.tune.interrupted_sweep",
        "random", str(tmp_path / "sweeps"), str(markers), str(fashion_mnist_dir.resolve()), "3", str(val_markers),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    sweep = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def third_trial_validated() -> bool:
        started = sorted(markers.iterdir(), key=lambda p: p.stat().st_mtime)
        if len(started) < 3:
            return False
        third = started[2].name.split(".")[0]
        return any(p.name.startswith(third) for p in val_markers.iterdir())

    deadline = time.monotonic() + 180
    while not third_trial_validated() and sweep.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sweep.poll() is None, f"the sweep ended before its third trial validated:\n{sweep.stdout.read()}"
    sweep.send_signal(signal.SIGINT)  # the third trial is in its second epoch
    sweep.communicate(timeout=60)

    resumed = subprocess.run([*cmd, "resume"], env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    outcome = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert outcome["complete"] and sorted(outcome["status"].values()) == ["finished"] * 4
    runs = _markers(markers)
    assert sorted(runs.values()) == [1, 1, 1, 2], f"only the interrupted trial runs again: {runs}"
    for trial_id, validations in outcome["validations"].items():
        assert validations == [1, 2, 3], f"trial {trial_id} (ran {runs[trial_id]}x) reported {validations}"
        assert outcome["iterations"][trial_id] == 3
