"""The parts of a sweep that need no Ray cluster: input checks, the objective, the report callback,
and the searchers' reproducibility (driven through Ray's Searcher interface, as Tune drives them)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'lightning-speedup[tune]'")
import ray
import torch
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from lightning_speedup.tune import (
    MetricNotReportedError,
    TimeToTargetObjective,
    TuneReportCallback,
    config_in_space,
    tune_lightning,
    validate_search_space,
)
from lightning_speedup.tune.callback import BUDGET_KEY, CHECKPOINT_FILE
from lightning_speedup.tune.searchers import (
    check_searcher_settings,
    default_concurrency,
    make_scheduler,
    make_searcher,
)
from lightning_speedup.tune.space import (
    constant_paths,
    describe_search_space,
    grid_size,
    space_constants,
    with_constants,
)
from lightning_speedup.tune.sweep import SETTINGS_FILE, _check_resume_settings, _write_settings
from lightning_speedup.tune.trial import check_built, check_trainer_kwargs, make_trainer
from tests.tune.tasks import TensorDataModule, TinyMLP, build_mlp

SPACE = {"lr": tune.loguniform(1e-4, 1e-1)}


def _noop_build(config: dict[str, Any]) -> Any:
    raise AssertionError("build must not run for a rejected sweep")


# ---------------------------------------------------------------- bad input, rejected before Ray starts


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"searcher": "gp"}, ValueError, r"Unknown searcher 'gp'.*'bayes', 'tpe', 'random'"),
        ({"scheduler": "hyperband"}, ValueError, r"Unknown scheduler 'hyperband'.*'asha', None"),
        ({"search_space": {}}, ValueError, "search_space is empty"),
        ({"search_space": [("lr", 1e-3)]}, TypeError, "search_space must be a dict"),
        ({"search_space": {"lr": (1e-4, 1e-1)}}, ValueError, r"tuple \(0.0001, 0.1\).*tune.loguniform"),
        ({"search_space": {"bs": [128, 256]}}, ValueError, r"list.*tune.choice\(\[128, 256\]\)"),
        ({"search_space": {"lr": 1e-3, "wd": 0.0}}, ValueError, "only constants"),
        ({"search_space": {"lr": tune.uniform(0.1, 0.01)}}, ValueError, r"'lr'.*empty range"),
        ({"search_space": {"bs": tune.choice([])}}, ValueError, r"'bs'.*no categories"),
        ({"search_space": {"lr": tune.grid_search([1e-3, 1e-2])}}, ValueError, r"grid_search.*'bayes'"),
        ({"search_space": {"opt": {"lr": tune.sample_from(lambda c: 1e-3)}}, "searcher": "tpe"}, ValueError,
         r"'opt/lr'.*sample_from"),
        ({"search_space": {"a/b": tune.uniform(0, 1)}}, ValueError, "contains '/'"),
        ({"search_space": {1: tune.uniform(0, 1)}}, ValueError, "keys must be non-empty strings"),
        ({"search_space": {"lr": math.log}}, ValueError, r"\['lr'\] is a callable"),
        ({"search_space": {"x": tune.randn(0, 1)}}, ValueError, "Optuna.*cannot model"),
        ({"metric": None}, ValueError, "metric must name a logged validation metric"),
        ({"mode": "maximize"}, ValueError, "mode must be 'max' or 'min'"),
        ({"objective": TimeToTargetObjective()}, ValueError, "leave metric and mode out"),
        ({"num_samples": 0}, ValueError, "num_samples must be an int >= 1"),
        ({"trainer_kwargs": {"max_epoch": 2}}, ValueError, "Did you mean 'max_epochs'"),
        ({"trainer_kwargs": {"devices": 2}}, ValueError, "trains on one device"),
        ({"trainer_kwargs": {}}, ValueError, r"scheduler='asha'.*max_epochs.*max_steps"),
        ({"trainer_kwargs": {"max_epochs": 2, "strategy": "ddp_spawn"}}, ValueError,
         r"'ddp_spawn'.*start method 'spawn'.*never reach Ray Tune"),
        ({"trainer_kwargs": {"max_epochs": 2, "strategy": "ddp_notebook"}}, ValueError, "start method 'fork'"),
        ({"trainer_kwargs": {"max_epochs": 2, "strategy": DDPStrategy(start_method="spawn")}}, ValueError,
         r"'DDPStrategy'.*start method 'spawn'"),
        ({"trainer_kwargs": {"max_epochs": 2, "limit_val_batches": 0}}, ValueError,
         r"limit_val_batches'\]=0 turns validation off"),
        ({"trainer_kwargs": {"max_epochs": 2, "check_val_every_n_epoch": 3}}, ValueError,
         "check_val_every_n_epoch'\\]=3 is more than max_epochs=2"),
        ({"trainer_kwargs": {"max_epochs": 2, "callbacks": ["EarlyStopping"]}}, TypeError,
         r"callbacks'\] must hold Lightning Callbacks, got str"),
        ({"trainer_kwargs": {"max_epochs": 2, "enable_checkpointing": False, "callbacks": ModelCheckpoint()}},
         ValueError, "enable_checkpointing=False and a ModelCheckpoint"),
        ({"trainer_kwargs": {"max_epochs": 2, "logger": False, "callbacks": [LearningRateMonitor()]}},
         ValueError, r"logger=False and a LearningRateMonitor.*Remove logger=False"),
        ({"searcher": OptunaSearch(), "search_space": {"lr": tune.grid_search([1e-3, 1e-2])}}, ValueError,
         r"'lr'.*grid_search.*Searcher instance \(OptunaSearch\)"),
        ({"searcher": ConcurrencyLimiter(OptunaSearch(), max_concurrent=2), "max_concurrent": 3}, ValueError,
         r"max_concurrent=3, but the searcher is a ConcurrencyLimiter with max_concurrent=2"),
        ({"resources_per_trial": {"gpu": 2}}, ValueError, "one device"),
        ({"resources_per_trial": {"cpu": -1}}, ValueError, ">= 0"),
        ({"resume": True}, ValueError, "resume=True needs the name"),
        ({"name": "a/b"}, ValueError, "plain directory name"),
    ],
)  # fmt: skip
def test_bad_input_is_rejected_before_ray_starts(kwargs: dict[str, Any], error: type, match: str) -> None:
    args: dict[str, Any] = {
        "search_space": SPACE, "metric": "val_acc", "mode": "max", "trainer_kwargs": {"max_epochs": 2},
    }  # fmt: skip
    args.update(kwargs)
    space = args.pop("search_space")
    with pytest.raises(error, match=match):
        tune_lightning(_noop_build, space, **args)
    assert not ray.is_initialized()


def test_objective_needs_a_step_budget() -> None:
    with pytest.raises(ValueError, match=r"max_epochs.*max_steps"):
        tune_lightning(_noop_build, SPACE, objective=TimeToTargetObjective(), scheduler=None)


@pytest.mark.parametrize(
    "trainer_kwargs",
    [{"max_epochs": -1}, {"max_steps": -1}, {"max_epochs": -1, "max_steps": -1}, {"max_epochs": 0}],
)
def test_objective_refuses_an_unlimited_step_budget(trainer_kwargs: dict[str, Any]) -> None:
    """Lightning's -1 means no limit: a trial that never reached the target never ended."""
    with pytest.raises(ValueError, match=r"finite step budget.*positive int.*-1 is Lightning's 'no limit'"):
        tune_lightning(
            _noop_build,
            SPACE,
            objective=TimeToTargetObjective(),
            scheduler=None,
            trainer_kwargs=trainer_kwargs,
        )
    assert not ray.is_initialized()


def test_validate_search_space_returns_searched_names() -> None:
    space = {
        "lr": tune.loguniform(1e-4, 1e-1),
        "opt": {"wd": tune.uniform(0, 0.1), "name": "adamw"},
        "seed": 3,
    }
    assert validate_search_space(space, "bayes") == ["lr", "opt/wd"]
    assert validate_search_space({"lr": tune.grid_search([1, 2])}, "random") == ["lr"]


def test_grid_size_counts_grid_points() -> None:
    space = {
        "a": tune.grid_search([1, 2, 3]),
        "sub": {"b": tune.grid_search(["x", "y"])},
        "c": tune.uniform(0, 1),
    }
    assert grid_size(space) == 6 and grid_size(SPACE) == 1


def test_config_in_space_follows_ray_bounds() -> None:
    space = {"lr": tune.loguniform(1e-4, 1e-1), "n": tune.randint(1, 4), "q": tune.qrandint(0, 8, 4),
             "bs": tune.choice([64, 128]), "sub": {"wd": tune.uniform(0, 1)}, "const": "x"}  # fmt: skip
    ok = {"lr": 1e-3, "n": 3, "q": 8, "bs": 64, "sub": {"wd": 0.5}, "const": "x"}
    assert config_in_space(ok, space)
    for key, value in [("lr", 0.2), ("n", 4), ("q", 12), ("bs", 32), ("const", "y")]:
        assert not config_in_space({**ok, key: value}, space), key
    assert not config_in_space({**ok, "sub": {"wd": 1.5}}, space)
    assert not config_in_space({k: v for k, v in ok.items() if k != "n"}, space)


@pytest.mark.parametrize(
    "trainer_kwargs",
    [{"max_epochs": 10}, {"max_epochs": 3, "val_check_interval": 2}, {"max_epochs": 2, "val_check_interval": 0.3},
     {"max_steps": 100}, {"max_epochs": 10, "check_val_every_n_epoch": 2}],
)  # fmt: skip
def test_asha_rungs_are_fractions_of_the_step_budget(trainer_kwargs: dict[str, Any]) -> None:
    """However often a trial validates, ASHA stops it at max_t only when its whole budget is done."""
    asha = make_scheduler("asha", trainer_kwargs)
    assert asha._time_attr == BUDGET_KEY and asha._max_t == 1.0
    assert [milestone for milestone, _ in asha._brackets[0]._rungs if milestone < 1] == [0.25, 0.0625]


@pytest.mark.parametrize(
    ("searcher", "kwargs", "warned"),
    [
        ("random", {"n_initial": 3}, r"n_initial=3 does nothing with searcher='random'"),
        (OptunaSearch(), {"n_initial": 3}, r"n_initial=3 does nothing with a Searcher instance \(OptunaSearch\)"),
        ("bayes", {"n_initial": 8}, r"searcher='bayes' with n_initial=8 and num_samples=8: all 8 trials are random"),
        ("tpe", {"num_samples": 2}, r"searcher='tpe' with the default n_initial=2 and num_samples=2: all 2 trials"),
        (OptunaSearch(), {"seed": 1}, r"seed=1 seeds every trial but not the searcher instance \(OptunaSearch\)"),
        ("bayes", {"n_initial": 7, "seed": 1}, None),
        ("random", {"seed": 1}, None),
        (ConcurrencyLimiter(OptunaSearch(), max_concurrent=2), {"max_concurrent": 2}, None),
    ],
)  # fmt: skip
def test_searcher_settings_that_do_nothing_are_warned_about(
    searcher: Any, kwargs: dict[str, Any], warned: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    args: dict[str, Any] = {
        "num_samples": 8,
        "n_initial": None,
        "seed": None,
        "max_concurrent": None,
        **kwargs,
    }
    with caplog.at_level("WARNING", logger="lightning_speedup.tune"):
        check_searcher_settings(searcher, **args)
    if warned is None:
        assert not caplog.records
    else:
        assert len(caplog.records) == 1 and re.search(warned, caplog.text), caplog.text


def test_default_concurrency_keeps_bayes_nearly_sequential() -> None:
    assert default_concurrency("bayes", 32, slots=8) == 4
    assert default_concurrency("bayes", 4, slots=8) == 1
    assert default_concurrency("tpe", 32, slots=4) == 4
    assert default_concurrency("random", 32, slots=6) == 6


# ---------------------------------------------------------------- the time-to-target objective


def test_time_to_target_scores() -> None:
    obj = TimeToTargetObjective(metric="val_acc", target=0.9, penalty=2.0)
    assert obj.score(12.0, 0.91, fraction_done=0.3) == (12.0, True)
    # A miss: penalty * (elapsed / fraction done) * (1 + relative shortfall).
    value, reached = obj.score(10.0, 0.81, fraction_done=0.5)
    assert not reached and value == pytest.approx(2.0 * 20.0 * (1 + 0.1))
    assert obj.score(10.0, None, fraction_done=1.0)[0] == pytest.approx(2.0 * 10.0 * 2.0)
    # Closer to the target scores better; a miss always scores worse than its own full run.
    assert obj.score(10.0, 0.85, 1.0)[0] < obj.score(10.0, 0.5, 1.0)[0]
    assert obj.score(10.0, 0.899, 1.0)[0] > 10.0
    low = TimeToTargetObjective(metric="val_loss", target=1.5, mode="min")
    assert low.reached(1.49) and not low.reached(1.51) and low.shortfall(3.0) == pytest.approx(1.0)
    assert not obj.reached(float("nan"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"metric": ""}, "metric"), ({"mode": "up"}, "mode"), ({"target": 0.0}, "non-zero"),
     ({"target": float("inf")}, "finite"), ({"penalty": 0.5}, "penalty")],
)  # fmt: skip
def test_time_to_target_rejects_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TimeToTargetObjective(**kwargs)


# ---------------------------------------------------------------- the report callback in a real Trainer


class _Sink:
    """Stands in for Ray's session: records what the callback reports (and whether with weights)."""

    def __init__(self) -> None:
        self.reports: list[dict[str, float]] = []
        self.checkpointed: list[bool] = []

    def __call__(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        self.checkpointed.append(checkpoint_dir is not None)
        if checkpoint_dir is not None:
            state = torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, weights_only=True)
            assert "state_dict" in state and "optimizer_states" not in state


def _fit(
    fashion_mnist_dir: Path,
    callback: TuneReportCallback,
    lr: float = 3e-3,
    max_epochs: int = 3,
    **kwargs: Any,
) -> L.Trainer:
    module, data = build_mlp({"lr": lr, "data_dir": str(fashion_mnist_dir), "n_train": 1024, "n_val": 512,
                              **kwargs.pop("config", {})})  # fmt: skip
    trainer = L.Trainer(
        max_epochs=max_epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1, **kwargs,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer


def test_callback_reports_every_validation_and_checkpoints_only_improvements(fashion_mnist_dir: Path) -> None:
    sink = _Sink()
    _fit(fashion_mnist_dir, TuneReportCallback("val_loss", "min", report=sink), max_epochs=4, lr=3e-2)
    assert len(sink.reports) == 4  # the sanity check is not reported
    assert [r["epoch"] for r in sink.reports] == [0, 1, 2, 3]
    best, expected = math.inf, []
    for r in sink.reports:
        expected.append(r["val_loss"] < best)
        best = min(best, r["val_loss"])
        assert {"val_acc", "val_loss", "train_loss", "step", "fit_time_s"} <= set(r)
    assert sink.checkpointed == expected and expected[0]


def test_callback_reports_the_fraction_of_the_step_budget_done(fashion_mnist_dir: Path) -> None:
    """1024 images in batches of 128, validated every 2 batches for 2 epochs: 8 validations, 16 steps."""
    sink = _Sink()
    _fit(
        fashion_mnist_dir,
        TuneReportCallback("val_acc", "max", report=sink),
        max_epochs=2,
        val_check_interval=2,
    )
    assert [r["validation"] for r in sink.reports] == list(range(1, 9))
    assert [r[BUDGET_KEY] for r in sink.reports] == [k / 8 for k in range(1, 9)]


class _Unsized(torch.utils.data.IterableDataset):
    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        self.dataset = dataset

    def __iter__(self) -> Any:
        return iter(self.dataset)


def test_callback_that_needs_the_budget_refuses_a_trial_whose_budget_is_unknown(
    fashion_mnist_dir: Path,
) -> None:
    module, data = build_mlp({"lr": 1e-3, "data_dir": str(fashion_mnist_dir), "n_train": 256, "n_val": 256})
    unsized = torch.utils.data.DataLoader(_Unsized(data.train_dataloader().dataset), batch_size=64)
    trainer = L.Trainer(
        max_epochs=1, callbacks=[TuneReportCallback("val_acc", "max", report=_Sink(), require_budget=True)],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"cannot tell this trial's budget.*max_steps"):
        trainer.fit(module, train_dataloaders=unsized, val_dataloaders=data.val_dataloader())


def test_callback_names_the_missing_metric_and_what_was_logged(fashion_mnist_dir: Path) -> None:
    with pytest.raises(MetricNotReportedError, match=r"'val_acc'.*\['train_loss', 'val_error'\]"):
        _fit(fashion_mnist_dir, TuneReportCallback("val_acc", "max", report=_Sink()), max_epochs=1,
             config={"log_metrics": False})  # fmt: skip


def test_callback_stops_at_target(fashion_mnist_dir: Path) -> None:
    sink = _Sink()
    obj = TimeToTargetObjective(metric="val_acc", target=0.5)
    trainer = _fit(fashion_mnist_dir, TuneReportCallback("", objective=obj, report=sink), max_epochs=5)
    last = sink.reports[-1]
    assert last["reached_target"] == 1 and last["val_acc"] >= 0.5
    assert all(r["reached_target"] == 0 and r["val_acc"] < 0.5 for r in sink.reports[:-1])
    assert last["time_to_target_s"] == last["fit_time_s"]
    assert trainer.current_epoch < 5 and len(sink.reports) < 5


def test_callback_state_resumes_exactly(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    """Interrupted after epoch 1 and resumed, the callback reports and checkpoints as an uninterrupted run."""
    config = {"shuffle": False}  # the data order must not depend on the RNG state at the restart
    cb = lambda sink: TuneReportCallback("val_acc", "max", report=sink)  # noqa: E731
    full = _Sink()
    _fit(fashion_mnist_dir, cb(full), max_epochs=2, lr=0.1, config=config)
    # The premise: epoch 2 does not beat epoch 1, so only the restored best keeps it from being saved.
    assert full.checkpointed == [True, False], "premise changed: pick an lr where epoch 2 does not improve"

    torch.manual_seed(0)
    part = _Sink()
    trainer = _fit(fashion_mnist_dir, cb(part), max_epochs=1, lr=0.1, config=config)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    module, data = build_mlp(
        {"lr": 0.1, "data_dir": str(fashion_mnist_dir), "n_train": 1024, "n_val": 512, **config}
    )
    resumed = L.Trainer(
        max_epochs=2, callbacks=[cb(part)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    resumed.fit(module, datamodule=data, ckpt_path=tmp_path / "mid.ckpt")

    keys = ("val_loss", "val_acc", "epoch", "step")
    assert [[r[k] for k in keys] for r in part.reports] == [[r[k] for k in keys] for r in full.reports]
    assert part.checkpointed == full.checkpointed
    assert part.reports[1]["fit_time_s"] >= part.reports[0]["fit_time_s"]


# ---------------------------------------------------------------- searchers, driven as Tune drives them


def _drive(searcher_name: str, seed: int, n: int = 7) -> list[float]:
    """Ask ``n`` suggestions one at a time, reporting a smooth objective peaked at lr = 10**-2.5."""
    searcher = make_searcher(searcher_name, seed=seed, n_initial=3, max_concurrent=1)
    space = {"lr": tune.loguniform(1e-5, 1.0)}
    assert searcher.set_search_properties("score", "max", space)
    suggested = []
    for i in range(n):
        config = searcher.suggest(f"t{i}")
        lr = config["lr"]
        suggested.append(lr)
        searcher.on_trial_complete(
            f"t{i}", {"score": -((math.log10(lr) + 2.5) ** 2), "training_iteration": 1}
        )
    return suggested


@pytest.mark.parametrize("searcher", ["bayes", "tpe"])
def test_model_based_searchers_are_reproducible(searcher: str) -> None:
    a, b, c = _drive(searcher, seed=0), _drive(searcher, seed=0), _drive(searcher, seed=1)
    assert a == b and a != c
    if searcher == "bayes":
        # After 3 random points the Gaussian process proposes the optimum (within 0.05 decades) within
        # 4 suggestions; the random points are all further than 0.2 decades away.
        for lrs in (a, c):
            assert min(abs(math.log10(lr) + 2.5) for lr in lrs[:3]) > 0.2
            assert min(abs(math.log10(lr) + 2.5) for lr in lrs[3:]) < 0.05


def _noop_trainable(config: dict[str, Any]) -> None:
    pass


def test_random_searcher_is_seeded_and_limits_concurrency(tmp_path: Path) -> None:
    tune.register_trainable("lightning_speedup_unit_noop", _noop_trainable)
    spec = {
        "run": "lightning_speedup_unit_noop",
        "config": {"lr": tune.loguniform(1e-5, 1.0)},
        "num_samples": 3,
        "storage_path": str(tmp_path),  # Ray's default would be ~/ray_results
    }
    drawn = []
    for seed in (0, 0, 1):
        generator = make_searcher("random", seed=seed, n_initial=1, max_concurrent=2)
        generator.add_configurations({"run": spec})
        trials = [generator.next_trial() for _ in range(3)]
        # Ray ignores TuneConfig.max_concurrent_trials for this generator, so it must hold the third back.
        assert trials[2] is None
        drawn.append([t.config["lr"] for t in trials[:2]])
    assert drawn[0] == drawn[1] and drawn[0] != drawn[2]


# ---------------------------------------------------------------- what a trial builds


def test_build_may_return_per_trial_callbacks(fashion_mnist_dir: Path) -> None:
    from lightning.pytorch.callbacks import LearningRateMonitor

    module, data = build_mlp({"lr": 1e-3, "data_dir": str(fashion_mnist_dir), "n_train": 256, "n_val": 256})
    extra = LearningRateMonitor()
    assert check_built((module, data)) == (module, data, [])
    assert check_built((module, data, [extra])) == (module, data, [extra])
    with pytest.raises(TypeError, match="must return \\(LightningModule, LightningDataModule\\)"):
        check_built(module)
    with pytest.raises(
        TypeError, match=r"build\(config\)\[1\] must be a LightningDataModule, got DataLoader"
    ):
        check_built((module, data.train_dataloader()))
    with pytest.raises(TypeError, match=r"build\(config\)\[2\] must hold Lightning Callbacks, got str"):
        check_built((module, data, ["OneCycle"]))


def test_trial_trainer_gets_placement_defaults_and_every_callback(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelSummary

    user_cb, trial_cb = ModelSummary(), EarlyStopping("val_acc", mode="max")
    report = TuneReportCallback("val_acc", "max", report=_Sink())
    kwargs = {"max_epochs": 2, "callbacks": [user_cb], "enable_progress_bar": True}
    trainer = make_trainer(kwargs, [trial_cb], report, gpus=0, root_dir=str(tmp_path))
    assert (
        trainer.max_epochs == 2
        and trainer.num_devices == 1
        and trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    )
    assert trainer.logger is None and trainer.checkpoint_callback is None  # quiet, light defaults
    assert trainer.progress_bar_callback is not None  # ... that the user's arguments override
    names = [type(cb) for cb in trainer.callbacks]
    assert names.index(ModelSummary) < names.index(EarlyStopping) < names.index(TuneReportCallback)
    assert trainer.default_root_dir == str(tmp_path)
    assert kwargs["callbacks"] == [user_cb]  # the caller's dict is not consumed


def test_one_callback_in_trainer_kwargs_is_taken_as_lightning_takes_it(tmp_path: Path) -> None:
    stop = EarlyStopping("val_acc", mode="max")
    checked = check_trainer_kwargs({"max_epochs": 1, "callbacks": stop}, gpus=0)
    assert checked["callbacks"] == [stop]
    report = TuneReportCallback("val_acc", "max", report=_Sink())
    trainer = make_trainer({"callbacks": stop}, [], report, gpus=0, root_dir=str(tmp_path))
    assert [type(cb) for cb in trainer.callbacks[-2:]] == [EarlyStopping, TuneReportCallback]
    tensors = (torch.zeros(4, 784), torch.zeros(4, dtype=torch.long)) * 2
    extra = EarlyStopping("val_loss")
    assert check_built((TinyMLP(), TensorDataModule(tensors), extra))[2] == [extra]  # build's too


@pytest.mark.parametrize("where", ["trainer_kwargs", "build"])
def test_a_model_checkpoint_of_the_user_turns_lightning_checkpointing_on(tmp_path: Path, where: str) -> None:
    ckpt = ModelCheckpoint(monitor="val_acc", mode="max")
    report = TuneReportCallback("val_acc", "max", report=_Sink())
    kwargs: dict[str, Any] = {"callbacks": [ckpt]} if where == "trainer_kwargs" else {}
    trainer = make_trainer(kwargs, [ckpt] if where == "build" else [], report, gpus=0, root_dir=str(tmp_path))
    assert isinstance(trainer.checkpoint_callback, ModelCheckpoint)  # a copy of trainer_kwargs' one
    assert trainer.checkpoint_callback.monitor == "val_acc"
    assert trainer.progress_bar_callback is None and trainer.logger is None  # the other defaults stay


def test_placements_are_accepted_when_lightning_reads_them_as_the_trials_own() -> None:
    same = [({"accelerator": "cuda"}, 0.5), ({"accelerator": "GPU"}, 1), ({"accelerator": "auto", "devices": "auto"}, 0),
            ({"devices": "1"}, 0), ({"devices": [0]}, 0.25), ({"devices": "0,"}, 1),
            ({"accelerator": "cpu", "devices": 1, "num_nodes": 1}, 0)]  # fmt: skip
    for kwargs, gpus in same:
        assert check_trainer_kwargs(kwargs, gpus) == kwargs, kwargs
    other = [({"accelerator": "gpu"}, 0), ({"accelerator": "cpu"}, 0.5), ({"devices": [0]}, 0), ({"devices": [1]}, 1),
             ({"devices": 2}, 1), ({"devices": True}, 0), ({"num_nodes": 2}, 0)]  # fmt: skip
    for kwargs, gpus in other:
        with pytest.raises(ValueError, match="disagrees with resources_per_trial"):
            check_trainer_kwargs(kwargs, gpus)


def test_search_space_constants_are_found_and_replaced() -> None:
    space = {"lr": tune.loguniform(1e-4, 1e-1), "data": {"dir": "/old", "bs": tune.choice([1, 2])},
             "opt": {"wd": tune.uniform(0, 1)}, "grid": tune.grid_search([1, 2]), "seed": 0}  # fmt: skip
    assert space_constants(space) == {"data": {"dir": "/old"}, "seed": 0}
    assert constant_paths(space) == ["data/dir", "seed"]
    config = {"lr": 1e-3, "data": {"dir": "/old", "bs": 2}, "opt": {"wd": 0.5}, "grid": 1, "seed": 0}
    moved = with_constants(config, {"data": {"dir": "/new"}, "seed": 0})
    assert moved == {**config, "data": {"dir": "/new", "bs": 2}}
    assert config["data"]["dir"] == "/old"  # the sampled config is not changed in place


def test_resume_settings_refuse_an_added_or_removed_constant_but_not_an_older_file(tmp_path: Path) -> None:
    _write_settings(tmp_path / "sweep", {"num_samples": 4, "constants": ["data_dir"]})
    _check_resume_settings(tmp_path / "sweep", {"num_samples": 4, "constants": ["data_dir"]})
    with pytest.raises(
        ValueError, match=r"constants: was \['data_dir'\], now \['data_dir', 'seed'\]\).*may change its value"
    ):
        _check_resume_settings(tmp_path / "sweep", {"num_samples": 4, "constants": ["data_dir", "seed"]})
    _write_settings(tmp_path / "old", {"num_samples": 4})  # saved before constants were recorded
    _check_resume_settings(tmp_path / "old", {"num_samples": 4, "constants": ["data_dir"]})


def test_settings_file_goes_through_a_file_uri(tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/sweep"
    _write_settings(uri, {"num_samples": 4})
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == [SETTINGS_FILE]
    _check_resume_settings(uri, {"num_samples": 4})
    with pytest.raises(ValueError, match="num_samples: was 4, now 5"):
        _check_resume_settings(uri, {"num_samples": 5})


def test_search_space_description_names_ranges_choices_and_grids_but_not_constants() -> None:
    space = {
        "lr": tune.qloguniform(1e-4, 1e-1, 1e-5),
        "opt": {"width": tune.choice([16, 32]), "depth": tune.grid_search([1, 2])},
        "data_dir": "/data",
    }
    assert describe_search_space(space) == {
        "lr": "float(0.0001, 0.1, Quantized(LogUniform, q=1e-05))",
        "opt/depth": "grid_search([1, 2])",
        "opt/width": "choice([16, 32], Uniform)",
    }
    assert describe_search_space({"lr": tune.loguniform(1e-4, 1e-1)}) != describe_search_space(
        {"lr": tune.uniform(1e-4, 1e-1)}
    )


def test_settings_file_is_written_atomically_and_a_corrupt_one_is_named(tmp_path: Path) -> None:
    _write_settings(tmp_path / "sweep", {"num_samples": 4})
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == [SETTINGS_FILE]
    _check_resume_settings(tmp_path / "sweep", {"num_samples": 4})
    with pytest.raises(ValueError, match="num_samples: was 4, now 5"):
        _check_resume_settings(tmp_path / "sweep", {"num_samples": 5})
    file = tmp_path / "sweep" / SETTINGS_FILE
    file.write_text('{"num_samples": ')
    with pytest.raises(
        ValueError, match=rf"{file} \(the settings the sweep was started with\) is not valid JSON"
    ):
        _check_resume_settings(tmp_path / "sweep", {"num_samples": 4})
    file.write_text("[1, 2]")
    with pytest.raises(ValueError, match="should hold a JSON object"):
        _check_resume_settings(tmp_path / "sweep", {"num_samples": 4})


def test_a_sweep_saved_before_the_objective_rename_still_resumes(tmp_path: Path) -> None:
    """Settings saved when the objective class was called ``TimeToTarget`` match today's equal objective."""
    objective = TimeToTargetObjective(metric="val_acc", target=0.9)
    old = {"objective": repr(objective).replace("TimeToTargetObjective(", "TimeToTarget(", 1), "seed": 0}
    assert old["objective"].startswith("TimeToTarget(metric='val_acc', target=0.9")
    _write_settings(tmp_path / "sweep", old)
    _check_resume_settings(tmp_path / "sweep", {"objective": repr(objective), "seed": 0})
    other = TimeToTargetObjective(metric="val_acc", target=0.8)
    with pytest.raises(
        ValueError, match=r"objective: was \"TimeToTargetObjective\(metric='val_acc', target=0.9"
    ):
        _check_resume_settings(tmp_path / "sweep", {"objective": repr(other), "seed": 0})
