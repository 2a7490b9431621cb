"""One trial: build the module and data from the sampled config, train them with a Lightning Trainer.

Runs inside a Ray worker. The trial owns the placement of its Trainer: one device, the GPU Ray
assigned (Ray exports it as the only visible CUDA device, so ``devices=1`` is that GPU even for a
fractional request such as ``{"gpu": 0.25}``), or the CPU with as many torch threads as CPUs reserved.
Defaults keep trials quiet and light: no logger (Tune records every reported metric), no progress bar,
no model summary, no Lightning checkpoints (the report callback keeps the best weights); a
``ModelCheckpoint`` or progress-bar callback of the user's turns its feature back on, and a
``LearningRateMonitor`` or ``DeviceStatsMonitor`` (which log through the Trainer's logger) Lightning's
default logger, which writes under the trial's folder.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor, ModelCheckpoint, ProgressBar

from lightning_speedup.tune.callback import NO_VALIDATION_CAUSES, NoValidationError, TuneReportCallback
from lightning_speedup.tune.objective import TimeToTargetObjective
from lightning_speedup.tune.space import with_constants

# config -> (module, datamodule) or (module, datamodule, per-trial callbacks)
Build = Callable[
    [dict[str, Any]],
    "tuple[L.LightningModule, L.LightningDataModule] | tuple[L.LightningModule, L.LightningDataModule, list[Callback]]",
]

# Set by the trial from the resources Ray reserved; a user value must agree.
PLACEMENT_KEYS = ("accelerator", "devices", "num_nodes")
TRIAL_DEFAULTS: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


# Trial defaults that a callback of the user's turns back on (Lightning refuses the callback otherwise): the
# monitors log through the Trainer's logger, and logger=True is Lightning's default one (TensorBoard, or CSV
# without it) under the trial's folder.
_ENABLED_BY: dict[str, type[Callback] | tuple[type[Callback], ...]] = {
    "enable_checkpointing": ModelCheckpoint,
    "enable_progress_bar": ProgressBar,
    "logger": (LearningRateMonitor, DeviceStatsMonitor),
}
# Start methods of Lightning's launchers that run training in processes they start.
_SPAWNING_START_METHODS = ("spawn", "fork", "forkserver")


def _trainer_params() -> set[str]:
    return set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


def as_callback_list(callbacks: Any, where: str) -> list[Callback]:
    """``callbacks`` as a list, as Lightning takes it: ``None``, one ``Callback``, or a list of them.

    Raises:
        TypeError: anything else, or an element that is not a Lightning ``Callback``.
    """
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback):
        return [callbacks]
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(
            f"{where} must be a Lightning Callback or a list of them, got {type(callbacks).__name__}."
        )
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"{where} must hold Lightning Callbacks, got {type(cb).__name__}.")
    return list(callbacks)


def _matches_placement(key: str, value: Any, gpus: float) -> bool:
    """Whether a user's ``accelerator``/``devices``/``num_nodes`` means what the trial sets anyway.

    Inside a Ray worker the reserved GPU is the only visible one, so GPU index 0 and ``"auto"`` are it.
    """
    if isinstance(value, str):
        value = value.strip().lower()
    if key == "accelerator":
        if isinstance(value, str):
            return value in (("gpu", "cuda", "auto") if gpus > 0 else ("cpu", "auto"))
        from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

        return isinstance(value, CUDAAccelerator if gpus > 0 else CPUAccelerator)
    if key == "devices":
        if value in ("1", "auto") or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            return True
        return gpus > 0 and (value == "0," or (isinstance(value, (list, tuple)) and list(value) == [0]))
    return isinstance(value, int) and not isinstance(value, bool) and value == 1  # num_nodes


def _start_method(strategy: Any) -> str | None:
    """The start method of the launcher a Lightning strategy (name or object) uses, if it has one."""
    from lightning.pytorch.strategies import StrategyRegistry, XLAStrategy

    if isinstance(strategy, str):
        name = strategy.lower()
        if name not in StrategyRegistry:
            return None
        cls, params = StrategyRegistry[name]["strategy"], StrategyRegistry[name]["init_params"]
        if issubclass(cls, XLAStrategy):
            return "spawn"  # XLA's launcher always starts its own processes
        if "start_method" in params:
            return str(params["start_method"])
        default = inspect.signature(cls.__init__).parameters.get("start_method")
        return None if default is None or default.default is inspect.Parameter.empty else str(default.default)
    if isinstance(strategy, XLAStrategy):
        return "spawn"
    method = getattr(strategy, "_start_method", None)
    return method if isinstance(method, str) else None


def _check_validation_runs(trainer_kwargs: Mapping[str, Any]) -> None:
    """Refuse Trainer arguments with which no validation runs: no trial could report the tuned metric."""
    limit = trainer_kwargs.get("limit_val_batches")
    if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit == 0:
        raise ValueError(
            f"trainer_kwargs['limit_val_batches']={limit!r} turns validation off, so no trial would report the "
            "tuned metric (trials report after each validation). Remove it, or give it a positive value."
        )
    every, max_epochs = trainer_kwargs.get("check_val_every_n_epoch"), trainer_kwargs.get("max_epochs")
    if (
        isinstance(every, int)
        and isinstance(max_epochs, int)
        and not isinstance(every, bool)
        and not isinstance(max_epochs, bool)
        and 0 < max_epochs < every
    ):
        raise ValueError(
            f"trainer_kwargs['check_val_every_n_epoch']={every} is more than max_epochs={max_epochs}, so no "
            "validation runs and no trial would report the tuned metric (trials report after each "
            "validation). Lower check_val_every_n_epoch to at most max_epochs."
        )


def _check_strategy(strategy: Any) -> None:
    """Refuse a strategy whose launcher trains in processes it starts (names unknown here pass: a package
    imported by ``build`` may register them in the trial's process)."""
    method = _start_method(strategy)
    if method in _SPAWNING_START_METHODS:
        shown = strategy if isinstance(strategy, str) else type(strategy).__name__
        raise ValueError(
            f"trainer_kwargs['strategy']={shown!r} trains in processes it starts itself (start method "
            f"{method!r}): their reports never reach Ray Tune, so the trial would report nothing, and a trial "
            "trains on one device anyway. Remove 'strategy' (each trial uses Lightning's single-device "
            "strategy); to use more devices, run more trials at once."
        )


def check_trainer_kwargs(trainer_kwargs: Mapping[str, Any] | None, gpus: float) -> dict[str, Any]:
    """Validate ``trainer_kwargs`` against ``L.Trainer`` and the trial's placement; return a copy.

    ``callbacks`` may be one Callback or a list of them, as in Lightning; the copy holds a list.
    ``accelerator``, ``devices`` and ``num_nodes`` may be given when they mean the trial's own placement
    (``"cuda"`` for ``"gpu"``, ``devices="1"``, ``devices=[0]`` on a GPU, ``"auto"``).

    Raises:
        TypeError: ``trainer_kwargs`` is not a dict, or ``callbacks`` holds something else than Callbacks.
        ValueError: an unknown Trainer argument (with the closest valid names); an ``accelerator``,
            ``devices`` or ``num_nodes`` that disagrees with the one device a trial trains on; a strategy
            that starts processes (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``, ...);
            arguments with which no validation runs (``limit_val_batches=0``, ``check_val_every_n_epoch``
            above ``max_epochs``); ``enable_checkpointing=False`` (or ``enable_progress_bar=False``) with a
            ``ModelCheckpoint`` (or progress bar) in ``callbacks``.
    """
    import difflib

    if trainer_kwargs is None:
        return {}
    if not isinstance(trainer_kwargs, Mapping):
        raise TypeError(
            f"trainer_kwargs must be a dict of L.Trainer arguments, got {type(trainer_kwargs).__name__}."
        )
    params = _trainer_params()
    for key in trainer_kwargs:
        if key not in params:
            close = difflib.get_close_matches(str(key), sorted(params), n=3)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"trainer_kwargs has {key!r}, which is not an argument of lightning.Trainer.{hint}"
            )
    wanted = placement(gpus)
    for key in PLACEMENT_KEYS:
        if key in trainer_kwargs and not _matches_placement(key, trainer_kwargs[key], gpus):
            raise ValueError(
                f"trainer_kwargs[{key!r}]={trainer_kwargs[key]!r} disagrees with resources_per_trial: a trial "
                f"trains on one device, here {wanted}. Remove {key!r} from trainer_kwargs; choose the "
                "device kind and share with resources_per_trial={'cpu': ..., 'gpu': ...}."
            )
    out = dict(trainer_kwargs)
    if "strategy" in out:
        _check_strategy(out["strategy"])
    _check_validation_runs(out)
    if "callbacks" in out:
        out["callbacks"] = as_callback_list(out["callbacks"], "trainer_kwargs['callbacks']")
        for flag, kind in _ENABLED_BY.items():
            given = [type(cb).__name__ for cb in out["callbacks"] if isinstance(cb, kind)]
            if given and out.get(flag) is False:
                raise ValueError(
                    f"trainer_kwargs has {flag}=False and a {given[0]} in its callbacks, which Lightning "
                    f"refuses. Remove {flag}=False (a trial turns it on for the callback) or the callback."
                )
    return out


def placement(gpus: float) -> dict[str, Any]:
    """Trainer placement for a trial that reserved ``gpus`` GPUs (0, a fraction, or 1)."""
    return {"accelerator": "gpu" if gpus > 0 else "cpu", "devices": 1, "num_nodes": 1}


def check_built(built: Any) -> tuple[L.LightningModule, L.LightningDataModule, list[Callback]]:
    """Split what ``build(config)`` returned: ``(module, datamodule)`` or ``(module, datamodule, callbacks)``.

    The optional callbacks (a list, or one Callback) are per-trial (e.g. ``OneCycle(max_lr=config["max_lr"])``);
    they join the callbacks of ``trainer_kwargs``.

    Raises:
        TypeError: anything else, naming what was returned.
    """
    if not (isinstance(built, tuple) and len(built) in (2, 3)):
        raise TypeError(
            "build(config) must return (LightningModule, LightningDataModule) or (LightningModule, "
            f"LightningDataModule, [Callback, ...]), got {type(built).__name__}"
            f"{f' of length {len(built)}' if isinstance(built, tuple) else ''}."
        )
    module, data = built[0], built[1]
    callbacks = [] if len(built) == 2 else [built[2]] if isinstance(built[2], Callback) else list(built[2])
    if not isinstance(module, L.LightningModule):
        raise TypeError(f"build(config)[0] must be a LightningModule, got {type(module).__name__}.")
    if not isinstance(data, L.LightningDataModule):
        raise TypeError(f"build(config)[1] must be a LightningDataModule, got {type(data).__name__}.")
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"build(config)[2] must hold Lightning Callbacks, got {type(cb).__name__}.")
    return module, data, callbacks


def make_trainer(
    trainer_kwargs: Mapping[str, Any],
    trial_callbacks: list[Callback],
    report_callback: TuneReportCallback,
    gpus: float,
    root_dir: str,
) -> L.Trainer:
    """The trial's Trainer: quiet defaults, the user's arguments, the placement, then the callbacks
    (``trainer_kwargs``'s, the trial's own, and the report callback last).

    A ``ModelCheckpoint`` (or progress bar, or ``LearningRateMonitor``/``DeviceStatsMonitor``) among the
    callbacks turns Lightning checkpointing (or the progress bar, or Lightning's default logger, under
    ``root_dir``) on, unless ``trainer_kwargs`` sets it explicitly."""
    user = copy.deepcopy(dict(trainer_kwargs))
    callbacks = [
        *as_callback_list(user.pop("callbacks", None), "trainer_kwargs['callbacks']"),
        *trial_callbacks,
        report_callback,
    ]
    defaults = dict(TRIAL_DEFAULTS)
    for flag, kind in _ENABLED_BY.items():
        if any(isinstance(cb, kind) for cb in callbacks):
            defaults[flag] = True
    kwargs = {**defaults, **user, **placement(gpus)}
    kwargs.setdefault("default_root_dir", root_dir)
    return L.Trainer(callbacks=callbacks, **kwargs)


def run_trial(
    config: dict[str, Any],
    *,
    build: Build,
    trainer_kwargs: dict[str, Any],
    metric: str,
    mode: str,
    objective: TimeToTargetObjective | None,
    checkpoint: bool,
    seed: int | None,
    cpus: float,
    gpus: float,
    constants: Mapping[str, Any] | None = None,
    require_budget: bool = False,
) -> None:
    """Ray Tune function trainable: one Lightning ``fit`` that reports after every validation.

    Raises :class:`NoValidationError` when ``fit`` ends without a validation (nothing was reported).

    ``constants`` (the search space's constants of the ``tune_lightning`` call that runs the trial)
    replace those in ``config``: a resumed sweep's configurations come back from Ray with the constants
    the sweep was started with. ``require_budget``: the scheduler needs ``budget_fraction`` reports.
    """
    from ray import tune

    torch.set_num_threads(max(1, int(cpus)))
    if gpus > 0 and not torch.cuda.is_available():
        raise RuntimeError(
            f"The trial reserved {gpus:g} GPU but torch sees no CUDA device in this Ray worker "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Install a CUDA build of torch on "
            "the cluster's nodes, or set resources_per_trial={'gpu': 0}."
        )
    if seed is not None:
        # Every trial starts from the same seed: configurations are compared on the same initial
        # weights and data order (common random numbers), which lowers the noise between trials.
        L.seed_everything(seed, workers=True, verbose=False)
    if constants:
        # In place: the function gets the dict that Ray reports as the trial's config with every result
        # (checked against Ray 2.60), so the results show the constants build was given.
        config.update(with_constants(config, constants))
    module, data, trial_callbacks = check_built(build(dict(config)))
    report = TuneReportCallback(
        metric, mode, objective=objective, checkpoint=checkpoint, require_budget=require_budget
    )
    trainer = make_trainer(trainer_kwargs, trial_callbacks, report, gpus, tune.get_context().get_trial_dir())
    trainer.fit(module, datamodule=data)
    if report.validations == 0 and not trainer.interrupted:
        # Ray would mark the trial finished with no result (or fail the whole sweep on its final result).
        raise NoValidationError(
            f"The trial finished training (epoch {trainer.current_epoch}, step {trainer.global_step}) without a "
            f"single validation, so it never reported {metric!r}: trials report after each validation. Likely "
            f"causes: {NO_VALIDATION_CAUSES}. Make every trial validate at least once."
        )
