"""``tune_lightning``: one call that runs a hyper-parameter sweep of a Lightning model on a Ray cluster.

Ray Tune (Liaw et al., 2018) runs the trials, on a local cluster (bound to localhost) or on the
cluster at ``address``; each trial is a function trainable (``ray.tune.Tuner`` with a function and
``ray.tune.report``, Ray's current API) that trains one Lightning ``Trainer`` on one device. Searchers,
the ASHA scheduler and the time-to-target objective are in their own modules; this one validates the
whole request before any trial starts, wires the parts together, and handles resume.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune import Callback as TuneCallback
from ray.tune import CheckpointConfig, FailureConfig, ResultGrid, ResumeConfig, RunConfig, TuneConfig
from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import Searcher

from lightning_speedup._validation import check_int
from lightning_speedup.tune.callback import VALIDATION_KEY, MetricNotReportedError, NoValidationError
from lightning_speedup.tune.cluster import check_resources, init_ray, normalize_resources, trial_slots
from lightning_speedup.tune.objective import TimeToTargetObjective
from lightning_speedup.tune.results import TuneResults
from lightning_speedup.tune.searchers import (
    check_scheduler,
    check_searcher,
    check_searcher_dependencies,
    check_searcher_settings,
    default_concurrency,
    default_n_initial,
    has_step_budget,
    make_scheduler,
    make_searcher,
)
from lightning_speedup.tune.space import (
    constant_paths,
    describe_search_space,
    grid_paths,
    grid_size,
    space_constants,
    validate_search_space,
)
from lightning_speedup.tune.trial import Build, check_trainer_kwargs, run_trial

log = logging.getLogger(__name__)

SETTINGS_FILE = "tune_lightning.json"
_SNAPSHOT_WARN_ENV = "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"
DEFAULT_STORAGE = "~/ray_results"

# The MetricNotReportedError that ended a sweep, by experiment path. A module global rather than state on
# the monitor callback: Ray pickles run callbacks into the sweep's state and restores copies on resume.
_ABORTS: dict[str, MetricNotReportedError] = {}
_ABORTS_LOCK = threading.Lock()
# The trials that started and have not ended (finished, stopped or failed) in this run of a sweep, by
# experiment path (a module global for the same reason): once the sweep returns, those an interrupt stopped.
_RUNNING: dict[str, set[str]] = {}


class SweepAbortedError(RuntimeError):
    """Raised inside Ray's controller to end a sweep that cannot succeed (the cause is re-raised)."""


class _SweepMonitor(TuneCallback):
    """Ends the sweep at the first trial that did not log the tuned metric: every other trial would too.
    A trial that never validated ends it too while no trial has reported; once one has, only that trial
    fails (its configuration kept it from validating, e.g. a ``max_time`` it could not validate within).

    Also keeps the trials that run: Ray calls ``on_trial_complete`` when a trial's function returns or the
    scheduler stops it, but not for the trials it stops when the sweep is interrupted (Ctrl+C), which it
    marks ``TERMINATED`` like the others (checked against Ray 2.60).
    """

    def __init__(self, experiment_path: str) -> None:
        self.experiment_path = experiment_path

    def _ended(self, trial: Any) -> None:
        with _ABORTS_LOCK:
            _RUNNING.setdefault(self.experiment_path, set()).discard(str(trial.trial_id))

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        with _ABORTS_LOCK:
            _RUNNING.setdefault(self.experiment_path, set()).add(str(trial.trial_id))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._ended(trial)
        cause = getattr(_trial_exception(trial), "cause", None)
        if not isinstance(cause, MetricNotReportedError):
            return
        if isinstance(cause, NoValidationError) and any(_has_reported(t) for t in trials if t is not trial):
            return
        with _ABORTS_LOCK:
            _ABORTS[self.experiment_path] = cause
        raise SweepAbortedError(str(cause))


def _has_reported(trial: Any) -> bool:
    """Whether a trial has reported a validation (read from what Ray stored, without asking its actor)."""
    return VALIDATION_KEY in (getattr(getattr(trial, "run_metadata", None), "last_result", None) or {})


def _trial_exception(trial: Any) -> BaseException | None:
    """The exception a failed trial raised (a ``RayTaskError`` whose ``cause`` is the original).

    Read from the trial's local error file: at ``on_trial_error`` time Ray has written it there but not
    yet synced it to the storage that ``Trial.get_pickled_error`` reads (checked against Ray 2.60).
    """
    from ray import cloudpickle

    path = getattr(trial, "pickled_error_file", None)
    if not path or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        error = cloudpickle.load(f)
    return error if isinstance(error, BaseException) else None


def _is_uri(path: str) -> bool:
    return "://" in path


def _describe(part: Any) -> str | None:
    return part if part is None or isinstance(part, str) else type(part).__name__


def _settings_fs(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """The pyarrow filesystem and path of a sweep's folder, a local path or a URI (``s3://``,
    ``file://``, ...): the filesystem Ray's storage uses for the same ``storage_path``."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(str(path))


def _write_settings(path: str | os.PathLike[str], settings: dict[str, Any]) -> None:
    """Write the settings file atomically: an interrupted write leaves the old file or none, never half
    (on local disk; an object store writes each object whole)."""
    fs, folder = _settings_fs(path)
    fs.create_dir(folder, recursive=True)
    tmp = f"{folder}/.{SETTINGS_FILE}.{os.getpid()}.tmp"
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(settings, indent=1).encode())
    fs.move(tmp, f"{folder}/{SETTINGS_FILE}")


# The objective's class was called ``TimeToTarget`` before it was renamed; a sweep saved then stores
# that name in its repr, which is otherwise the same objective.
_OLD_OBJECTIVE_PREFIX = "TimeToTarget("


def _upgrade_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """Settings saved by an older version, in today's form (so that an unchanged sweep still resumes)."""
    objective = saved.get("objective")
    if isinstance(objective, str) and objective.startswith(_OLD_OBJECTIVE_PREFIX):
        renamed = f"{TimeToTargetObjective.__name__}({objective.removeprefix(_OLD_OBJECTIVE_PREFIX)}"
        return {**saved, "objective": renamed}
    return saved


# Settings added after sweeps were saved without them: such a saved file is not compared on them.
_LATER_SETTINGS = ("constants",)


def _check_resume_settings(path: str | os.PathLike[str], settings: dict[str, Any]) -> None:
    import pyarrow.fs

    file = f"{str(path).rstrip('/')}/{SETTINGS_FILE}"
    fs, fs_file = _settings_fs(file)
    if fs.get_file_info(fs_file).type == pyarrow.fs.FileType.NotFound:
        return
    try:
        with fs.open_input_stream(fs_file) as f:
            saved = json.loads(f.read().decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"resume=True: {file} (the settings the sweep was started with) is not valid JSON ({err}). "
            "Restore it, or start a new sweep under another name."
        ) from err
    if not isinstance(saved, dict):
        raise ValueError(
            f"resume=True: {file} should hold a JSON object of the sweep's settings, got "
            f"{type(saved).__name__}. Restore it, or start a new sweep under another name."
        )
    saved = _upgrade_settings(saved)
    diff = {
        k: (saved.get(k), v)
        for k, v in settings.items()
        if saved.get(k) != v and not (k in _LATER_SETTINGS and k not in saved)
    }
    if diff:
        lines = "; ".join(f"{k}: was {old!r}, now {new!r}" for k, (old, new) in diff.items())
        hint = (
            " A constant of the search space may change its value on resume, but not be added or removed: "
            "Ray restores the sweep with the parameters it was started with."
            if "constants" in diff
            else ""
        )
        raise ValueError(
            f"resume=True: the sweep at {path} was started with other settings ({lines}).{hint} Resume it "
            "with the settings it was started with, or start a new sweep under another name."
        )


def tune_lightning(
    build: Build,
    search_space: Mapping[str, Any],
    metric: str | None = None,
    mode: str | None = None,
    num_samples: int = 16,
    *,
    searcher: str | Searcher = "bayes",
    scheduler: str | TrialScheduler | None = "asha",
    resources_per_trial: Mapping[str, float] | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    objective: TimeToTargetObjective | None = None,
    storage_path: str | os.PathLike[str] | None = None,
    name: str | None = None,
    resume: bool = False,
    seed: int | None = None,
    max_concurrent: int | None = None,
    n_initial: int | None = None,
    address: str | None = None,
    checkpoint: bool = True,
    tune_callbacks: Sequence[TuneCallback] = (),
    verbose: int = 1,
) -> TuneResults:
    """Search ``search_space`` for the configuration whose Lightning training scores best.

    Example::

        from ray import tune
        from lightning_speedup.tune import tune_lightning

        def build(config):
            return MyModule(lr=config["lr"]), MyData(batch_size=config["batch_size"])

        results = tune_lightning(
            build,
            {"lr": tune.loguniform(1e-4, 1e-1), "batch_size": tune.choice([128, 256, 512])},
            metric="val_acc", mode="max", num_samples=32,
            resources_per_trial={"cpu": 2, "gpu": 0.25}, trainer_kwargs={"max_epochs": 10},
        )
        results.best_config; results.dataframe(); results.plot()

    Args:
        build: ``build(config) -> (LightningModule, LightningDataModule)``, called inside each trial
            with a sampled configuration; it may return a third element, a list of per-trial Lightning
            callbacks (e.g. ``[OneCycle(max_lr=config["max_lr"])]``). Runs on a Ray worker, so it must
            be picklable (a function defined in a notebook or script is).
        search_space: Ray Tune search space (see :mod:`lightning_speedup.tune.space`); constants are
            passed to ``build`` unchanged. On resume a constant may change its value (e.g. a moved data
            path: trials that run after the resume get the new value) but not be added or removed.
        metric: the logged validation metric to optimise (e.g. ``"val_acc"``). Leave out with ``objective``.
        mode: ``"max"`` or ``"min"``. Leave out with ``objective``.
        num_samples: number of trials.
        searcher: ``"bayes"`` (Gaussian-process BO, default), ``"tpe"``, ``"random"``, or a Ray ``Searcher``.
        scheduler: ``"asha"`` (stop weak trials early, default), ``None`` (run all to the end), or a Ray
            ``TrialScheduler``. ``"asha"`` places its rungs on the fraction of a trial's step budget done
            (1/16, 1/4), so it needs ``trainer_kwargs["max_epochs"]`` or ``["max_steps"]``.
        resources_per_trial: e.g. ``{"cpu": 2, "gpu": 0.25}`` (default ``{"cpu": 1}``). A fraction of a
            GPU shares one GPU between trials; a trial never spans several devices.
        trainer_kwargs: arguments of ``lightning.Trainer`` for every trial (not ``accelerator``,
            ``devices``, ``num_nodes``: the resources decide those; nor a strategy that starts processes,
            such as ``"ddp_spawn"``). Trials default to no logger, no progress bar, no model summary and
            no Lightning checkpoints; a ``ModelCheckpoint`` in ``callbacks`` (one Callback or a list)
            turns checkpointing on, a ``LearningRateMonitor`` or ``DeviceStatsMonitor`` Lightning's
            default logger (in the trial's folder).
        objective: :class:`TimeToTargetObjective` to tune for the fastest time to a quality target instead.
        storage_path: where sweeps are stored (default ``~/ray_results``; a URI such as ``s3://...`` or
            ``file://...`` works too, settings check included). The sweep lives in ``storage_path/name``.
        name: the sweep's name (default: ``tune_lightning_<date>-<time>``); needed to resume.
        resume: continue the sweep ``storage_path/name``: finished trials are kept, trials that were
            running restart from their first epoch with the same configuration, the rest run. When
            there is nothing to resume, a new sweep starts (logged).
        seed: seeds the searcher and every trial (all trials start from the same weights and data order).
        max_concurrent: trials run at once (default: see ``searchers.default_concurrency``).
        n_initial: random trials before ``"bayes"``/``"tpe"`` model anything (default ``num_samples // 4``
            clipped to 2..10).
        address: Ray cluster to join (``"ray://host:10001"``, ``"host:6379"``); default: the one this
            process is connected to, ``RAY_ADDRESS``, or a new local cluster. While this process is
            connected to another cluster, an error says to call ``ray.shutdown()`` first.
        checkpoint: keep each trial's best weights (weights-only, one per trial).
        tune_callbacks: extra ``ray.tune.Callback`` objects (loggers, ...). Ray stores them with the
            sweep: a resumed sweep uses those it was started with.
        verbose: Ray Tune's verbosity (0 silent but for warnings and errors, 1 experiment summary and
            progress, 2 trial results). A local cluster started by this call forwards the trials' own
            output only with ``verbose=2``.

    Returns:
        :class:`TuneResults` with ``best_config``, ``best_metric``, ``dataframe()``, ``plot()``.

    Raises:
        ValueError: unknown searcher or scheduler; an empty or malformed search space (a grid with a
            ``Searcher`` instance); metric/mode missing or given together with ``objective``; bad counts,
            seed or trainer arguments (including a process-starting strategy, or arguments with which no
            validation runs); a sweep of this name exists and ``resume`` is False; resumed settings differ
            from the saved ones (a constant of the search space added or removed included); ``address``
            names another cluster than the one this process is connected to.
        InsufficientResourcesError: no node of the cluster can host ``resources_per_trial``.
        MetricNotReportedError: the first trial finished a validation without logging the tuned
            metric (the message lists the metrics it did log); the sweep stops there. Its subclass
            ``NoValidationError``: a trial finished training without any validation before any trial
            reported (the message names likely causes); the sweep stops there too.
        RuntimeError: every trial failed (the first failure is chained).
    """
    request = _validate_request(
        build, search_space, metric, mode, num_samples, searcher=searcher, scheduler=scheduler,
        resources_per_trial=resources_per_trial, trainer_kwargs=trainer_kwargs, objective=objective,
        storage_path=storage_path, name=name, resume=resume, seed=seed, max_concurrent=max_concurrent,
        n_initial=n_initial, address=address, checkpoint=checkpoint, tune_callbacks=tune_callbacks,
        verbose=verbose,
    )  # fmt: skip
    tuner = _build_tuner(request)
    return _collect_results(request, *_fit(tuner, request))


@dataclass(frozen=True)
class _SweepRequest:
    """A validated ``tune_lightning`` request: everything the sweep needs, checked before any cluster."""

    build: Build
    search_space: Mapping[str, Any]
    searched: list[str]
    metric: str  # the key the sweep optimises (``objective.key`` with an objective)
    mode: str
    objective: TimeToTargetObjective | None
    num_samples: int
    searcher: str | Searcher
    searcher_name: str
    scheduler: str | TrialScheduler | None
    scheduler_obj: TrialScheduler | None
    resources: dict[str, float]
    trainer_kwargs: dict[str, Any]
    storage: str
    name: str
    resume: bool
    seed: int | None
    max_concurrent: int | None
    n_initial: int | None
    address: str | None
    checkpoint: bool
    tune_callbacks: tuple[TuneCallback, ...]
    verbose: int

    @property
    def experiment_path(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    def settings(self) -> dict[str, Any]:
        """What a resumed sweep must agree on with the sweep it continues (JSON-able)."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "num_samples": self.num_samples,
            "searcher": _describe(self.searcher),
            "scheduler": _describe(self.scheduler),
            "seed": self.seed,
            "objective": repr(self.objective),
            "searched": sorted(self.searched),
            "search_space": describe_search_space(self.search_space),
            # Their names only: a constant's value may change on resume (run_trial passes the current ones).
            "constants": constant_paths(self.search_space),
            "max_epochs": self.trainer_kwargs.get("max_epochs"),
            "max_steps": self.trainer_kwargs.get("max_steps"),
            "resources": dict(self.resources),
        }


def _validate_request(
    build: Build,
    search_space: Mapping[str, Any],
    metric: str | None,
    mode: str | None,
    num_samples: int,
    *,
    searcher: str | Searcher,
    scheduler: str | TrialScheduler | None,
    resources_per_trial: Mapping[str, float] | None,
    trainer_kwargs: Mapping[str, Any] | None,
    objective: TimeToTargetObjective | None,
    storage_path: str | os.PathLike[str] | None,
    name: str | None,
    resume: bool,
    seed: int | None,
    max_concurrent: int | None,
    n_initial: int | None,
    address: str | None,
    checkpoint: bool,
    tune_callbacks: Sequence[TuneCallback],
    verbose: int,
) -> _SweepRequest:
    """Check everything that needs no cluster (the errors ``tune_lightning`` documents) and fill defaults."""
    if not callable(build):
        raise TypeError(
            f"build must be a function config -> (LightningModule, LightningDataModule), got {build!r}."
        )
    check_searcher(searcher)
    check_searcher_dependencies(searcher)
    check_scheduler(scheduler)
    searcher_name = searcher if isinstance(searcher, str) else "random"
    searched = validate_search_space(search_space, searcher_name)
    grids = grid_paths(search_space)
    if isinstance(searcher, Searcher) and grids:
        raise ValueError(
            f"search_space[{grids[0]!r}] is tune.grid_search, which a Searcher instance "
            f"({type(searcher).__name__}) cannot run: Ray runs grids only with its random search. Use "
            "tune.choice([...]) with the Searcher, or searcher='random' for a grid."
        )
    if objective is not None:
        if not isinstance(objective, TimeToTargetObjective):
            raise TypeError(f"objective must be a TimeToTargetObjective(...) or None, got {objective!r}.")
        if metric is not None or mode is not None:
            raise ValueError(
                f"objective={objective!r} decides what the sweep optimises (minimise "
                f"{TimeToTargetObjective.key!r}); leave metric and mode out. The quality metric is "
                f"objective.metric={objective.metric!r}."
            )
        tuned_metric, tuned_mode = TimeToTargetObjective.key, "min"
    else:
        if not isinstance(metric, str) or not metric:
            raise ValueError(
                f"metric must name a logged validation metric such as 'val_acc', got {metric!r}."
            )
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min' for metric {metric!r}, got {mode!r}.")
        tuned_metric, tuned_mode = metric, mode
    check_int("num_samples", num_samples, 1)
    check_int("max_concurrent", max_concurrent, 1, allow_none=True)
    check_int("n_initial", n_initial, 1, allow_none=True)
    check_int("seed", seed, 0, allow_none=True)
    check_int("verbose", verbose, 0)
    check_searcher_settings(searcher, num_samples, n_initial, seed, max_concurrent)
    request = normalize_resources(resources_per_trial)
    checked_kwargs = check_trainer_kwargs(trainer_kwargs, request["GPU"])
    if objective is not None and not has_step_budget(checked_kwargs):
        # A trial that misses the target would train for ever (max_epochs=-1), and its penalty is
        # projected from the fraction of its step budget done.
        raise ValueError(
            "objective=TimeToTargetObjective needs a finite step budget, to end a trial that misses the "
            "target and to project its full run time: set trainer_kwargs['max_epochs'] or "
            "trainer_kwargs['max_steps'] to a positive int (got max_epochs="
            f"{checked_kwargs.get('max_epochs')!r}, max_steps={checked_kwargs.get('max_steps')!r}; -1 is "
            "Lightning's 'no limit')."
        )
    scheduler_obj = make_scheduler(scheduler, checked_kwargs)
    if name is not None and (not isinstance(name, str) or not name or "/" in name or name in (".", "..")):
        raise ValueError(f"name must be a plain directory name (no '/'), got {name!r}.")
    if resume and name is None:
        raise ValueError(
            "resume=True needs the name of the sweep to resume (and its storage_path if not the default); "
            "the results of the earlier call show it as results.path."
        )
    for cb in tune_callbacks:
        if not isinstance(cb, TuneCallback):
            raise TypeError(f"tune_callbacks must hold ray.tune.Callback objects, got {cb!r}.")

    storage = str(storage_path) if storage_path is not None else DEFAULT_STORAGE
    if not _is_uri(storage):
        storage = str(Path(storage).expanduser().resolve())
    return _SweepRequest(
        build=build,
        search_space=search_space,
        searched=searched,
        metric=tuned_metric,
        mode=tuned_mode,
        objective=objective,
        num_samples=num_samples,
        searcher=searcher,
        searcher_name=searcher_name,
        scheduler=scheduler,
        scheduler_obj=scheduler_obj,
        resources=request,
        trainer_kwargs=checked_kwargs,
        storage=storage,
        name=name or time.strftime("tune_lightning_%Y%m%d-%H%M%S"),
        resume=resume,
        seed=seed,
        max_concurrent=max_concurrent,
        n_initial=n_initial,
        address=address,
        checkpoint=checkpoint,
        tune_callbacks=tuple(tune_callbacks),
        verbose=verbose,
    )


def _build_tuner(req: _SweepRequest) -> tune.Tuner:
    """Connect to the cluster, check it can host a trial, and make a new ``Tuner`` or restore the saved one."""
    # A cluster started here forwards the trials' output (prints, Lightning's messages) only at
    # verbose=2; it is always in the Ray session's logs.
    init_ray(req.address, log_to_driver=req.verbose >= 2)
    request = req.resources
    check_resources(request)
    slots = trial_slots(request)
    concurrency = req.max_concurrent or default_concurrency(req.searcher_name, req.num_samples, slots)
    n_init = req.n_initial or default_n_initial(req.num_samples)
    custom = {k: v for k, v in request.items() if k not in ("CPU", "GPU") and v > 0}
    bundle = {"CPU": request["CPU"], **({"GPU": request["GPU"]} if request["GPU"] > 0 else {}), **custom}
    trainable = tune.with_resources(
        tune.with_parameters(
            run_trial,
            build=req.build,
            trainer_kwargs=req.trainer_kwargs,
            metric=req.metric if req.objective is None else req.objective.metric,
            mode=req.mode,
            objective=req.objective,
            checkpoint=req.checkpoint,
            seed=req.seed,
            cpus=request["CPU"],
            gpus=request["GPU"],
            # This call's constants: a resumed sweep's trials come back from Ray with the old ones.
            constants=space_constants(req.search_space),
            require_budget=req.scheduler == "asha",
        ),
        PlacementGroupFactory([bundle]),
    )

    experiment_path = req.experiment_path
    exists = tune.Tuner.can_restore(experiment_path)
    if exists and not req.resume:
        raise ValueError(
            f"A sweep named {req.name!r} already exists at {experiment_path}. Pass resume=True to continue "
            "it, or choose another name."
        )
    with _ABORTS_LOCK:
        _ABORTS.pop(experiment_path, None)
        _RUNNING.pop(experiment_path, None)
    if exists:
        _check_resume_settings(experiment_path, req.settings())
        tuner = _restore(experiment_path, trainable, req.search_space)
        log.info("Resuming the sweep at %s.", experiment_path)
        return tuner
    if req.resume:
        log.warning("resume=True but there is no sweep at %s yet; starting a new one.", experiment_path)
    _write_settings(experiment_path, req.settings())
    return tune.Tuner(
        trainable,
        param_space=dict(req.search_space),
        tune_config=TuneConfig(
            metric=req.metric,
            mode=req.mode,
            search_alg=make_searcher(req.searcher, req.seed, n_init, concurrency),
            scheduler=req.scheduler_obj,
            num_samples=req.num_samples,
            trial_dirname_creator=_trial_dirname,
            # One Ray worker per concurrent trial, reused: torch and Lightning are imported once.
            reuse_actors=True,
        ),
        run_config=RunConfig(
            name=req.name,
            storage_path=req.storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=1 if req.checkpoint else None,
                checkpoint_score_attribute=req.metric,
                checkpoint_score_order=req.mode,
            ),
            failure_config=FailureConfig(max_failures=0),
            callbacks=[_SweepMonitor(experiment_path), *req.tune_callbacks],
            verbose=req.verbose,
        ),
    )


def _fit(tuner: tune.Tuner, req: _SweepRequest) -> tuple[ResultGrid, set[str]]:
    """Run the sweep; return its grid and the trials an interruption stopped while they ran. A trial that
    did not log the tuned metric ends it with ``MetricNotReportedError`` (``NoValidationError`` for one
    that never validated, while no trial has reported)."""
    experiment_path = req.experiment_path
    try:
        with _quiet_forced_snapshots(), _quiet_ray(req.verbose):
            grid = tuner.fit()
    except Exception:
        with _ABORTS_LOCK:
            aborted = _ABORTS.pop(experiment_path, None)
            _RUNNING.pop(experiment_path, None)
        if aborted is not None:
            raise type(aborted)(str(aborted)) from None
        raise
    with _ABORTS_LOCK:
        aborted = _ABORTS.pop(experiment_path, None)
        interrupted = _RUNNING.pop(experiment_path, set())
    if aborted is not None:
        raise type(aborted)(str(aborted))
    return grid, interrupted


def _collect_results(req: _SweepRequest, grid: ResultGrid, interrupted: set[str]) -> TuneResults:
    """Wrap the finished grid; raise if every trial failed, warn about failures and an unfinished sweep."""
    expected = req.num_samples * grid_size(req.search_space)
    results = TuneResults(
        result_grid=grid,
        metric=req.metric,
        mode=req.mode,
        num_trials=expected,
        searched=req.searched,
        objective=req.objective,
        path=req.experiment_path,
        interrupted=interrupted,
    )
    errors = results.errors
    if errors and len(errors) == len(grid):
        raise RuntimeError(
            f"All {len(grid)} trials of the sweep at {req.experiment_path} failed; the first error follows."
        ) from errors[0]
    if errors:
        log.warning("%d of %d trials failed; see results.dataframe()['error'].", len(errors), len(grid))
    if not results.complete:
        log.warning(
            "The sweep stopped before its %d trials finished (%d did). Continue it with "
            "tune_lightning(..., storage_path=%r, name=%r, resume=True).",
            expected, results.num_ended, req.storage, req.name,
        )  # fmt: skip
    return results


def _trial_dirname(trial: Any) -> str:
    # Ray's default names a trial's folder after its whole config, paths and all.
    return f"trial_{trial.trial_id}"


@contextmanager
def _quiet_forced_snapshots() -> Iterator[None]:
    """Silence Ray's warning about experiment snapshots forced by ``num_to_keep``.

    Keeping one (the best) checkpoint per trial makes Ray snapshot the sweep's state whenever a trial
    improves, which is what makes an interrupted sweep resumable; on local disk it costs milliseconds.
    """
    old = os.environ.get(_SNAPSHOT_WARN_ENV)
    os.environ[_SNAPSHOT_WARN_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(_SNAPSHOT_WARN_ENV, None)
        else:
            os.environ[_SNAPSHOT_WARN_ENV] = old


_NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"


@contextmanager
def _quiet_ray(verbose: int) -> Iterator[None]:
    """At ``verbose=0``, keep Ray Tune from printing anything but warnings and errors.

    Ray's current output engine prints the experiment's header and path whatever the verbosity; its
    legacy engine (``RAY_AIR_NEW_OUTPUT=0``, read when the sweep starts) prints nothing at 0. Ray Tune's
    INFO log lines (the final sync, a resume) are held back too. Checked against Ray 2.60.
    """
    if verbose > 0:
        yield
        return
    old = os.environ.get(_NEW_OUTPUT_ENV)
    tune_log = logging.getLogger("ray.tune")
    old_level = tune_log.level
    os.environ[_NEW_OUTPUT_ENV] = "0"
    tune_log.setLevel(max(logging.WARNING, old_level))
    try:
        yield
    finally:
        tune_log.setLevel(old_level)
        if old is None:
            os.environ.pop(_NEW_OUTPUT_ENV, None)
        else:
            os.environ[_NEW_OUTPUT_ENV] = old


def _restore(path: str, trainable: Callable[..., Any], search_space: Mapping[str, Any]) -> tune.Tuner:
    """Ray's restore: finished and errored trials kept, unfinished ones run again under their own id.

    Ray's ``RESTART`` would rerun an unfinished trial under a new trial id, which the searcher restored
    with the sweep never suggested: Optuna raises ``KeyError`` at its first result and the random
    searcher waits for the old id for ever. ``RESUME`` keeps the id; ``run_trial`` never reads a Ray
    checkpoint (a trial keeps only its best weights, no optimizer state), so the trial starts from its
    first epoch with the same configuration. ``_resume_config`` is Ray's (developer) API for this
    per-status choice; checked against Ray 2.60.
    """
    return tune.Tuner.restore(
        path,
        trainable=trainable,
        param_space=dict(search_space),
        _resume_config=ResumeConfig(
            finished=ResumeConfig.ResumeType.SKIP,
            unfinished=ResumeConfig.ResumeType.RESUME,
            errored=ResumeConfig.ResumeType.SKIP,
        ),
    )
