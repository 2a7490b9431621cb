"""Learning-rate and momentum schedules as pure functions of (step, total_steps); no Lightning here.

Convention for every schedule: optimizer step ``t`` (0-based) of a run of ``T`` steps uses the value
at ``t``; ``t == T`` is accepted (it is the value after the last step, which no step uses).

* :func:`one_cycle` reproduces ``torch.optim.lr_scheduler.OneCycleLR`` (Smith & Topin, "Super-
  Convergence", 2018; two-phase default from fastai) operation for operation, so its LR and
  momentum are bit-identical to torch's at every step.
* :func:`warmup_cosine`: linear warmup, then cosine decay to a floor (Loshchilov & Hutter, SGDR,
  2017; Goyal et al., "Accurate, Large Minibatch SGD", 2017 for the warmup).
* :func:`warmup_stable_decay`: linear warmup, constant, then a short decay (Hu et al., MiniCPM,
  2024; Hägele et al., "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
  Durations", 2024, who find the ``1-sqrt`` cooldown best).
* :func:`select_lr` and friends: the selection rule of the LR range test (Smith, "Cyclical
  Learning Rates", 2017), applied to a recorded (lr, loss) curve.

The warmup schedules return the LR as a *fraction of the peak*; multiply by each param group's
peak LR. Warmup reaches the peak on its last step; decay phases start at the peak and approach the
floor, reaching it at ``t == T``, so no step is spent at LR 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from lightning_speedup._validation import check_float

AnnealStrategy = Literal["cos", "linear"]
DecayShape = Literal["linear", "cosine", "1-sqrt"]
SelectionRule = Literal["minimum", "valley", "steepest"]

ANNEAL_STRATEGIES: tuple[str, ...] = ("cos", "linear")
DECAY_SHAPES: tuple[str, ...] = ("linear", "cosine", "1-sqrt")
SELECTION_RULES: tuple[str, ...] = ("minimum", "valley", "steepest")


# ----------------------------------------------------------------------------------------------
# validation helpers (shared with the callbacks so the messages are the same everywhere)
# ----------------------------------------------------------------------------------------------


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_positive(name: str, value: object, hint: str = "") -> float:
    """Return ``value`` as a float if it is a finite real number > 0, else raise ``ValueError``."""
    return check_float(name, value, 0, hint=hint)


def check_fraction(name: str, value: object, *, low_open: bool, high_open: bool, hint: str = "") -> float:
    """Return ``value`` as a float if it lies in the interval [0, 1] with the given open ends."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    ok = _is_real(value) and math.isfinite(value)  # type: ignore[arg-type]
    if ok:
        v = float(value)  # type: ignore[arg-type]
        ok = (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1)
    if not ok:
        raise ValueError(f"{name} must be in {lo}0, 1{hi}, got {value!r}.{' ' + hint if hint else ''}")
    return float(value)  # type: ignore[arg-type]


def check_momentum(name: str, value: object) -> float:
    """Momentum and Adam's beta1 must lie in [0, 1)."""
    return check_fraction(name, value, low_open=False, high_open=True, hint="Typical values: 0.85 to 0.95.")


def _check_step(step: int, total_steps: int) -> None:
    if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}.")
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= total_steps:
        raise ValueError(f"step must be an integer in [0, total_steps={total_steps}], got {step!r}.")


# ----------------------------------------------------------------------------------------------
# one-cycle (torch.optim.lr_scheduler.OneCycleLR, reproduced exactly)
# ----------------------------------------------------------------------------------------------


def anneal_cos(start: float, end: float, pct: float) -> float:
    """Cosine anneal from ``start`` to ``end`` as ``pct`` goes 0 -> 1 (same float ops as torch)."""
    cos_out = math.cos(math.pi * pct) + 1
    return end + (start - end) / 2.0 * cos_out


def anneal_linear(start: float, end: float, pct: float) -> float:
    """Linear anneal from ``start`` to ``end`` as ``pct`` goes 0 -> 1 (same float ops as torch)."""
    return (end - start) * pct + start


@dataclass(frozen=True)
class _Phase:
    end_step: float
    start_lr: str
    end_lr: str
    start_momentum: str
    end_momentum: str


def _one_cycle_phases(total_steps: int, pct_start: float, three_phase: bool) -> list[_Phase]:
    # The end steps are computed exactly as OneCycleLR.__init__ does (floats, minus 1 or 2).
    if three_phase:
        return [
            _Phase(float(pct_start * total_steps) - 1, "initial", "max", "max_m", "base_m"),
            _Phase(float(2 * pct_start * total_steps) - 2, "max", "initial", "base_m", "max_m"),
            _Phase(total_steps - 1, "initial", "min", "max_m", "max_m"),
        ]
    return [
        _Phase(float(pct_start * total_steps) - 1, "initial", "max", "max_m", "base_m"),
        _Phase(total_steps - 1, "max", "min", "base_m", "max_m"),
    ]


def check_one_cycle(total_steps: int, pct_start: float, three_phase: bool) -> None:
    """Raise ``ValueError`` if a one-cycle phase of this run has zero or negative length.

    ``OneCycleLR`` divides by each phase's length; with a zero-length phase it raises
    ``ZeroDivisionError`` mid-training, and with a negative one (three-phase, ``pct_start`` > 0.5)
    it produces LRs outside [min_lr, max_lr]. Checking up front turns both into a clear error.
    """
    _check_step(0, total_steps)
    phases = _one_cycle_phases(total_steps, pct_start, three_phase)
    start = 0.0
    for i, phase in enumerate(phases):
        # torch gives each step the first phase that ends at or after it, so a phase that ends before step 0 (in a
        # short run the first, or the first two of three) is never used; the next one starts where it ended.
        skipped = phase.end_step < 0
        if not skipped and phase.end_step - start <= 0:
            raise ValueError(
                f"One-cycle phase {i + 1} of {len(phases)} has length {phase.end_step - start:g} steps for "
                f"total_steps={total_steps}, pct_start={pct_start}, three_phase={three_phase}. "
                + (
                    "With three_phase=True, pct_start must be below 0.5. "
                    if three_phase and 2 * pct_start >= 1
                    else ""
                )
                + "Change pct_start (so that pct_start * total_steps != 1) or train for more steps."
            )
        start = phase.end_step


def one_cycle(
    step: int,
    total_steps: int,
    *,
    max_lr: float = 1.0,
    pct_start: float = 0.3,
    anneal_strategy: AnnealStrategy = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
) -> tuple[float, float]:
    """LR and momentum of the one-cycle policy at ``step`` of ``total_steps``.

    Identical, bit for bit, to ``torch.optim.lr_scheduler.OneCycleLR`` with the same arguments:
    the LR starts at ``max_lr / div_factor``, rises to ``max_lr`` over ``pct_start`` of the run and
    anneals to ``max_lr / div_factor / final_div_factor``; momentum moves inversely between
    ``max_momentum`` and ``base_momentum``. With ``max_lr=1`` the LR is a multiplier. At
    ``step == total_steps`` (after the last step; torch's scheduler raises there) it gives the final values.

    Raises:
        ValueError: ``step`` outside [0, total_steps], an unknown ``anneal_strategy``, or a
            zero-length phase (see :func:`check_one_cycle`).
    """
    _check_step(step, total_steps)
    if anneal_strategy == "cos":
        anneal = anneal_cos
    elif anneal_strategy == "linear":
        anneal = anneal_linear
    else:
        raise ValueError(f"anneal_strategy must be one of {ANNEAL_STRATEGIES}, got {anneal_strategy!r}.")
    initial_lr = max_lr / div_factor
    values = {
        "initial": initial_lr,
        "max": max_lr,
        "min": initial_lr / final_div_factor,
        "max_m": max_momentum,
        "base_m": base_momentum,
    }
    phases = _one_cycle_phases(total_steps, pct_start, three_phase)
    start_step = 0.0
    for i, phase in enumerate(phases):
        end_step = phase.end_step
        if step <= end_step or i == len(phases) - 1:
            if end_step == start_step:
                check_one_cycle(total_steps, pct_start, three_phase)  # raises with the explanation
            # step == total_steps (after the last step, which torch's scheduler never reaches) is the final value,
            # not an extrapolation past it (which for "linear" would be a negative LR).
            pct = min((step - start_step) / (end_step - start_step), 1.0)
            lr = anneal(values[phase.start_lr], values[phase.end_lr], pct)
            momentum = anneal(values[phase.start_momentum], values[phase.end_momentum], pct)
            return lr, momentum
        start_step = phase.end_step
    raise AssertionError("unreachable: the last phase always matches")  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# warmup + cosine, warmup-stable-decay
# ----------------------------------------------------------------------------------------------


def warmup_steps(total_steps: int, warmup: float) -> int:
    """Number of warmup steps: ``warmup`` (a fraction of the run) rounded half up to whole steps."""
    return math.floor(warmup * total_steps + 0.5)


def _linear_warmup(step: int, n_warmup: int) -> float:
    # (t + 1) / W: the first step already moves (no step at LR 0) and step W - 1 reaches the peak.
    return (step + 1) / n_warmup


def warmup_cosine(step: int, total_steps: int, *, warmup: float = 0.05, min_lr_ratio: float = 0.0) -> float:
    """LR as a fraction of the peak: linear warmup over ``warmup`` of the run, then cosine to a floor.

    The floor is ``min_lr_ratio`` times the peak, reached at ``step == total_steps``. Where the warmup rounds to
    the whole run (a short run), the cosine phase is empty: the warmup reaches the peak at the last step and the
    value after it is the floor.

    Raises:
        ValueError: ``step`` outside [0, total_steps], ``warmup`` outside [0, 1) or
            ``min_lr_ratio`` outside [0, 1).
    """
    _check_step(step, total_steps)
    check_fraction("warmup", warmup, low_open=False, high_open=True)
    check_fraction("min_lr_ratio", min_lr_ratio, low_open=False, high_open=True)
    n_warmup = warmup_steps(total_steps, warmup)
    if step < n_warmup:
        return _linear_warmup(step, n_warmup)
    n_cosine = total_steps - n_warmup
    progress = (step - n_warmup) / n_cosine if n_cosine else 1.0
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_shape_value(shape: DecayShape, progress: float) -> float:
    """Fraction of the (peak - floor) range left after ``progress`` in [0, 1] of a decay phase."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    raise ValueError(f"decay_shape must be one of {DECAY_SHAPES}, got {shape!r}.")


def warmup_stable_decay(
    step: int,
    total_steps: int,
    *,
    warmup: float = 0.02,
    decay: float = 0.2,
    decay_shape: DecayShape = "1-sqrt",
    min_lr_ratio: float = 0.0,
) -> float:
    """LR as a fraction of the peak: linear warmup, constant at the peak, then decay to a floor.

    ``warmup`` and ``decay`` are fractions of the run (rounded half up to whole steps); the decay
    takes the last ``decay`` of the run with shape ``"linear"``, ``"cosine"`` or ``"1-sqrt"``. Where the decay
    rounds to no step (``decay=0``, or a run too short for it), the LR stays at the peak to the end.

    Raises:
        ValueError: ``step`` outside [0, total_steps], ``warmup``/``decay``/``min_lr_ratio`` out
            of range, ``warmup + decay > 1`` or an unknown ``decay_shape``.
    """
    _check_step(step, total_steps)
    check_wsd_fractions(warmup, decay)
    check_fraction("min_lr_ratio", min_lr_ratio, low_open=False, high_open=True)
    n_warmup, n_decay = wsd_phase_steps(total_steps, warmup, decay)
    decay_start = total_steps - n_decay
    if step < n_warmup:
        return _linear_warmup(step, n_warmup)
    if step < decay_start or n_decay == 0:
        return 1.0
    progress = (step - decay_start) / n_decay
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay_shape_value(decay_shape, progress)


def wsd_phase_steps(total_steps: int, warmup: float, decay: float) -> tuple[int, int]:
    """Steps of a warmup-stable-decay run's warmup and decay: each fraction rounded half up to whole steps.
    Rounding both up can overshoot the run by one step; the warmup gives way."""
    n_decay = warmup_steps(total_steps, decay)
    return min(warmup_steps(total_steps, warmup), total_steps - n_decay), n_decay


def check_wsd_fractions(warmup: float, decay: float) -> None:
    """Validate the warmup and decay fractions of a warmup-stable-decay schedule."""
    check_fraction("warmup", warmup, low_open=False, high_open=True)
    check_fraction("decay", decay, low_open=False, high_open=False)
    if warmup + decay > 1:
        raise ValueError(
            f"warmup + decay must be at most 1 (they are fractions of the same run), got "
            f"warmup={warmup} + decay={decay} = {warmup + decay:g}. Shorten one of them; typical values "
            "are warmup=0.02 and decay=0.1 to 0.2."
        )


def inverse_momentum(lr_fraction: float, base_momentum: float, max_momentum: float) -> float:
    """Momentum moving inversely to the LR: ``max_momentum`` at LR 0, ``base_momentum`` at the peak."""
    return max_momentum - (max_momentum - base_momentum) * lr_fraction


# ----------------------------------------------------------------------------------------------
# LR range test: sweep and selection rule
# ----------------------------------------------------------------------------------------------


def exponential_lrs(min_lr: float, max_lr: float, num_steps: int) -> list[float]:
    """``num_steps`` LRs from ``min_lr`` to ``max_lr``, evenly spaced in log space."""
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}.")
    ratio = max_lr / min_lr
    return [min_lr * ratio ** (i / (num_steps - 1)) for i in range(num_steps)]


def centered_moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centered moving average; the window shrinks symmetrically at the ends.

    Centered rather than an exponential average: the curve is analysed after the sweep, so there
    is no reason to accept the lag of a causal filter, which would move the minimum to larger LRs.
    """
    half = max(0, window // 2)
    n = len(values)
    out: list[float] = []
    for i in range(n):
        h = min(half, i, n - 1 - i)
        chunk = values[i - h : i + h + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _valley_index(losses: Sequence[float]) -> int:
    # fastai's "valley" (lr_find suggestion since v2.5): the longest strictly decreasing run of the
    # smoothed curve (as a longest decreasing subsequence), then a point half-way down it.
    n = len(losses)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return min(n - 1, max(0, max_start + int(sections) + int(sections / 2)))


@dataclass(frozen=True)
class LRSuggestion:
    """The outcome of :func:`select_lr`: the chosen LR and every candidate it was chosen from."""

    lr: float
    rule: str
    lr_at_minimum: float
    lr_steepest: float
    lr_valley: float
    index_minimum: int
    smoothed: list[float] = field(repr=False)
    minimum_at_end: bool = False


def select_lr(
    lrs: Sequence[float],
    losses: Sequence[float],
    *,
    rule: SelectionRule = "minimum",
    divisor: float = 2.0,
    window: int | None = None,
) -> LRSuggestion:
    """Pick a peak LR from a range-test curve.

    The curve is smoothed with a centered moving average over ``window`` points (default: a tenth
    of the curve, odd, at least 3). Rules:

    * ``"minimum"`` (default): the LR at the smoothed loss minimum divided by ``divisor`` (2).
      The minimum marks where larger steps stop paying off; a schedule that spends many steps near
      its peak wants some margin below it. /2 was chosen on the device (docs/methods/lr-schedules.md):
      over 3 seeds it landed on the best of 5 max_lr values (1/4x to 4x) for Fashion-MNIST by mean
      accuracy and at half the best for the char-LM; /4 was 4x too low for the LM, and fastai's /10
      (on a lagging EMA) lower still.
    * ``"valley"``: fastai's valley rule, half-way down the longest descent.
    * ``"steepest"``: the steepest descent of the smoothed loss against log LR (Lightning's rule).

    Raises:
        ValueError: mismatched or too short inputs, non-finite losses, an unknown rule.
    """
    if len(lrs) != len(losses) or len(lrs) < 3:
        raise ValueError(
            f"Need matching lrs and losses with at least 3 points, got {len(lrs)} and {len(losses)}."
        )
    if not all(math.isfinite(v) for v in losses):
        raise ValueError("select_lr needs finite losses; cut the curve before the first non-finite loss.")
    if rule not in SELECTION_RULES:
        raise ValueError(f"rule must be one of {SELECTION_RULES}, got {rule!r}.")
    check_positive("divisor", divisor)
    n = len(lrs)
    if window is None:
        window = max(3, (n // 10) | 1)
    smoothed = centered_moving_average(list(losses), window)
    i_min = min(range(n), key=smoothed.__getitem__)
    # Steepest descent of loss vs log(lr) up to the minimum (central differences).
    logs = [math.log(v) for v in lrs]
    best_slope, i_steep = math.inf, 0
    for i in range(1, max(2, i_min + 1)):
        lo, hi = max(0, i - 1), min(n - 1, i + 1)
        slope = (smoothed[hi] - smoothed[lo]) / (logs[hi] - logs[lo])
        if slope < best_slope:
            best_slope, i_steep = slope, i
    i_valley = _valley_index(smoothed)
    if rule == "minimum":
        lr = lrs[i_min] / divisor
    elif rule == "valley":
        lr = lrs[i_valley]
    else:
        lr = lrs[i_steep]
    return LRSuggestion(
        lr=float(lr),
        rule=rule if rule != "minimum" else f"minimum/{divisor:g}",
        lr_at_minimum=float(lrs[i_min]),
        lr_steepest=float(lrs[i_steep]),
        lr_valley=float(lrs[i_valley]),
        index_minimum=i_min,
        smoothed=smoothed,
        minimum_at_end=i_min >= n - 1 - window // 2,
    )
