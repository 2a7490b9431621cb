"""Time-to-target as a tuning objective: search for the configuration that reaches a quality target fastest.

The headline metric of MLPerf Training and DAWNBench (Coleman et al., 2017) turned into something a
searcher can minimise. A trial that reaches the target scores its wall time to the target and stops. A
trial that has not (yet) reached it scores a *penalty* that is always worse than its own full run and
grows with its distance from the target, so the searcher still learns which misses were close:

    score = elapsed_s                                             if the target was reached
    score = penalty * projected_total_s * (1 + shortfall)         otherwise

``projected_total_s`` is the trial's wall time extrapolated to its full step budget (so a trial that
ASHA stops after one epoch is charged like a full run, not like a short one), and ``shortfall`` is the
relative distance of the best metric so far from the target (1 when nothing was measured). Plain
Python, no Ray or Lightning: the Lightning adapter is :class:`~lightning_speedup.tune.TuneReportCallback`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal


@dataclass(frozen=True)
class TimeToTargetObjective:
    """Tune for the fastest wall time from the start of ``fit`` to a validation at or past ``target``.

    Args:
        metric: the logged validation metric the target is about (e.g. ``"val_acc"``).
        target: the quality target (e.g. ``0.94``); must be non-zero (the shortfall is relative to it).
        mode: ``"max"`` (reached when ``metric >= target``) or ``"min"`` (``metric <= target``).
        penalty: factor >= 1 on the projected full-run time charged to a trial that misses; with the
            default 2 a miss ranks behind every trial that reached the target in less than twice the
            miss's own full-run time.
        stop_at_target: stop a trial at the first validation that reaches the target (the remaining
            epochs cannot improve its score).

    The sweep minimises the reported key ``"time_to_target_s"``; every report also carries
    ``"reached_target"`` (0/1) and ``"projected_total_s"``.

    The clock starts when the Trainer sets up ``fit`` (the callbacks' ``setup``, after the datamodule's),
    so it includes the module's setup, the sanity check, the data loaders' start and the first steps'
    one-time costs; time spent reporting to Tune and saving checkpoints is left out. Ray reuses a worker
    for several trials, and costs paid once per process (CUDA context, cuDNN autotuning, compiled
    kernels, thread pools) fall on the first trial each worker runs: with short trials that can be
    several times a later trial's own time, and the searcher sees it as that configuration's. Make trials
    long enough for such costs to be small, or read the times of the first trials with that in mind.

    Raises:
        ValueError: empty metric, ``mode`` not in {"max", "min"}, a zero or non-finite target, or
            ``penalty < 1``.
    """

    metric: str = "val_acc"
    target: float = 0.94
    mode: Literal["max", "min"] = "max"
    penalty: float = 2.0
    stop_at_target: bool = True

    key: ClassVar[str] = "time_to_target_s"
    reached_key: ClassVar[str] = "reached_target"
    projected_key: ClassVar[str] = "projected_total_s"

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(
                f"TimeToTargetObjective.metric must be a non-empty metric name, got {self.metric!r}."
            )
        if self.mode not in ("max", "min"):
            raise ValueError(f"TimeToTargetObjective.mode must be 'max' or 'min', got {self.mode!r}.")
        if not isinstance(self.target, (int, float)) or not math.isfinite(self.target) or self.target == 0:
            raise ValueError(
                f"TimeToTargetObjective.target must be a finite non-zero number, got {self.target!r} "
                "(the penalty of a miss is relative to the target)."
            )
        if not isinstance(self.penalty, (int, float)) or not self.penalty >= 1:
            raise ValueError(
                f"TimeToTargetObjective.penalty must be >= 1 so that a miss scores worse than its own run, "
                f"got {self.penalty!r}."
            )

    def reached(self, value: float) -> bool:
        """Whether a measured ``value`` of :attr:`metric` is at or past the target."""
        if math.isnan(value):
            return False
        return value >= self.target if self.mode == "max" else value <= self.target

    def better(self, a: float, b: float | None) -> bool:
        """Whether metric value ``a`` is strictly better than ``b`` (``None`` or NaN: nothing yet)."""
        if math.isnan(a):
            return False
        if b is None or math.isnan(b):
            return True
        return a > b if self.mode == "max" else a < b

    def shortfall(self, best: float | None) -> float:
        """Relative distance of ``best`` from the target: 0 at or past it, 1 when nothing was measured."""
        if best is None or math.isnan(best):
            return 1.0
        gap = (self.target - best) if self.mode == "max" else (best - self.target)
        return max(0.0, gap) / abs(self.target)

    def score(self, elapsed_s: float, best: float | None, fraction_done: float) -> tuple[float, bool]:
        """The value to minimise after ``elapsed_s`` seconds, and whether the target was reached.

        Args:
            elapsed_s: wall time since the start of ``fit`` (seconds).
            best: best value of :attr:`metric` seen so far in this trial (``None``: none yet).
            fraction_done: fraction of the trial's step budget done, in (0, 1].
        """
        if elapsed_s < 0 or not math.isfinite(elapsed_s):
            raise ValueError(f"elapsed_s must be a finite time >= 0, got {elapsed_s!r}.")
        if best is not None and self.reached(best):
            return float(elapsed_s), True
        fraction = min(1.0, max(fraction_done, 1e-6))
        projected = elapsed_s / fraction
        return float(self.penalty * projected * (1.0 + self.shortfall(best))), False
