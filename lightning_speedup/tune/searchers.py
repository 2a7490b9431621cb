"""Searchers and schedulers by name, with the defaults a sweep of a few dozen Lightning trials needs.

* ``"bayes"``: Gaussian-process Bayesian optimisation, Optuna's ``GPSampler`` (log expected
  improvement, Matérn-5/2 kernel; Snoek et al., 2012; Akiba et al., 2019) through Ray's
  ``OptunaSearch``. It conditions each suggestion on every finished trial and models running ones,
  but is sequential at heart: its default concurrency is small (see :func:`default_concurrency`).
* ``"tpe"``: Optuna's multivariate Tree-structured Parzen Estimator (Bergstra et al., 2011) with the
  constant-liar strategy for parallel trials.
* ``"random"``: Ray's ``BasicVariantGenerator`` (random sampling; also runs ``tune.grid_search``).

Both model-based searchers start with ``n_initial`` random trials. ``"asha"`` is Ray's
``ASHAScheduler`` (Li et al., 2020) on the trial's count of validations (``validation``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

from lightning_speedup.tune.callback import VALIDATION_KEY
from lightning_speedup.tune.space import SEARCHERS

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


def asha_max_t(trainer_kwargs: Mapping[str, Any]) -> int:
    """Validations in a full trial, from ``max_epochs`` and the validation frequency.

    Raises:
        ValueError: ``max_epochs`` is missing or not a positive int (ASHA places its rungs on it).
    """
    max_epochs = trainer_kwargs.get("max_epochs")
    if isinstance(max_epochs, bool) or not isinstance(max_epochs, int) or max_epochs < 1:
        raise ValueError(
            "scheduler='asha' places its rungs on the number of validations, so it needs "
            f"trainer_kwargs['max_epochs'] as a positive int (got {max_epochs!r}). Set it, or pass "
            "scheduler=ASHAScheduler(max_t=...) yourself, or scheduler=None."
        )
    every = trainer_kwargs.get("check_val_every_n_epoch") or 1
    per_epoch = 1
    interval = trainer_kwargs.get("val_check_interval")
    if isinstance(interval, float) and 0 < interval < 1:
        per_epoch = int(1 / interval)
    return max(1, (max_epochs // every) * per_epoch)


def make_scheduler(
    scheduler: str | TrialScheduler | None, trainer_kwargs: Mapping[str, Any]
) -> TrialScheduler | None:
    """The Ray ``TrialScheduler`` for a name; ``None`` runs every trial to its end (FIFO)."""
    check_scheduler(scheduler)
    if scheduler is None or isinstance(scheduler, TrialScheduler):
        return scheduler
    max_t = asha_max_t(trainer_kwargs)
    # Not Ray's training_iteration: it continues from a resumed trial's checkpoint while the trial reruns
    # from its first epoch, which would move the trial past rungs it never reached.
    return ASHAScheduler(time_attr=VALIDATION_KEY, max_t=max_t, grace_period=1, reduction_factor=4)
