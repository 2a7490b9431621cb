"""Lightning adapter: report every validation's metrics to Ray Tune and keep the best weights only.

After each validation (the sanity check excluded) the callback sends every scalar in
``trainer.callback_metrics`` plus ``epoch``, ``step``, ``fit_time_s``, ``validation`` (the count of
validations so far) and ``budget_fraction`` (the fraction of the trial's step budget done) to
``ray.tune.report``, so schedulers such as ASHA (Li et al., 2020) can stop a weak trial between
validations. A checkpoint goes
along only when the tuned value improved, and it holds weights and hyper-parameters only (no
optimizer state), which keeps sweeps of many trials from filling the disk; Tune keeps one per trial.

With a :class:`~lightning_speedup.tune.TimeToTargetObjective` objective the callback also scores each report
(see :mod:`lightning_speedup.tune.objective`) and stops the trial at the first validation that reaches
the target. Time spent talking to Tune and writing checkpoints is excluded from the measured wall time.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from typing_extensions import override

from lightning_speedup.tune.objective import TimeToTargetObjective

CHECKPOINT_FILE = "model.ckpt"
# The 1-based count of validations in this run of the trial, reported with every result.
VALIDATION_KEY = "validation"
# The fraction of the trial's step budget (Lightning's ``estimated_stepping_batches``) done, in (0, 1];
# reported when the budget is known. ASHA's rungs are on it.
BUDGET_KEY = "budget_fraction"

# report(metrics, checkpoint_dir or None); the default sends to the Ray Tune session of the trial.
Reporter = Callable[[dict[str, float], "str | None"], None]


class MetricNotReportedError(ValueError):
    """The tuned metric was not among the metrics a trial logged; the message lists those it did log."""


class NoValidationError(MetricNotReportedError):
    """A trial finished training without a single validation, so it reported nothing to Tune."""


# Why a trial can finish without a validation report, for the messages that say so.
NO_VALIDATION_CAUSES = (
    "limit_val_batches=0, check_val_every_n_epoch above max_epochs, a val_check_interval, max_steps or "
    "max_time that ends training before the first validation, a module without validation_step or a "
    "datamodule without val_dataloader, a callback that stops training early, or a strategy that trains "
    "in processes it starts (their reports never reach Tune)"
)


def _ray_report(metrics: dict[str, float], checkpoint_dir: str | None) -> None:
    from ray import tune

    checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
    tune.report(metrics, checkpoint=checkpoint)


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar entries of Lightning's ``callback_metrics`` as Python floats (tensors of one element)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                continue
            out[key] = float(value.detach().float().cpu().item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


class TuneReportCallback(Callback):
    """Reports metrics to Ray Tune after each validation and checkpoints the best weights.

    ``tune_lightning`` adds this callback to every trial; use it directly only in a hand-written Tune
    trainable.

    Args:
        metric: the tuned logged metric (e.g. ``"val_acc"``); ignored when ``objective`` is given.
        mode: ``"max"`` or ``"min"`` for ``metric``.
        objective: optional :class:`TimeToTargetObjective`; the trial then reports ``"time_to_target_s"``
            (to minimise) and stops once the target is reached.
        checkpoint: send a weights-only checkpoint to Tune whenever the tuned value improves.
        report: where to send ``(metrics, checkpoint_dir)``; default: ``ray.tune.report`` of the trial.
        require_budget: raise at the start of training when Lightning cannot tell the trial's step
            budget (a scheduler such as ASHA places its rungs on ``budget_fraction``).

    Raises:
        ValueError: empty ``metric`` or ``mode`` not in {"max", "min"}; with ``require_budget``, a trial
            whose step budget is unknown (a training DataLoader without a length and no ``max_steps``).
        MetricNotReportedError: at the first validation, when the metric the sweep needs was not logged.
    """

    def __init__(
        self,
        metric: str,
        mode: str = "max",
        objective: TimeToTargetObjective | None = None,
        checkpoint: bool = True,
        report: Reporter | None = None,
        require_budget: bool = False,
    ) -> None:
        if objective is None and (not isinstance(metric, str) or not metric):
            raise ValueError(f"metric must be a non-empty logged metric name, got {metric!r}.")
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        self.objective = objective
        self.source_metric = objective.metric if objective else metric
        self.tuned_key = TimeToTargetObjective.key if objective else metric
        self.tuned_mode = "min" if objective else mode
        self.checkpoint = checkpoint
        self._report = report or _ray_report
        self.require_budget = require_budget
        self._t0: float | None = None
        self._excluded_s = 0.0
        self._best_source: float | None = None
        self._best_tuned: float | None = None
        self._reached_at_s: float | None = None
        self._validations = 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._t0 = time.perf_counter()
            self._excluded_s = 0.0
            self._best_source = self._best_tuned = self._reached_at_s = None
            self._validations = 0

    @property
    def validations(self) -> int:
        """Validations reported in the current ``fit`` (the sanity check excluded)."""
        return self._validations

    @override
    def state_dict(self) -> dict[str, Any]:
        elapsed = None if self._t0 is None else time.perf_counter() - self._t0 - self._excluded_s
        return {
            "best_source": self._best_source,
            "best_tuned": self._best_tuned,
            "reached_at_s": self._reached_at_s,
            "elapsed_s": elapsed,
            "validations": self._validations,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callback state after setup(), so the clock continues from the saved time.
        self._best_source = state_dict["best_source"]
        self._best_tuned = state_dict["best_tuned"]
        self._reached_at_s = state_dict["reached_at_s"]
        self._validations = int(state_dict.get("validations", 0))
        if state_dict["elapsed_s"] is not None:
            self._t0 = time.perf_counter() - state_dict["elapsed_s"]
            self._excluded_s = 0.0

    def _better(self, a: float, b: float | None, mode: str) -> bool:
        if math.isnan(a):
            return False
        return b is None or math.isnan(b) or (a > b if mode == "max" else a < b)

    @staticmethod
    def _budget(trainer: L.Trainer) -> float | None:
        """The trial's step budget, or ``None`` when Lightning cannot know it."""
        total = trainer.estimated_stepping_batches
        return float(total) if math.isfinite(total) and total > 0 else None

    def _fraction_done(self, trainer: L.Trainer) -> float:
        total = self._budget(trainer)
        if total is None:
            return 1.0
        return min(1.0, max(trainer.global_step, 1) / total)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.require_budget and self._budget(trainer) is None:
            raise ValueError(
                "The sweep's scheduler places its rungs on the fraction of a trial's step budget, but Lightning "
                f"cannot tell this trial's budget (estimated_stepping_batches="
                f"{trainer.estimated_stepping_batches}): its training DataLoader has no length. Set "
                "trainer_kwargs['max_steps'] (or an int limit_train_batches), or use scheduler=None."
            )

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        assert self._t0 is not None, "setup(stage='fit') runs before any validation of fit"
        elapsed = time.perf_counter() - self._t0 - self._excluded_s
        metrics = scalar_metrics(trainer.callback_metrics)
        if self.source_metric not in metrics:
            raise MetricNotReportedError(
                f"The sweep tunes {self.source_metric!r}, but this trial logged no such metric by the end of "
                f"validation; it logged {sorted(metrics) or 'nothing'}. Pass one of these as "
                f"{'TimeToTargetObjective(metric=...)' if self.objective else 'metric='}, or log it in "
                f"validation_step with self.log({self.source_metric!r}, value)."
            )
        value = metrics[self.source_metric]
        if self._better(value, self._best_source, self.objective.mode if self.objective else self.tuned_mode):
            self._best_source = value
        self._validations += 1
        # Ray's training_iteration continues from a restored trial's checkpoint, although the trial reruns
        # from its first epoch; ASHA's rungs and the results count this trial run's validations instead.
        metrics.update(
            epoch=float(trainer.current_epoch),
            step=float(trainer.global_step),
            fit_time_s=elapsed,
            **{VALIDATION_KEY: float(self._validations)},
        )
        if self._budget(trainer) is not None:
            metrics[BUDGET_KEY] = self._fraction_done(trainer)

        stop = False
        if self.objective is not None:
            if self._reached_at_s is None and self.objective.reached(value):
                self._reached_at_s = elapsed
            fraction = self._fraction_done(trainer)
            if self._reached_at_s is not None:
                score, reached = self._reached_at_s, True
            else:
                score, reached = self.objective.score(elapsed, self._best_source, fraction)
            metrics[TimeToTargetObjective.key] = score
            metrics[TimeToTargetObjective.reached_key] = float(reached)
            metrics[TimeToTargetObjective.projected_key] = elapsed / max(fraction, 1e-6)
            stop = reached and self.objective.stop_at_target

        tuned = metrics[self.tuned_key]
        improved = self._better(tuned, self._best_tuned, self.tuned_mode)
        if improved:
            self._best_tuned = tuned

        t_report = time.perf_counter()
        if self.checkpoint and improved:
            with tempfile.TemporaryDirectory(prefix="tune_ckpt_") as tmp:
                trainer.save_checkpoint(os.path.join(tmp, CHECKPOINT_FILE), weights_only=True)
                self._report(metrics, tmp)
        else:
            self._report(metrics, None)
        self._excluded_s += time.perf_counter() - t_report
        if stop:
            trainer.should_stop = True
