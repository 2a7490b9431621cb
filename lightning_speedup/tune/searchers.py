"""Searchers and schedulers by name, with the defaults a sweep of a few dozen Lightning trials needs.

* ``"bayes"``: Gaussian-process Bayesian optimisation, Optuna's ``GPSampler`` (log expected
  improvement, Matérn-5/2 kernel; Snoek et al., 2012; Akiba et al., 2019) through Ray's
  ``OptunaSearch``. It conditions each suggestion on every finished trial and models running ones,
  but is sequential at heart: its default concurrency is small (see :func:`default_concurrency`).
* ``"tpe"``: Optuna's multivariate Tree-structured Parzen Estimator (Bergstra et al., 2011) with the
  constant-liar strategy for parallel trials.
* ``"random"``: Ray's ``BasicVariantGenerator`` (random sampling; also runs ``tune.grid_search``).

Both model-based searchers start with ``n_initial`` random trials. ``"asha"`` is Ray's
``ASHAScheduler`` (Li et al., 2020) on the fraction of its step budget a trial has done
(``budget_fraction``), with rungs at 1/16 and 1/4 of the budget and ``max_t`` the whole budget.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

from lightning_speedup.tune.callback import BUDGET_KEY
from lightning_speedup.tune.space import SEARCHERS

log = logging.getLogger(__name__)

SCHEDULERS = ("asha", None)


def check_searcher(searcher: Any) -> None:
    """Raise for a searcher that is neither a known name nor a Ray ``Searcher``."""
    if isinstance(searcher, Searcher):
        return
    if searcher not in SEARCHERS:
        raise ValueError(
            f"Unknown searcher {searcher!r}; choose one of {list(SEARCHERS)} or pass a "
            "ray.tune.search.Searcher instance."
        )


def check_scheduler(scheduler: Any) -> None:
    """Raise for a scheduler that is neither a known name, ``None``, nor a Ray ``TrialScheduler``."""
    if isinstance(scheduler, TrialScheduler):
        return
    if scheduler not in SCHEDULERS:
        raise ValueError(
            f"Unknown scheduler {scheduler!r}; choose 'asha', None (run every trial to the end) or pass a "
            "ray.tune.schedulers.TrialScheduler instance."
        )


def check_searcher_dependencies(searcher: Any) -> None:
    """Raise ``ImportError`` early when the searcher's optional dependency is missing."""
    if searcher == "bayes":
        try:
            import scipy  # noqa: F401  (Optuna's GPSampler fits its kernel with scipy.optimize)
        except ImportError as err:
            raise ImportError(
                "searcher='bayes' uses Optuna's GPSampler, which needs scipy: pip install scipy (or "
                "pip install 'lightning-speedup[tune]'). searcher='tpe' and 'random' work without it."
            ) from err


def check_searcher_settings(
    searcher: str | Searcher,
    num_samples: int,
    n_initial: int | None,
    seed: int | None,
    max_concurrent: int | None,
) -> None:
    """Warn about a setting the searcher does nothing with, raise for one that contradicts it.

    Raises:
        ValueError: ``max_concurrent`` differs from that of a ``ConcurrencyLimiter`` passed as the searcher.
    """
    instance = type(searcher).__name__ if isinstance(searcher, Searcher) else None
    limit = searcher.max_concurrent if isinstance(searcher, ConcurrencyLimiter) else None
    if limit is not None and max_concurrent is not None and max_concurrent != limit:
        raise ValueError(
            f"max_concurrent={max_concurrent}, but the searcher is a ConcurrencyLimiter with "
            f"max_concurrent={limit}, which decides. Leave max_concurrent out, or pass the searcher "
            "without the limiter (tune_lightning wraps a Searcher in one with max_concurrent)."
        )
    if n_initial is not None and (instance or searcher == "random"):
        where = (
            f"a Searcher instance ({instance}): set its random start where you create it"
            if instance
            else "searcher='random'"
        )
        log.warning(
            "n_initial=%d does nothing with %s. It sets how many random trials searcher='bayes' or 'tpe' "
            "run before their model is used.",
            n_initial, where,
        )  # fmt: skip
    if searcher in ("bayes", "tpe"):
        n = n_initial if n_initial is not None else default_n_initial(num_samples)
        if n >= num_samples:
            log.warning(
                "searcher=%r with %s=%d and num_samples=%d: all %d trials are random, the model is never used. "
                "Lower n_initial below num_samples, raise num_samples, or use searcher='random'.",
                searcher, "n_initial" if n_initial is not None else "the default n_initial", n,
                num_samples, num_samples,
            )  # fmt: skip
    if seed is not None and instance:
        log.warning(
            "seed=%d seeds every trial but not the searcher instance (%s), which draws from its own random "
            "state: seed it where you create it, e.g. OptunaSearch(sampler=optuna.samplers.TPESampler(seed=...)).",
            seed, instance,
        )  # fmt: skip


def default_n_initial(num_samples: int) -> int:
    """Random trials before the model-based searchers model anything: a quarter of the budget, 2 to 10."""
    return max(2, min(10, num_samples // 4))


def default_concurrency(searcher: Any, num_samples: int, slots: int) -> int:
    """Trials run at once when the user does not say.

    A suggestion made while ``c`` trials run cannot use their results, so model-based search loses
    information as ``c`` grows. ``"bayes"`` runs at most ``num_samples // 8`` at once (4 of 32), ``"tpe"``
    (constant liar) ``num_samples // 4``; ``"random"`` loses nothing and fills the cluster. Never more
    than the cluster's ``slots``: a suggested trial that waits for resources is a suggestion made early.
    """
    if searcher == "bayes":
        wanted = max(1, num_samples // 8)
    elif searcher == "tpe":
        wanted = max(1, num_samples // 4)
    else:
        wanted = slots
    return max(1, min(wanted, slots))


def make_searcher(
    searcher: str | Searcher, seed: int | None, n_initial: int, max_concurrent: int
) -> Searcher | ConcurrencyLimiter | BasicVariantGenerator:
    """The Ray search algorithm for a name, running at most ``max_concurrent`` trials at once.

    A ``Searcher`` instance is wrapped in a ``ConcurrencyLimiter`` (unless it is one already).
    """
    check_searcher(searcher)
    if isinstance(searcher, ConcurrencyLimiter):
        return searcher
    if isinstance(searcher, Searcher):
        return ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    if searcher == "random":
        # Not a Searcher: Ray ignores TuneConfig.max_concurrent_trials for it, so it limits itself.
        return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler: optuna.samplers.BaseSampler
    if searcher == "bayes":
        sampler = optuna.samplers.GPSampler(
            seed=seed,
            n_startup_trials=n_initial,
            independent_sampler=optuna.samplers.RandomSampler(seed=seed),
        )
    else:
        sampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=n_initial, multivariate=True, constant_liar=True
        )
    return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=max_concurrent)


# ASHA's rungs, as fractions of a trial's step budget: 1/16 and 1/4 (reduction factor 4), then the end.
ASHA_GRACE = 1 / 16
ASHA_REDUCTION = 4


def has_step_budget(trainer_kwargs: Mapping[str, Any]) -> bool:
    """Whether ``trainer_kwargs`` bound a trial's steps: ``max_epochs`` or ``max_steps`` is a positive int.

    Lightning's ``-1`` ("no limit") bounds nothing, nor does leaving both out (Lightning's default of 1000
    epochs is not a budget the user chose).
    """

    def positive(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    return positive(trainer_kwargs.get("max_epochs")) or positive(trainer_kwargs.get("max_steps"))


def check_asha_budget(trainer_kwargs: Mapping[str, Any]) -> None:
    """Raise unless ``trainer_kwargs`` bound a trial's steps (``max_epochs`` or ``max_steps``).

    Raises:
        ValueError: neither is a positive int (ASHA places its rungs on fractions of the step budget).
    """
    max_epochs, max_steps = trainer_kwargs.get("max_epochs"), trainer_kwargs.get("max_steps")
    if not has_step_budget(trainer_kwargs):
        raise ValueError(
            "scheduler='asha' places its rungs on fractions of a trial's step budget, so it needs "
            f"trainer_kwargs['max_epochs'] or trainer_kwargs['max_steps'] as a positive int (got "
            f"max_epochs={max_epochs!r}, max_steps={max_steps!r}). Set one, or pass "
            "scheduler=ASHAScheduler(...) yourself, or scheduler=None."
        )


def make_scheduler(
    scheduler: str | TrialScheduler | None, trainer_kwargs: Mapping[str, Any]
) -> TrialScheduler | None:
    """The Ray ``TrialScheduler`` for a name; ``None`` runs every trial to its end (FIFO)."""
    check_scheduler(scheduler)
    if scheduler is None or isinstance(scheduler, TrialScheduler):
        return scheduler
    check_asha_budget(trainer_kwargs)
    # The rungs are on the fraction of the step budget done (the report callback's ``budget_fraction``),
    # not on a count of validations: how many validations a trial makes depends on val_check_interval
    # and on the length of its data, which the driver cannot know, and a max_t below a trial's count
    # stopped trials that ASHA never meant to stop. The fraction reaches max_t=1 only at the end of the
    # trial's budget. Nor is it Ray's training_iteration, which continues from a resumed trial's
    # checkpoint while the trial reruns from its first epoch.
    return ASHAScheduler(
        time_attr=BUDGET_KEY, max_t=1.0, grace_period=ASHA_GRACE, reduction_factor=ASHA_REDUCTION
    )
