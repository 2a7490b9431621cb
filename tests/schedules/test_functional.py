"""The pure schedule functions: bit-exact one-cycle, warmup schedules, the range-test rule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from lightning_speedup.schedules.functional import (
    centered_moving_average,
    check_one_cycle,
    exponential_lrs,
    inverse_momentum,
    one_cycle,
    select_lr,
    warmup_cosine,
    warmup_stable_decay,
)


@pytest.mark.parametrize(
    ("total", "pct", "anneal", "three", "kind"),
    list(
        itertools.product([7, 40, 333], [0.05, 0.3, 0.45], ["cos", "linear"], [False, True], ["sgd", "adam"])
    ),
)
def test_one_cycle_is_bit_identical_to_torch(
    total: int, pct: float, anneal: str, three: bool, kind: str
) -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9) if kind == "sgd" else torch.optim.Adam([p], lr=0.1)
    kw = {"pct_start": pct, "anneal_strategy": anneal, "three_phase": three, "div_factor": 17.0}
    kw |= {"final_div_factor": 333.0, "base_momentum": 0.8, "max_momentum": 0.93}
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.37, total_steps=total, **kw)
    for step in range(total):
        group = opt.param_groups[0]
        momentum = group["momentum"] if kind == "sgd" else group["betas"][0]
        assert one_cycle(step, total, max_lr=0.37, **kw) == (group["lr"], momentum), step  # type: ignore[arg-type]
        opt.step()
        sched.step()


@pytest.mark.parametrize("anneal", ["cos", "linear"])
@pytest.mark.parametrize("pct", [0.05, 0.1, 0.25, 0.3, 0.45])
def test_short_three_phase_runs_are_accepted_and_match_torch(pct: float, anneal: str) -> None:
    """With pct_start * T < 1 the first two of three phases end before step 0 and torch skips both; the check
    used to excuse only the first and refused runs (T up to 19 here) that torch schedules within range."""
    for total in range(1, 20):
        if pct * total == 1:
            continue  # torch divides by zero there; refused (test_one_cycle_shape_and_errors)
        check_one_cycle(total, pct, True)
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
        kw = {"pct_start": pct, "anneal_strategy": anneal, "three_phase": True}
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.7, total_steps=total, **kw)
        for step in range(total):
            group = opt.param_groups[0]
            assert one_cycle(step, total, max_lr=0.7, **kw) == (group["lr"], group["momentum"]), (total, step)  # type: ignore[arg-type]
            assert 0.7 / 25 / 1e4 <= group["lr"] <= 0.7
            opt.step()
            if step < total - 1:
                sched.step()


def test_one_cycle_shape_and_errors() -> None:
    lr0, m0 = one_cycle(0, 100, max_lr=1.0)
    assert lr0 == pytest.approx(1 / 25) and m0 == pytest.approx(0.95)
    peak = max(range(100), key=lambda t: one_cycle(t, 100)[0])
    assert peak == 29 and one_cycle(29, 100)[1] == pytest.approx(0.85)
    assert one_cycle(99, 100)[0] == pytest.approx(1 / 25 / 1e4)
    with pytest.raises(ValueError, match="length 0"):
        check_one_cycle(10, 0.1, False)  # pct_start * T == 1: torch divides by zero here
    with pytest.raises(ValueError, match=r"pct_start must be below 0\.5"):
        check_one_cycle(100, 0.6, True)
    with pytest.raises(ValueError, match="step must be an integer"):
        one_cycle(101, 100)
    with pytest.raises(ValueError, match="anneal_strategy"):
        one_cycle(0, 100, anneal_strategy="exp")  # type: ignore[arg-type]


def test_warmup_cosine_values() -> None:
    total, w = 100, 10
    values = [warmup_cosine(t, total, warmup=0.1, min_lr_ratio=0.1) for t in range(total + 1)]
    assert values[0] == pytest.approx(1 / w) and values[w - 1] == 1.0 and values[w] == 1.0
    assert all(a < b for a, b in itertools.pairwise(values[:w]))  # rising warmup
    assert all(a > b for a, b in itertools.pairwise(values[w:]))  # strictly falling cosine
    assert values[total] == pytest.approx(0.1) and values[total - 1] > 0.1  # floor only after the last step
    mid = w + (total - w) // 2
    assert values[mid] == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(0, 50, warmup=0.0) == 1.0


@pytest.mark.parametrize(
    ("shape", "half"), [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))]
)
def test_warmup_stable_decay_values(shape: str, half: float) -> None:
    total = 200  # warmup 4 steps, stable to step 159, decay over the last 40
    f = [warmup_stable_decay(t, total, warmup=0.02, decay=0.2, decay_shape=shape) for t in range(total + 1)]  # type: ignore[arg-type]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert set(f[4:161]) == {1.0}
    assert f[160 + 20] == pytest.approx(half)
    assert f[total] == pytest.approx(0.0) and f[total - 1] > 0
    assert all(a >= b for a, b in itertools.pairwise(f[160:]))
    with pytest.raises(ValueError, match=r"warmup \+ decay must be at most 1"):
        warmup_stable_decay(0, 10, warmup=0.5, decay=0.6)


def test_short_runs_and_empty_phases_give_a_value_at_every_step() -> None:
    """Where a phase rounds to no step (a short run, ``decay=0``, a warmup that fills the run) each function still
    gives a finite fraction in (0, 1] at every step, the step after the last included (a clamped overrun uses it)."""
    fractions = [0.0, 0.01, 0.1, 0.2, 0.49, 0.5, 0.9, 0.99]
    for total in range(1, 25):
        for step in range(total + 1):
            for w in fractions:
                assert 0 < warmup_cosine(step, total, warmup=w, min_lr_ratio=0.1) <= 1
                for d in (d for d in fractions if w + d <= 1):
                    assert 0 < warmup_stable_decay(step, total, warmup=w, decay=d, min_lr_ratio=0.1) <= 1
    # decay=0 (or a decay too short to get a step): the peak to the end, the step after the last included
    assert [warmup_stable_decay(t, 5, warmup=0.0, decay=0.0) for t in range(6)] == [1.0] * 6
    assert [warmup_stable_decay(t, 2, warmup=0.0, decay=0.2) for t in range(3)] == [1.0] * 3
    # a warmup that fills the run: the peak at the last step, then the floor
    assert [warmup_cosine(t, 4, warmup=0.9, min_lr_ratio=0.1) for t in range(5)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0, 0.1]
    )


def test_inverse_momentum() -> None:
    assert inverse_momentum(0.0, 0.85, 0.95) == 0.95
    assert inverse_momentum(1.0, 0.85, 0.95) == pytest.approx(0.85)


def test_select_lr_on_a_known_curve() -> None:
    lrs = exponential_lrs(1e-6, 10.0, 100)
    assert lrs[0] == 1e-6 and lrs[-1] == pytest.approx(10.0)
    # A loss that falls as log(lr) grows, bottoms out at lr = 1e-2 and then blows up.
    losses = [2.0 - 0.2 * min(math.log10(lr) + 6, 4) + 3.0 * max(0.0, math.log10(lr) + 2) ** 2 for lr in lrs]
    s = select_lr(lrs, losses)
    assert s.lr_at_minimum == pytest.approx(1e-2, rel=0.5)
    assert s.lr == pytest.approx(s.lr_at_minimum / 2) and s.rule == "minimum/2"
    assert s.lr_steepest < s.lr_at_minimum and s.lr_valley < s.lr_at_minimum
    assert select_lr(lrs, losses, rule="valley").lr == s.lr_valley
    assert select_lr(lrs, losses, rule="minimum", divisor=10).lr == pytest.approx(s.lr_at_minimum / 10)
    with pytest.raises(ValueError, match="finite"):
        select_lr(lrs, [*losses[:-1], math.nan])


def test_centered_moving_average_has_no_lag() -> None:
    values = [float((i - 50) ** 2) for i in range(101)]
    smoothed = centered_moving_average(values, 11)
    assert min(range(101), key=smoothed.__getitem__) == 50
    assert smoothed[0] == values[0] and smoothed[-1] == values[-1]
