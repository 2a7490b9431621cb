"""The one integer check every constructor uses, and the messages it gives at a few call sites."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import lightning_speedup as ls
from lightning_speedup._validation import check_int
from lightning_speedup.pipeline import PipelineStrategy


def test_check_int_accepts_ints_at_or_above_the_minimum() -> None:
    assert check_int("n", 3, 1) == 3
    assert check_int("n", 0, 0) == 0
    assert check_int("n", None, 1, allow_none=True) is None


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_int("n", 0, 1), "n must be an int >= 1, got 0."),
        (lambda: check_int("n", True, 0), "n must be an int >= 0, got True."),  # bool is not a count
        (lambda: check_int("n", 2.0, 1), "n must be an int >= 1, got 2.0."),
        (lambda: check_int("n", None, 1), "n must be an int >= 1, got None."),
        (lambda: check_int("n", -1, 0, allow_none=True), "n must be an int >= 0 or None, got -1."),
        (
            lambda: check_int("n", 0, 1, "steps", prefix="Op: ", hint="Try 2."),
            "Op: n must be an int >= 1 (steps), got 0. Try 2.",
        ),
    ],
)
def test_check_int_message(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: ls.augment.RandomCrop(28, padding=-1),
            r"^RandomCrop: padding must be an int >= 0, got -1\.$",
        ),
        (lambda: ls.augment.Cutout(True), r"^Cutout: size must be an int >= 1, got True\.$"),
        (lambda: ls.DataStallMonitor(window=0), r"^window must be an int >= 1, got 0\.$"),
        (lambda: ls.GPUPrefetcher(depth=0), r"\(the number of batches copied ahead\), got 0\. depth=2 hides"),
        (lambda: ls.AsyncProgressBarMetrics(max_lag=1.5), r"max_lag must be an int >= 1 \(copies in flight"),
        (lambda: ls.LocalSGDStrategy(sync_every=True), r"sync_every must be an int >= 1 \(optimizer steps"),
        (
            lambda: PipelineStrategy(metrics_every=-1),
            r"metrics_every must be an int >= 0 \(0 = off\), got -1",
        ),
    ],
)
def test_constructors_share_the_message(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()
