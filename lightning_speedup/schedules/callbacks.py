"""Per-step LR (and momentum) schedules as Lightning callbacks: one line, no change to the module.

``OneCycle`` (Smith & Topin 2018; torch's ``OneCycleLR``, same parameter names and bit-identical
values), ``WarmupCosine`` and ``WarmupStableDecay`` (Hu et al. 2024, Hägele et al. 2024) take over
the learning rate of every optimizer the module's ``configure_optimizers`` returns:

* the run length comes from ``trainer.estimated_stepping_batches``, so gradient accumulation,
  devices, ``max_steps``/``max_epochs`` and ``limit_train_batches`` are accounted for;
* each param group peaks at the given LR times its own base LR (the LR the optimizer was built
  with) divided by the largest base LR, so groups keep their ratios; a list gives one peak per group;
* momentum (SGD's ``momentum``, Adam's ``betas[0]``) cycles inversely to the LR when asked;
* the schedule advances once per optimizer step (``on_before_optimizer_step``), so it counts
  accumulated batches and skipped AMP steps the way Lightning and torch count scheduler steps;
* ``state_dict``/``load_state_dict`` carry the step counters, run length and resolved peaks, so
  a resumed run continues the identical LR sequence;
* a peak of ``"auto"`` runs an LR range test first (:mod:`lightning_speedup.schedules.range_test`).

Values are written into the param groups before every step and right after it, so Lightning's
``LearningRateMonitor`` (which reads the param groups) logs the schedule too; the callback also
logs them itself under ``schedule/lr-<Optimizer>[/pg<j>]`` and ``schedule/momentum-<Optimizer>``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_speedup._compat import batches_stepped, logged_step
from lightning_speedup.schedules.functional import (
    ANNEAL_STRATEGIES,
    DECAY_SHAPES,
    AnnealStrategy,
    DecayShape,
    check_fraction,
    check_momentum,
    check_one_cycle,
    check_positive,
    check_wsd_fractions,
    inverse_momentum,
    one_cycle,
    warmup_cosine,
    warmup_stable_decay,
    warmup_steps,
    wsd_phase_steps,
)
from lightning_speedup.schedules.range_test import (
    LRRangeTest,
    RangeTestResult,
    describe,
    run_range_test,
    save_range_test,
)

PeakLR = float | Sequence[float] | Literal["auto"] | None
Momentum = float | Sequence[float]
# The momentum at the peak LR / at the lowest LR when cycle_momentum=True and none is given (torch's OneCycleLR's).
DEFAULT_BASE_MOMENTUM, DEFAULT_MAX_MOMENTUM = 0.85, 0.95


def _lightning_log_step(trainer: pl.Trainer) -> int | None:
    """The step ``LearningRateMonitor`` logs at now, or ``None`` when this is not a logging step.

    It mirrors ``LearningRateMonitor`` so both callbacks put their values on the same steps
    (:func:`lightning_speedup._compat.logged_step`).
    """
    return logged_step(trainer)


def _set_value(group: dict[str, Any], key: str, value: float) -> None:
    if isinstance(group[key], Tensor):
        group[key].fill_(value)  # capturable / compiled optimizers keep LR tensors; keep their identity
    else:
        group[key] = value


def _set_momentum(group: dict[str, Any], use_beta1: bool, value: float) -> None:
    if not use_beta1:
        _set_value(group, "momentum", value)
    elif isinstance(group["betas"][0], Tensor):
        group["betas"][0].fill_(value)
    else:
        group["betas"] = (value, *group["betas"][1:])


def _get_momentum(group: dict[str, Any], use_beta1: bool) -> float:
    return float(group["betas"][0] if use_beta1 else group["momentum"])


class LRScheduleCallback(Callback):
    """Shared machinery of the schedule callbacks; subclasses define :meth:`schedule_values`.

    Args:
        peak_lr: the LR of the group with the largest base LR at the schedule's peak (other groups
            scale by their base-LR ratio); a sequence gives each param group its own peak (all
            groups of all optimizers, in order); ``None`` uses each group's own base LR as its
            peak; ``"auto"`` runs an LR range test before training and uses its choice.
        total_steps: schedule length in optimizer steps; ``None`` (default) takes
            ``trainer.estimated_stepping_batches``.
        cycle_momentum: move momentum (SGD ``momentum``, Adam-family ``betas[0]``) inversely to the LR.
        base_momentum / max_momentum: momentum at the peak LR / at the lowest LR (float or one per group);
            ``None`` means 0.85 / 0.95. Only with ``cycle_momentum=True``: without it momentum is left as the
            optimizer has it, so a value other than the default given there is refused rather than ignored.
        range_test: settings of the range test for ``"auto"`` (default ``LRRangeTest()``).
        log_values: log the LR (and momentum) under ``schedule/...`` at the Trainer's logging steps.
        peak_name: the argument's name in messages (``max_lr`` or ``peak_lr``).
    """

    def __init__(
        self,
        peak_lr: PeakLR,
        *,
        total_steps: int | None,
        cycle_momentum: bool,
        base_momentum: Momentum | None,
        max_momentum: Momentum | None,
        range_test: LRRangeTest | None,
        log_values: bool,
        peak_name: str = "peak_lr",
    ) -> None:
        super().__init__()
        self._peak_name = peak_name
        self.peak_lr = self._validated_peak(peak_lr, peak_name)
        if total_steps is not None and (
            not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1
        ):
            raise ValueError(f"total_steps must be a positive integer or None, got {total_steps!r}.")
        self.total_steps = total_steps
        if not isinstance(cycle_momentum, bool):
            raise ValueError(f"cycle_momentum must be True or False, got {cycle_momentum!r}.")
        self.cycle_momentum = cycle_momentum
        # The defaults themselves are accepted: LightningCLI writes every argument into the configs it saves, and
        # those of earlier releases (whose defaults were these values) must still load.
        given = {
            k: v
            for k, v, default in (
                ("base_momentum", base_momentum, DEFAULT_BASE_MOMENTUM),
                ("max_momentum", max_momentum, DEFAULT_MAX_MOMENTUM),
            )
            if v is not None and v != default
        }
        if given and not cycle_momentum:
            raise ValueError(
                f"{type(self).__name__}: {', '.join(f'{k}={v!r}' for k, v in given.items())} given with "
                "cycle_momentum=False, where the momentum stays as the optimizer has it, so it would do nothing. "
                f"Pass cycle_momentum=True to cycle the momentum, or drop {' and '.join(given)}."
            )
        # The resolved values (also when not cycling) are what state_dict's settings record.
        base_momentum = DEFAULT_BASE_MOMENTUM if base_momentum is None else base_momentum
        max_momentum = DEFAULT_MAX_MOMENTUM if max_momentum is None else max_momentum
        self.base_momentum = self._validated_momentum("base_momentum", base_momentum)
        self.max_momentum = self._validated_momentum("max_momentum", max_momentum)
        if cycle_momentum:
            self._check_momentum_order(self.base_momentum, self.max_momentum)
        if range_test is not None and not isinstance(range_test, LRRangeTest):
            raise ValueError(f"range_test must be an LRRangeTest or None, got {type(range_test).__name__}.")
        if range_test is not None and self.peak_lr != "auto":
            raise ValueError(
                f"range_test settings were given but {peak_name}={peak_lr!r}; the range test only runs for "
                f"{peak_name}='auto'. Pass {peak_name}='auto' or drop range_test."
            )
        self.range_test = range_test if range_test is not None else LRRangeTest()
        self.log_values = bool(log_values)

        # Run state (filled in on_fit_start, checkpointed).
        self._optimizers: list[torch.optim.Optimizer] = []
        self._total: int = 0
        # The run's step (in the units of trainer.estimated_stepping_batches) at which the schedule began: 0,
        # or where a fresh schedule joined a Trainer that had trained already.
        self._start: int = 0
        self._steps: list[int] = []
        # The global step of each optimizer's last counted step: an optimizer that evaluates its closure
        # several times per step (LBFGS) calls on_before_optimizer_step each time.
        self._counted_at: list[int | None] = []
        self._peaks: list[list[float]] = []
        self._momenta: list[list[tuple[float, float]]] = []
        self._use_beta1: list[bool] = []
        self._names: list[list[tuple[str, str]]] = []
        self._auto_lr: float | None = None
        self._loaded: dict[str, Any] | None = None
        self._last_logged_step: int | None = None
        self._warned_overrun = False
        self._sized_by_estimate = False
        self.range_test_result: RangeTestResult | None = None

    # ------------------------------------------------------------------ what subclasses define

    def schedule_values(
        self, step: int, total_steps: int, peak_lr: float, base_momentum: float, max_momentum: float
    ) -> tuple[float, float]:
        """LR and momentum of one param group at ``step`` of ``total_steps``."""
        raise NotImplementedError

    def check_total_steps(self, total_steps: int) -> None:
        """Raise ``ValueError`` if the schedule cannot run for ``total_steps`` steps; warn where a phase it was
        given gets no step of them."""

    def _warn_if_no_step(self, name: str, fraction: float, steps: int, total_steps: int, effect: str) -> None:
        """Warn that a phase of ``fraction > 0`` got no step of the run: ``effect`` says what the LR does instead."""
        if fraction > 0 and steps == 0:
            rank_zero_warn(
                f"{type(self).__name__}: {name}={fraction:g} of this {total_steps}-step run rounds to no step, so "
                f"{effect}. Lengthen the run, raise {name}, or set {name}=0 to say so."
            )

    def can_resize(self, step: int, saved_total: int, total: int) -> bool:
        """Whether a resumed schedule at ``step`` of ``saved_total`` steps may continue as one of ``total`` steps
        with no change to the LRs already used (only :class:`WarmupStableDecay`, in its stable phase)."""
        return False

    def schedule_settings(self) -> dict[str, Any]:
        """The settings that shape the schedule; a resume compares them with the checkpoint's."""
        return {self._peak_name: self.peak_lr, "total_steps": self.total_steps}

    # ------------------------------------------------------------------ argument checks

    @staticmethod
    def _validated_peak(peak_lr: PeakLR, name: str) -> PeakLR:
        hint = f"Pass a positive LR, one per param group, None (each group's own LR) or '{name}=\"auto\"'."
        if peak_lr is None or peak_lr == "auto":
            return peak_lr
        if isinstance(peak_lr, str):
            raise ValueError(
                f"{name} must be a number, a sequence of numbers, None or 'auto', got {peak_lr!r}."
            )
        if isinstance(peak_lr, Sequence):
            if len(peak_lr) == 0:
                raise ValueError(f"{name} is an empty sequence. {hint}")
            return [check_positive(f"{name}[{i}]", v, hint) for i, v in enumerate(peak_lr)]
        return check_positive(name, peak_lr, hint)

    @staticmethod
    def _validated_momentum(name: str, value: Momentum) -> Momentum:
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) == 0:
                raise ValueError(f"{name} is an empty sequence; pass a float or one value per param group.")
            return [check_momentum(f"{name}[{i}]", v) for i, v in enumerate(value)]
        return check_momentum(name, value)

    @staticmethod
    def _check_momentum_order(base: Momentum, top: Momentum) -> None:
        bases = list(base) if isinstance(base, Sequence) else None
        tops = list(top) if isinstance(top, Sequence) else None
        n = max(len(bases or [0]), len(tops or [0]))
        for i in range(n):
            b = bases[i] if bases is not None and i < len(bases) else (base if bases is None else None)
            t = tops[i] if tops is not None and i < len(tops) else (top if tops is None else None)
            if b is not None and t is not None and b > t:  # type: ignore[operator]
                where = f" (param group {i})" if bases is not None or tops is not None else ""
                raise ValueError(
                    f"base_momentum={b} is above max_momentum={t}{where}: momentum is base_momentum at the peak LR "
                    "and max_momentum at the lowest LR, so base_momentum must be <= max_momentum. Swap them, or "
                    "pass cycle_momentum=False."
                )

    @staticmethod
    def _per_group(name: str, value: Any, n_groups: int) -> list[Any]:
        if isinstance(value, list):
            if len(value) != n_groups:
                raise ValueError(
                    f"{name} has {len(value)} values but the optimizers have {n_groups} param groups in all; "
                    "pass one value per param group (all optimizers, in order) or a single value."
                )
            return list(value)
        return [value] * n_groups

    # ------------------------------------------------------------------ public helpers

    @property
    def schedule_total_steps(self) -> int:
        """The schedule's length in optimizer steps (0 before ``fit`` starts)."""
        return self._total

    @property
    def steps_taken(self) -> list[int]:
        """Optimizer steps each optimizer has taken under this schedule."""
        return list(self._steps)

    @property
    def peak_lrs(self) -> list[list[float]]:
        """The resolved peak LR of each param group of each optimizer."""
        return [list(p) for p in self._peaks]

    def current_values(self) -> dict[str, float]:
        """The LR (and momentum) each param group uses for its next step, under the logged names."""
        out: dict[str, float] = {}
        for opt, names, beta1 in zip(self._optimizers, self._names, self._use_beta1):
            for group, (lr_name, m_name) in zip(opt.param_groups, names):
                out[lr_name] = float(group["lr"])
                if self.cycle_momentum:
                    out[m_name] = _get_momentum(group, beta1)
        return out

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        others = [
            type(cb).__name__
            for cb in trainer.callbacks
            if isinstance(cb, LRScheduleCallback) and cb is not self
        ]
        if others:
            raise ValueError(
                f"The Trainer has {type(self).__name__} and {', '.join(others)}: each sets the learning rate of "
                "every optimizer, so only the last would take effect. Keep one schedule callback."
            )
        if self.total_steps is None and trainer.max_epochs == -1 and trainer.max_steps == -1:
            raise ValueError(
                f"{type(self).__name__} needs to know how long the run is, but the Trainer was configured to "
                "train forever (max_epochs=-1 and max_steps=-1). Set Trainer(max_steps=...) or "
                f"Trainer(max_epochs=...), or pass total_steps=... to {type(self).__name__}."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = type(self).__name__
        if trainer.limit_train_batches == 0:  # Lightning skips training: there is no run to schedule
            rank_zero_warn(
                f"{name}: limit_train_batches=0, so no training step runs and the schedule does nothing."
            )
            # No optimizer to schedule: every other hook does nothing, and state_dict() is empty.
            self._optimizers, self._steps, self._counted_at = [], [], []
            self._total, self._sized_by_estimate = 0, False
            return
        if trainer.lr_scheduler_configs:
            kinds = ", ".join(type(c.scheduler).__name__ for c in trainer.lr_scheduler_configs)
            raise ValueError(
                f"configure_optimizers returns a learning-rate scheduler ({kinds}) and {name} sets the learning "
                f"rate itself; two schedulers would fight over it. Return only the optimizer(s) from "
                f"configure_optimizers, or remove the {name} callback and keep your scheduler."
            )
        optimizers = list(trainer.optimizers)
        if not optimizers:
            raise ValueError(f"{name} found no optimizer: configure_optimizers must return at least one.")
        self._optimizers = optimizers
        self._use_beta1 = [self._momentum_kind(opt) for opt in optimizers]
        n_groups = sum(len(o.param_groups) for o in optimizers)
        base_m = self._per_group("base_momentum", self.base_momentum, n_groups)
        max_m = self._per_group("max_momentum", self.max_momentum, n_groups)
        self._momenta = self._split(list(zip(base_m, max_m)))
        self._names = self._log_names(optimizers)

        total = self._resolve_total_steps(trainer)
        loaded, self._loaded = self._loaded, None
        self._sized_by_estimate = False
        if loaded:
            self._resume_from(loaded, total)
        else:
            self._warn_if_max_steps_counts_every_optimizer(trainer, pl_module, total)
            self.check_total_steps(total)
            self._total = total
            self._start = 0
            # A Trainer that has trained already is at its global step only from on_train_start on (a resume
            # restores the loops after on_fit_start); a fresh schedule is sized to the steps to come there.
            self._sized_by_estimate = self.total_steps is None
            self._steps = [0] * len(optimizers)
            self._auto_lr = None
            self._peaks = self._resolve_peaks(trainer, pl_module, n_groups)
        self._last_logged_step = None
        self._warned_overrun = False
        self._counted_at = [None] * len(optimizers)
        self._apply_all()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = self._steps_done(trainer, pl_module)
        if self._sized_by_estimate and done > 0:
            self._total = self._remaining_steps(done, self._total)
            self._start = done
            self.check_total_steps(self._total)
        self._sized_by_estimate = False
        # A resumed run has just had its optimizer state (and the param groups in it) restored.
        self._apply_all()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.log_values:
            return
        step = _lightning_log_step(trainer)
        if step is None or step == self._last_logged_step:
            return
        self._last_logged_step = step
        values = self.current_values()
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = next((i for i, o in enumerate(self._optimizers) if o is optimizer), None)
        if index is None:
            return  # an optimizer created after fit started; not ours to schedule
        if self._counted_at[index] == trainer.global_step:
            return  # the closure ran again within the same optimizer step
        self._counted_at[index] = trainer.global_step
        if self._steps[index] >= self._total and not self._warned_overrun:
            self._warned_overrun = True
            rank_zero_warn(
                f"{type(self).__name__}: optimizer {index} is taking step {self._steps[index] + 1} of a schedule "
                f"of {self._total} steps; it keeps the schedule's final LR from here on. The run is longer than "
                "trainer.estimated_stepping_batches predicted (or than total_steps)."
            )
        self._apply(index)
        self._steps[index] += 1

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Put the next step's values in place now, so anything reading the param groups before that
        # step (LearningRateMonitor at the next batch start, a checkpoint) sees them.
        self._apply_all()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._warn_if_an_optimizer_stopped_short(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        if not self._total:
            return {}
        return {
            "version": 1,
            "total_steps": self._total,
            "start_step": self._start,
            "steps": list(self._steps),
            "peak_lrs": [list(p) for p in self._peaks],
            "auto_lr": self._auto_lr,
            "schedule": type(self).__name__,
            "settings": self.schedule_settings(),
        }

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning keys callback state by class, so a checkpoint of another schedule class would be
        # ignored and this schedule would restart from its step 0 in the middle of the run.
        states = checkpoint.get("callbacks", {})
        if any(key.split("{")[0] == type(self).__qualname__ for key in states):
            return
        saved = sorted({s["schedule"] for s in states.values() if isinstance(s, dict) and "schedule" in s})
        if saved:
            raise ValueError(
                f"The checkpoint's LR schedule is {', '.join(saved)}, but this run uses {type(self).__name__}; "
                "resuming would restart the schedule from its first step mid-run. Resume with the same schedule "
                "callback, or load only the weights (model.load_state_dict) to start a new schedule."
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_fit_start, once the optimizers exist (Lightning restores callbacks first).
        self._loaded = dict(state_dict) if state_dict else None

    # ------------------------------------------------------------------ internals

    def _momentum_kind(self, optimizer: torch.optim.Optimizer) -> bool:
        """True when the optimizer's momentum is ``betas[0]`` (Adam family), False for ``momentum``."""
        if "betas" in optimizer.defaults:
            return True
        if "momentum" in optimizer.defaults:
            return False
        if self.cycle_momentum:
            raise ValueError(
                f"{type(self).__name__}(cycle_momentum=True) needs optimizers with `momentum` (SGD, RMSprop) or "
                f"`betas` (Adam family), but {type(optimizer).__name__} has neither. Pass cycle_momentum=False."
            )
        return False

    def _split(self, flat: list[Any]) -> list[list[Any]]:
        out, i = [], 0
        for opt in self._optimizers:
            out.append(flat[i : i + len(opt.param_groups)])
            i += len(opt.param_groups)
        return out

    @staticmethod
    def _log_names(optimizers: list[torch.optim.Optimizer]) -> list[list[tuple[str, str]]]:
        # LearningRateMonitor's naming (class name, -<k> for repeats, /pg<j> for several groups)
        # under our own prefix, so the two never write the same key.
        counts = Counter(type(o).__name__ for o in optimizers)
        seen: Counter[str] = Counter()
        names = []
        for opt in optimizers:
            cls = type(opt).__name__
            label = cls if counts[cls] == 1 else f"{cls}-{seen[cls]}"
            seen[cls] += 1
            groups = opt.param_groups
            suffixes = [""] if len(groups) == 1 else [f"/pg{j + 1}" for j in range(len(groups))]
            names.append([(f"schedule/lr-{label}{s}", f"schedule/momentum-{label}{s}") for s in suffixes])
        return names

    def _resolve_total_steps(self, trainer: pl.Trainer) -> int:
        if self.total_steps is not None:
            return self.total_steps
        estimate = trainer.estimated_stepping_batches
        if not math.isfinite(estimate) or estimate < 1:
            raise ValueError(
                f"{type(self).__name__} could not tell the run's length: trainer.estimated_stepping_batches is "
                f"{estimate} (an unbounded run, an empty dataloader, or an iterable dataset without a length and "
                f"no max_steps). Set Trainer(max_steps=...) or pass total_steps=... to {type(self).__name__}."
            )
        return int(estimate)

    def _warn_if_max_steps_counts_every_optimizer(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, total: int
    ) -> None:
        manual_with_several = not pl_module.automatic_optimization and len(self._optimizers) > 1
        if self.total_steps is None and manual_with_several and trainer.max_steps != -1:
            name = type(self).__name__
            rank_zero_warn(
                f"{name}: this module steps {len(self._optimizers)} optimizers itself (manual optimization), and "
                f"Lightning counts max_steps={trainer.max_steps} over the steps of all of them, so the schedule "
                f"of {total} steps per optimizer may run only part of its length. Pass "
                f"{name}(total_steps=...) with the number of steps each optimizer takes."
            )

    def _warn_if_an_optimizer_stopped_short(self, trainer: pl.Trainer) -> None:
        """Warn for each optimizer that took fewer steps than the schedule has, in a run that lasted the schedule's
        whole length: an optimizer stepping on only some batches (manual optimization: a GAN's generator, a critic
        stepped every n batches, gradients accumulated by hand), whose LR then ends mid-schedule.

        A run stopped early (early stopping, ``max_time``) leaves every optimizer short and is not warned about.
        """
        if not self._total or batches_stepped(trainer) - self._start < self._total:
            return
        name = type(self).__name__
        short = [i for i, steps in enumerate(self._steps) if steps < self._total]
        length = (
            f"The schedule's length is total_steps={self.total_steps}, more than this optimizer's steps."
            if self.total_steps is not None
            else "The schedule's length comes from trainer.estimated_stepping_batches, which counts training "
            "batches, and this optimizer did not step on every batch."
        )
        also = ""
        if len(set(self._steps)) > 1:
            also = (
                f" One length serves every optimizer, and they took {self._steps} steps: size it to the one "
                "whose schedule matters most, or step every optimizer on the same batches."
            )
        for i in short:
            k = self._steps[i]
            rank_zero_warn(
                f"{name}: optimizer {i} ({type(self._optimizers[i]).__name__}) took only {k} of the schedule's "
                f"{self._total} steps, so its LR stopped {k / self._total:.0%} of the way through the schedule "
                f"instead of at its end. {length} Pass {name}(total_steps={k}) to fit the schedule to its "
                f"steps.{also}"
            )

    def _steps_done(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """The steps of the run done before this fit, in the units of ``trainer.estimated_stepping_batches``:
        the global step, except where several optimizers step by hand: Lightning counts every optimizer's
        steps in the global step, and batches in the estimate."""
        if not pl_module.automatic_optimization and len(self._optimizers) > 1:
            return batches_stepped(trainer)
        return trainer.global_step

    def _remaining_steps(self, done: int, total: int) -> int:
        """A fresh schedule on a Trainer that has already trained (a second fit, or a resume from a checkpoint
        without this schedule's state) covers the steps still to come, not the whole run again."""
        name = type(self).__name__
        remaining = total - done
        if remaining < 1:
            raise ValueError(
                f"{name} starts {done} steps into the run, but the run is estimated at {total} steps, so no step is "
                f"left to schedule. Raise max_epochs/max_steps, or pass {name}(total_steps=...)."
            )
        rank_zero_warn(
            f"{name}: the Trainer is {done} steps into the run and the checkpoint (if any) holds no state of this "
            f"schedule, so a fresh schedule covers the {remaining} steps still to come (of {total}). Pass "
            f"{name}(total_steps=...) to choose its length."
        )
        return remaining

    def _resolve_peaks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, n_groups: int
    ) -> list[list[float]]:
        base = [[float(g["lr"]) for g in opt.param_groups] for opt in self._optimizers]
        if isinstance(self.peak_lr, list):
            return self._split(self._per_group(self._peak_name, self.peak_lr, n_groups))
        if self.peak_lr is None:
            return base
        reference = max(v for row in base for v in row)
        if reference <= 0:
            raise ValueError(
                f"Every param group was built with lr <= 0, so {type(self).__name__} cannot scale "
                f"{self._peak_name} by the groups' base LRs. Build the optimizer with a positive lr, or pass "
                f"one {self._peak_name} per param group."
            )
        if self.peak_lr == "auto":
            peak = self._run_range_test(trainer, pl_module, reference)
        else:
            peak = float(self.peak_lr)  # type: ignore[arg-type]
        # base / reference is exactly 1.0 for the largest group, so its peak is exactly `peak`.
        return [[peak * (b / reference) for b in row] for row in base]

    def _run_range_test(self, trainer: pl.Trainer, pl_module: pl.LightningModule, reference: float) -> float:
        if trainer.fast_dev_run:
            rank_zero_info(
                f"{type(self).__name__}: fast_dev_run is set, so the LR range test is skipped and each param "
                f"group's own LR ({reference:g} for the largest) is its peak."
            )
            return reference
        result = run_range_test(trainer, pl_module, self.range_test, reference)
        self.range_test_result = result
        self._auto_lr = result.lr
        log_dir = trainer.log_dir if trainer.loggers else None  # collective under DDP: call on every rank
        if trainer.is_global_zero:
            if log_dir is not None and self.range_test.save_plot:
                result.files = [str(p) for p in save_range_test(result, log_dir)]
            for logger in trainer.loggers:
                logger.log_metrics({"schedule/range_test_lr": result.lr}, step=trainer.global_step)
        rank_zero_info(f"{type(self).__name__}: {describe(result)}")
        if result.suggestion.minimum_at_end and not result.stopped_early:
            rank_zero_warn(
                f"{type(self).__name__}: the loss was still falling at the end of the LR range test "
                f"(lr={result.lrs[-1]:.3g}), so the chosen LR may be too low. Sweep further with "
                f"range_test=LRRangeTest(max_lr={self.range_test.max_lr * 10:g})."
            )
        return result.lr

    def _resume_from(self, state: dict[str, Any], total: int) -> None:
        shape = [len(o.param_groups) for o in self._optimizers]
        saved_shape = [len(p) for p in state["peak_lrs"]]
        if saved_shape != shape:
            raise ValueError(
                f"The checkpoint's {type(self).__name__} state was written for optimizers with param groups "
                f"{saved_shape}, but this run's optimizers have {shape}. Resume with the same "
                "configure_optimizers, or start the schedule afresh by not loading this checkpoint."
            )
        self._total = int(state["total_steps"])
        self._start = int(state.get("start_step", 0))
        self._steps = [int(s) for s in state["steps"]]
        self._peaks = [[float(v) for v in row] for row in state["peak_lrs"]]
        self._auto_lr = state.get("auto_lr")
        if self.total_steps is None:
            # A schedule that joined the run late covers the run's steps from its start on.
            total -= self._start
        resized = total != self._total and self.can_resize(max(self._steps), self._total, total)
        if resized:
            rank_zero_info(
                f"{type(self).__name__}: the checkpoint's schedule of {self._total} steps is in its stable phase "
                f"(step {max(self._steps)}), so it is resized to this run's {total} steps."
            )
            self.check_total_steps(total)
            self._total = total
        saved_settings = state.get("settings", {})
        changed = [
            f"{k}: {saved_settings[k]!r} -> {v!r}"
            for k, v in self.schedule_settings().items()
            if k in saved_settings and saved_settings[k] != v and not (resized and k == "total_steps")
        ]
        if changed:
            rank_zero_warn(
                f"{type(self).__name__}: this run's settings differ from the checkpoint's ({'; '.join(changed)}); "
                "the schedule continues exactly as checkpointed and the new values are ignored. Start a fresh "
                "run (load only the weights) to use them."
            )
        if self.total_steps is None and total != self._total:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint's schedule is {self._total} steps long but this run is "
                f"estimated at {total}{f' from step {self._start}, where the schedule began' if self._start else ''}; "
                f"the schedule continues as checkpointed ({self._total} steps)."
            )

    def _apply(self, index: int) -> None:
        # Past the end (a run longer than the schedule) every step uses the value after the last step, the
        # schedule's final LR.
        step = min(self._steps[index], self._total)
        use_beta1 = self._use_beta1[index]
        for group, peak, (base_m, max_m) in zip(
            self._optimizers[index].param_groups, self._peaks[index], self._momenta[index]
        ):
            lr, momentum = self.schedule_values(step, self._total, peak, base_m, max_m)
            _set_value(group, "lr", lr)
            if self.cycle_momentum:
                _set_momentum(group, use_beta1, momentum)

    def _apply_all(self) -> None:
        for i in range(len(self._optimizers)):
            self._apply(i)


class OneCycle(LRScheduleCallback):
    """The one-cycle policy (Smith & Topin, "Super-Convergence", 2018), stepped per optimizer step.

    Same parameters and values as ``torch.optim.lr_scheduler.OneCycleLR`` (the run length comes
    from the Trainer instead of ``total_steps``/``epochs``/``steps_per_epoch``)::

        trainer = L.Trainer(max_epochs=5, callbacks=[ls.OneCycle(max_lr=3e-3)])   # or max_lr="auto"

    Args:
        max_lr: peak LR (see :class:`LRScheduleCallback` for sequences, ``None`` and ``"auto"``).
        total_steps: schedule length; ``None`` takes ``trainer.estimated_stepping_batches``.
        pct_start: fraction of the run spent raising the LR, in (0, 1).
        anneal_strategy: ``"cos"`` or ``"linear"``.
        cycle_momentum: cycle momentum / ``betas[0]`` inversely to the LR (torch's default: True).
        base_momentum, max_momentum: momentum at the peak / at the start and end (``None``: 0.85 / 0.95);
            only with ``cycle_momentum=True``.
        div_factor: initial LR = max_lr / div_factor.
        final_div_factor: final LR = initial LR / final_div_factor.
        three_phase: torch's three-phase variant (up, symmetric down, then annihilation).
        range_test: settings of the LR range test for ``max_lr="auto"``.
        log_values: log the values under ``schedule/...``.

    Raises:
        ValueError: ``pct_start`` outside (0, 1), a non-positive LR or factor, momentum outside
            [0, 1), a momentum given with ``cycle_momentum=False``, an unknown ``anneal_strategy``,
            ``three_phase`` with ``pct_start > 0.5``; in
            ``setup``/``on_fit_start`` (before any step): an unbounded run, a module that also
            returns a scheduler, a run too short for the phases, or a diverging range test.
    """

    def __init__(
        self,
        max_lr: PeakLR,
        *,
        total_steps: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: AnnealStrategy = "cos",
        cycle_momentum: bool = True,
        base_momentum: Momentum | None = None,
        max_momentum: Momentum | None = None,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        range_test: LRRangeTest | None = None,
        log_values: bool = True,
    ) -> None:
        super().__init__(
            max_lr,
            total_steps=total_steps,
            cycle_momentum=cycle_momentum,
            base_momentum=base_momentum,
            max_momentum=max_momentum,
            range_test=range_test,
            log_values=log_values,
            peak_name="max_lr",
        )
        self.pct_start = check_fraction(
            "pct_start",
            pct_start,
            low_open=True,
            high_open=True,
            hint="It is the fraction of the run spent warming up.",
        )
        if anneal_strategy not in ANNEAL_STRATEGIES:
            raise ValueError(f"anneal_strategy must be one of {ANNEAL_STRATEGIES}, got {anneal_strategy!r}.")
        self.anneal_strategy = anneal_strategy
        self.div_factor = check_positive("div_factor", div_factor, "initial_lr = max_lr / div_factor.")
        self.final_div_factor = check_positive(
            "final_div_factor", final_div_factor, "min_lr = initial_lr / final_div_factor."
        )
        if not isinstance(three_phase, bool):
            raise ValueError(f"three_phase must be True or False, got {three_phase!r}.")
        if three_phase and self.pct_start > 0.5:
            raise ValueError(
                f"three_phase=True with pct_start={pct_start}: the LR rises for pct_start and falls back for "
                "another pct_start of the run, so pct_start must be at most 0.5."
            )
        self.three_phase = three_phase

    @property
    def max_lr(self) -> PeakLR:
        return self.peak_lr

    @override
    def schedule_settings(self) -> dict[str, Any]:
        return {
            **super().schedule_settings(),
            **{
                k: getattr(self, k)
                for k in (
                    "pct_start",
                    "anneal_strategy",
                    "div_factor",
                    "final_div_factor",
                    "three_phase",
                    "cycle_momentum",
                    "base_momentum",
                    "max_momentum",
                )
            },
        }

    @override
    def schedule_values(
        self, step: int, total_steps: int, peak_lr: float, base_momentum: float, max_momentum: float
    ) -> tuple[float, float]:
        return one_cycle(
            step,
            total_steps,
            max_lr=peak_lr,
            pct_start=self.pct_start,
            anneal_strategy=self.anneal_strategy,  # type: ignore[arg-type]
            div_factor=self.div_factor,
            final_div_factor=self.final_div_factor,
            three_phase=self.three_phase,
            base_momentum=base_momentum,
            max_momentum=max_momentum,
        )

    @override
    def check_total_steps(self, total_steps: int) -> None:
        check_one_cycle(total_steps, self.pct_start, self.three_phase)


class WarmupCosine(LRScheduleCallback):
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio * peak``, per optimizer step::

        trainer = L.Trainer(max_steps=5000, callbacks=[ls.WarmupCosine(peak_lr=1e-3, warmup=0.05)])

    Args:
        peak_lr: peak LR (see :class:`LRScheduleCallback`); ``None`` peaks at each group's own LR.
        warmup: fraction of the run spent warming up, in [0, 1).
        min_lr_ratio: the floor as a fraction of the peak, in [0, 1).
        total_steps, cycle_momentum, base_momentum, max_momentum, range_test, log_values: as in
            :class:`LRScheduleCallback` (momentum cycling is off by default here).
    """

    def __init__(
        self,
        peak_lr: PeakLR = None,
        *,
        warmup: float = 0.05,
        min_lr_ratio: float = 0.0,
        total_steps: int | None = None,
        cycle_momentum: bool = False,
        base_momentum: Momentum | None = None,
        max_momentum: Momentum | None = None,
        range_test: LRRangeTest | None = None,
        log_values: bool = True,
    ) -> None:
        super().__init__(
            peak_lr,
            total_steps=total_steps,
            cycle_momentum=cycle_momentum,
            base_momentum=base_momentum,
            max_momentum=max_momentum,
            range_test=range_test,
            log_values=log_values,
        )
        self.warmup = check_fraction(
            "warmup", warmup, low_open=False, high_open=True, hint="A fraction of the run."
        )
        self.min_lr_ratio = check_fraction(
            "min_lr_ratio",
            min_lr_ratio,
            low_open=False,
            high_open=True,
            hint="The floor as a fraction of the peak.",
        )

    @override
    def schedule_settings(self) -> dict[str, Any]:
        return {
            **super().schedule_settings(),
            **{
                k: getattr(self, k)
                for k in ("warmup", "min_lr_ratio", "cycle_momentum", "base_momentum", "max_momentum")
            },
        }

    @override
    def schedule_values(
        self, step: int, total_steps: int, peak_lr: float, base_momentum: float, max_momentum: float
    ) -> tuple[float, float]:
        fraction = warmup_cosine(step, total_steps, warmup=self.warmup, min_lr_ratio=self.min_lr_ratio)
        return peak_lr * fraction, inverse_momentum(fraction, base_momentum, max_momentum)

    @override
    def check_total_steps(self, total_steps: int) -> None:
        n_warmup = warmup_steps(total_steps, self.warmup)
        self._warn_if_no_step("warmup", self.warmup, n_warmup, total_steps, "the first step is at the peak")
        if n_warmup >= total_steps:
            rank_zero_warn(
                f"{type(self).__name__}: warmup={self.warmup:g} fills the whole {total_steps}-step run, so the LR "
                "never decays (it reaches the peak at the last step). Lengthen the run or lower warmup."
            )


class WarmupStableDecay(LRScheduleCallback):
    """Warmup, a long constant phase at the peak, then a short decay (the WSD / trapezoidal schedule)::

        trainer = L.Trainer(max_steps=5000, callbacks=[ls.WarmupStableDecay(peak_lr=1e-3, warmup=0.02, decay=0.2)])

    Args:
        peak_lr: peak LR (see :class:`LRScheduleCallback`); ``None`` peaks at each group's own LR.
        warmup: fraction of the run spent warming up, in [0, 1).
        decay: fraction of the run spent decaying at the end, in [0, 1]; ``warmup + decay <= 1``.
        decay_shape: ``"1-sqrt"`` (default; best in Hägele et al. 2024), ``"linear"`` or ``"cosine"``.
        min_lr_ratio: the floor as a fraction of the peak, in [0, 1).
        total_steps, cycle_momentum, base_momentum, max_momentum, range_test, log_values: as in
            :class:`LRScheduleCallback` (momentum cycling is off by default here).
    """

    def __init__(
        self,
        peak_lr: PeakLR = None,
        *,
        warmup: float = 0.02,
        decay: float = 0.2,
        decay_shape: DecayShape = "1-sqrt",
        min_lr_ratio: float = 0.0,
        total_steps: int | None = None,
        cycle_momentum: bool = False,
        base_momentum: Momentum | None = None,
        max_momentum: Momentum | None = None,
        range_test: LRRangeTest | None = None,
        log_values: bool = True,
    ) -> None:
        super().__init__(
            peak_lr,
            total_steps=total_steps,
            cycle_momentum=cycle_momentum,
            base_momentum=base_momentum,
            max_momentum=max_momentum,
            range_test=range_test,
            log_values=log_values,
        )
        check_wsd_fractions(warmup, decay)
        self.warmup, self.decay = float(warmup), float(decay)
        if decay_shape not in DECAY_SHAPES:
            raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, got {decay_shape!r}.")
        self.decay_shape = decay_shape
        self.min_lr_ratio = check_fraction(
            "min_lr_ratio",
            min_lr_ratio,
            low_open=False,
            high_open=True,
            hint="The floor as a fraction of the peak.",
        )

    @override
    def schedule_settings(self) -> dict[str, Any]:
        return {
            **super().schedule_settings(),
            **{
                k: getattr(self, k)
                for k in (
                    "warmup",
                    "decay",
                    "decay_shape",
                    "min_lr_ratio",
                    "cycle_momentum",
                    "base_momentum",
                    "max_momentum",
                )
            },
        }

    @override
    def schedule_values(
        self, step: int, total_steps: int, peak_lr: float, base_momentum: float, max_momentum: float
    ) -> tuple[float, float]:
        fraction = warmup_stable_decay(
            step,
            total_steps,
            warmup=self.warmup,
            decay=self.decay,
            decay_shape=self.decay_shape,  # type: ignore[arg-type]
            min_lr_ratio=self.min_lr_ratio,
        )
        return peak_lr * fraction, inverse_momentum(fraction, base_momentum, max_momentum)

    @override
    def can_resize(self, step: int, saved_total: int, total: int) -> bool:
        # The LR of every step so far and of the next is the peak under both lengths.
        for length in (saved_total, total):
            n_warmup, n_decay = wsd_phase_steps(length, self.warmup, self.decay)
            if not n_warmup <= step < length - n_decay:
                return False
        return True

    @override
    def check_total_steps(self, total_steps: int) -> None:
        n_warmup, n_decay = wsd_phase_steps(total_steps, self.warmup, self.decay)
        self._warn_if_no_step("warmup", self.warmup, n_warmup, total_steps, "the first step is at the peak")
        self._warn_if_no_step(
            "decay", self.decay, n_decay, total_steps, "the LR stays at the peak to the end of the run"
        )
