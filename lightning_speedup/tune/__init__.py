"""Hyper-parameter sweeps of Lightning models on a Ray cluster, Bayesian by default, usable from notebooks.

``tune_lightning(build, search_space, metric="val_acc", mode="max")`` runs a sweep with Ray Tune
(Liaw et al., 2018): Gaussian-process Bayesian optimisation through Optuna (or TPE, or random search),
ASHA early stopping, one device per trial (fractions of a GPU allowed), best-only weights-only
checkpoints, and resume after an interruption. ``objective=TimeToTargetObjective(metric, target)`` tunes for the
fastest wall time to a quality target instead. Importing this package imports Ray; the top-level
``lightning_speedup`` package does not import it.
"""

from __future__ import annotations

try:
    import optuna  # noqa: F401
    import ray.tune  # noqa: F401
except ImportError as _err:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"lightning_speedup.tune needs ray[tune] and optuna ({_err}); install them with "
        "pip install 'lightning-speedup[tune]'."
    ) from _err

from lightning_speedup.tune.callback import MetricNotReportedError, NoValidationError, TuneReportCallback
from lightning_speedup.tune.cluster import InsufficientResourcesError, init_ray
from lightning_speedup.tune.objective import TimeToTargetObjective
from lightning_speedup.tune.results import TuneResults
from lightning_speedup.tune.space import config_in_space, validate_search_space
from lightning_speedup.tune.sweep import tune_lightning

__all__ = [
    "InsufficientResourcesError",
    "MetricNotReportedError",
    "NoValidationError",
    "TimeToTargetObjective",
    "TuneReportCallback",
    "TuneResults",
    "config_in_space",
    "init_ray",
    "tune_lightning",
    "validate_search_space",
]
