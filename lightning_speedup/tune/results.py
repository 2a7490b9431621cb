"""What a sweep returns: the best configuration, one row per trial, every report, and two plots.

Built from Ray Tune's ``ResultGrid`` (kept as ``result_grid`` for anything not covered here). The best
trial is the one with the best value of the tuned metric in *any* of its reports (a trial that ASHA
stopped early still counts with what it reached); with a :class:`TimeToTargetObjective` objective, only trials
that reached the target compete on time, and the penalised score ranks the rest only when none did.

Trials are kept in the order the sweep created them, read from what Ray stores with each trial, never
from the order of the ``ResultGrid``: Ray lists a restored sweep's trials by their last report, newest
first, so its order changes when a sweep is resumed. Ties in the tuned metric are common (an accuracy
on 1024 images takes only 1025 values) and go to the earliest trial, so a resumed sweep, finished or
not, names the same best trial as the run that recorded it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
from ray.tune import Checkpoint, ResultGrid

from lightning_speedup.tune.callback import CHECKPOINT_FILE, VALIDATION_KEY
from lightning_speedup.tune.objective import TimeToTargetObjective

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

# Columns Ray adds to every report; history() keeps the useful ones, dataframe() none of them.
_RAY_KEYS = {
    "timestamp", "checkpoint_dir_name", "should_checkpoint", "done", "date", "hostname", "node_ip",
    "pid", "time_since_restore", "iterations_since_restore", "time_this_iter_s",
}  # fmt: skip


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _grid_trials(grid: ResultGrid) -> list[Any]:
    """Ray's ``Trial`` objects behind a ``ResultGrid``.

    Ray's ``ResultGrid`` exposes neither trial states nor creation order; both are read from its
    ``ExperimentAnalysis`` (private attribute, checked against Ray 2.60).
    """
    analysis = getattr(grid, "_experiment_analysis", None)
    return list(getattr(analysis, "trials", None) or [])


def _trial_statuses(grid: ResultGrid, interrupted: Collection[str] = ()) -> dict[str, str]:
    """Each trial's state: ``finished`` (ran to its end or was stopped by the scheduler or the
    objective), ``error``, or ``unfinished`` (pending or running when the sweep stopped).

    Ray marks a trial ``TERMINATED`` both when it ended and when an interrupted sweep (Ctrl+C) stopped it
    while it ran; ``interrupted`` names the second kind (the sweep's monitor saw them start and not end).
    """
    names = {"TERMINATED": "finished", "ERROR": "error"}
    return {
        t.trial_id: "unfinished" if t.trial_id in interrupted else names.get(t.status, "unfinished")
        for t in _grid_trials(grid)
    }


def _creation_index(experiment_tag: Any) -> int | None:
    """The number Ray's search algorithms give each new trial of a sweep, from its ``experiment_tag``.

    Both of Ray's trial generators (``SearchGenerator`` for Optuna and other searchers,
    ``BasicVariantGenerator`` for random and grid search) tag a trial ``"<counter>"`` or
    ``"<counter>_<sampled values>"`` from a per-sweep counter that is saved with the sweep and kept by
    resume; ``None`` for any other tag.
    """
    if not isinstance(experiment_tag, str):
        return None
    head = experiment_tag.split("_", 1)[0]
    return int(head) if head.isdigit() else None


def _creation_indices(grid: ResultGrid) -> dict[str, int]:
    """Trial id -> creation number, for the trials whose tag carries one."""
    out: dict[str, int] = {}
    for trial in _grid_trials(grid):
        index = _creation_index(getattr(trial, "experiment_tag", None))
        if index is not None:
            out[str(trial.trial_id)] = index
    return out


@dataclass
class TuneResults:
    """Results of :func:`~lightning_speedup.tune.tune_lightning`.

    Attributes:
        best_config: the configuration (as passed to ``build``) of the best trial; ``None`` if no trial
            reported anything.
        best_metric: its best value of the tuned metric (``"time_to_target_s"`` with an objective).
        best_trial_id: Ray's id of the best trial.
        best_checkpoint: Tune checkpoint with the best trial's weights (file ``model.ckpt``), or ``None``.
        reached_target: with an objective, whether any trial reached the target; otherwise ``None``.
        metric / mode: what the sweep optimised.
        path: the sweep's directory (``storage_path/name``); pass the same name with ``resume=True``.
        interrupted: ids of the trials that an interrupted sweep stopped while they ran (Ray marks them
            ``TERMINATED`` like finished ones); they count as ``unfinished``.
        complete: ``False`` when the sweep stopped before all its trials (``num_samples`` per grid
            point) finished, e.g. it was interrupted (Ctrl+C), also while its last trials ran; resume it
            with ``resume=True``.
        result_grid: Ray Tune's ``ResultGrid``.
    """

    result_grid: ResultGrid
    metric: str
    mode: str
    num_trials: int
    searched: list[str]
    objective: TimeToTargetObjective | None = None
    path: str = ""
    interrupted: Collection[str] = ()
    best_config: dict[str, Any] | None = field(init=False, default=None)
    best_metric: float | None = field(init=False, default=None)
    best_trial_id: str | None = field(init=False, default=None)
    best_checkpoint: Checkpoint | None = field(init=False, default=None)
    reached_target: bool | None = field(init=False, default=None)
    complete: bool = field(init=False, default=True)

    def __post_init__(self) -> None:
        self._statuses = _trial_statuses(self.result_grid, frozenset(self.interrupted))
        self.complete = self.num_ended >= self.num_trials
        created = _creation_indices(self.result_grid)
        self._histories: dict[str, pd.DataFrame] = {}
        self._results: dict[str, Any] = {}
        started: dict[str, float] = {}
        for result in self.result_grid:
            trial_id = self._trial_id(result)
            self._results[trial_id] = result
            if trial_id not in created:
                index = _creation_index((result.metrics or {}).get("experiment_tag"))
                if index is not None:
                    created[trial_id] = index
            df = result.metrics_dataframe
            started[trial_id] = math.inf
            if df is not None and self.metric in df.columns and len(df):
                df = _last_run(df)
                self._histories[trial_id] = df
                if "timestamp" in df.columns:
                    started[trial_id] = float(df["timestamp"].iloc[0]) - float(df["time_total_s"].iloc[0])
        # The order the sweep created its trials in (see the module docstring): it depends only on what
        # is stored with the sweep, so it is the same for the run that recorded it and for any resume.
        # The start time (whole seconds in Ray's timestamps) and the id only order trials without a
        # creation number.
        self._order = sorted(self._results, key=lambda t: (created.get(t, math.inf), started[t], t))
        self._pick_best()

    @staticmethod
    def _trial_id(result: Any) -> str:
        if result.metrics and "trial_id" in result.metrics:
            return str(result.metrics["trial_id"])
        # A trial that never reported: its folder is named trial_<id> (see sweep._trial_dirname).
        return str(result.path).rstrip("/").rsplit("/", 1)[-1].removeprefix("trial_")

    def _trial_best(self, df: pd.DataFrame) -> float:
        values = pd.to_numeric(df[self.metric], errors="coerce").dropna()
        if self.objective is not None and TimeToTargetObjective.reached_key in df.columns:
            reached = df.loc[values.index, TimeToTargetObjective.reached_key] > 0
            if reached.any():
                values = values[reached]
        if values.empty:
            return math.nan
        return float(values.max() if self.mode == "max" else values.min())

    def _trial_reached(self, df: pd.DataFrame) -> bool:
        return bool(
            self.objective is not None
            and (df.get(TimeToTargetObjective.reached_key, pd.Series([0])) > 0).any()
        )

    def _pick_best(self) -> None:
        # In creation order, so that max() below, which keeps the first of equal values, gives a tie to the
        # earliest trial.
        candidates = [
            (tid, self._trial_best(self._histories[tid])) for tid in self._order if tid in self._histories
        ]
        candidates = [(tid, v) for tid, v in candidates if not math.isnan(v)]
        if self.objective is not None:
            reached = [(tid, v) for tid, v in candidates if self._trial_reached(self._histories[tid])]
            self.reached_target = bool(reached)
            if reached:
                candidates = reached
            elif candidates:
                log.warning(
                    "No trial reached %s %s %s; the best trial is the one with the lowest penalised score.",
                    self.objective.metric,
                    ">=" if self.objective.mode == "max" else "<=",
                    self.objective.target,
                )
        if not candidates:
            return
        sign = 1.0 if self.mode == "max" else -1.0
        trial_id, value = max(candidates, key=lambda c: sign * c[1])
        result = self._results[trial_id]
        self.best_trial_id, self.best_metric = trial_id, value
        self.best_config = dict(result.config or {})
        self.best_checkpoint = result.checkpoint

    @property
    def num_ended(self) -> int:
        """Trials that finished or failed (not those an interrupted sweep stopped while they ran)."""
        if not self._statuses:  # no trial states from Ray: count its own (an interrupted trial counts)
            return self.result_grid.num_terminated + self.result_grid.num_errors
        return sum(status != "unfinished" for status in self._statuses.values())

    @property
    def best_checkpoint_path(self) -> str | None:
        """Local path of the best weights (``LightningModule.load_from_checkpoint`` reads it), if any."""
        if self.best_checkpoint is None:
            return None
        return f"{self.best_checkpoint.path}/{CHECKPOINT_FILE}"

    @property
    def errors(self) -> list[BaseException]:
        """The exceptions of the trials that failed, in trial order."""
        return [e for t in self._order if (e := self._results[t].error) is not None]

    def dataframe(self) -> pd.DataFrame:
        """One row per trial, in the order the sweep sampled them: ``trial_id``, ``status``
        (``finished``, ``error``, ``unfinished``), ``config/...``, the best and the last value of the tuned
        metric, ``iterations`` (validations reported), ``time_s`` (trial wall time), ``error``."""
        rows = []
        for trial_id in self._order:
            result, df = self._results[trial_id], self._histories.get(trial_id)
            row: dict[str, Any] = {"trial_id": trial_id, "status": self._statuses.get(trial_id, "unknown")}
            row.update({f"config/{k}": v for k, v in _flatten(result.config or {}).items()})
            if df is not None:
                row[self.metric] = self._trial_best(df)
                row[f"last_{self.metric}"] = float(df[self.metric].iloc[-1])
                if self.objective is not None:
                    row[TimeToTargetObjective.reached_key] = self._trial_reached(df)
                    source = pd.to_numeric(df.get(self.objective.metric), errors="coerce")
                    if source is not None and not source.dropna().empty:
                        row[self.objective.metric] = float(
                            source.max() if self.objective.mode == "max" else source.min()
                        )
                row["iterations"] = int(df[_x_key(df)].max())
                row["time_s"] = float(df["time_total_s"].iloc[-1])
            else:
                row[self.metric] = math.nan
            row["error"] = None if result.error is None else f"{type(result.error).__name__}: {result.error}"
            rows.append(row)
        return pd.DataFrame(rows)

    def history(self) -> pd.DataFrame:
        """Every report of every trial: ``trial_id``, ``trial`` (sampling order), ``validation`` (the
        count of the trial's validations), every logged metric, ``time_total_s`` and ``config/...``.

        A trial that an interrupted sweep ran again on resume keeps the reports of its last run only."""
        frames = []
        for number, trial_id in enumerate(self._order):
            df = self._histories.get(trial_id)
            if df is None:
                continue
            df = df.drop(columns=[c for c in df.columns if c in _RAY_KEYS]).copy()
            df["trial_id"], df["trial"] = trial_id, number
            frames.append(df)
        if not frames:
            return pd.DataFrame(columns=["trial_id", "trial", VALIDATION_KEY, self.metric])
        return pd.concat(frames, ignore_index=True)

    def _searched_config(self) -> dict[str, Any]:
        flat = _flatten(self.best_config or {})
        return {k: flat[k] for k in self.searched if k in flat}

    def plot(self, axes: tuple[Axes, Axes] | None = None) -> Figure:
        """Two panels: the tuned metric per validation for every trial (best trial highlighted), and
        each trial's best value in sampling order with the running best. Returns the figure."""
        import matplotlib.pyplot as plt

        if axes is None:
            fig, (ax_curves, ax_trials) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
        else:
            ax_curves, ax_trials = axes
            fig = ax_curves.figure
        from matplotlib.ticker import MaxNLocator

        for trial_id in self._order:
            df = self._histories.get(trial_id)
            if df is None:
                continue
            best = trial_id == self.best_trial_id
            # Markers too: a trial stopped after one validation is a single point.
            ax_curves.plot(
                df[_x_key(df)], df[self.metric], marker="o", ms=4 if best else 3,
                color="C3" if best else "0.6", lw=2.0 if best else 1.0, zorder=3 if best else 1,
                label=f"best trial {trial_id}" if best else None,
            )  # fmt: skip
        ax_curves.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_trials.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_curves.set_xlabel("validation")
        ax_curves.set_ylabel(self.metric)
        ax_curves.set_title(f"{self.metric} per trial")
        if self.best_trial_id is not None:
            ax_curves.legend(loc="best")

        numbers, values = [], []
        for number, trial_id in enumerate(self._order):
            if trial_id in self._histories:
                value = self._trial_best(self._histories[trial_id])
                if not math.isnan(value):
                    numbers.append(number)
                    values.append(value)
        ax_trials.scatter(numbers, values, color="C0", label="trial's best", zorder=2)
        running: list[float] = []
        for v in values:
            running.append(v if not running else (max if self.mode == "max" else min)(running[-1], v))
        ax_trials.step(numbers, running, where="post", color="C1", label="best so far")
        if self.best_trial_id in self._order and self.best_metric is not None:
            ax_trials.scatter(
                [self._order.index(self.best_trial_id)], [self.best_metric], marker="*", s=200,
                color="C3", zorder=3, label="best trial",
            )  # fmt: skip
        ax_trials.set_xlabel("trial (sampling order)")
        ax_trials.set_ylabel(f"best {self.metric}")
        ax_trials.set_title("search progress")
        ax_trials.legend(loc="best")
        if self.best_config is not None:
            shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in
                              self._searched_config().items())  # fmt: skip
            fig.suptitle(f"best {self.metric} = {self.best_metric:.4g} with {shown}", fontsize=10)
        return fig

    def __repr__(self) -> str:
        status = "complete" if self.complete else "INCOMPLETE (resume with resume=True)"
        return (
            f"TuneResults({len(self.result_grid)} trials, {status}, best {self.metric}={self.best_metric}, "
            f"best_config={self._searched_config()}, path={self.path!r})"
        )


def _last_run(df: pd.DataFrame) -> pd.DataFrame:
    """The reports of a trial's last run: a trial resumed after an interruption starts again at its first
    validation, and Ray's history holds the interrupted run's reports before it."""
    if VALIDATION_KEY not in df.columns:
        return df
    starts = (pd.to_numeric(df[VALIDATION_KEY], errors="coerce") == 1).to_numpy().nonzero()[0]
    return df.iloc[starts[-1] :].reset_index(drop=True) if len(starts) else df


def _x_key(df: pd.DataFrame) -> str:
    """The count of validations: the callback's, else Ray's (a sweep recorded before it was reported)."""
    return VALIDATION_KEY if VALIDATION_KEY in df.columns else "training_iteration"
