"""One trial: build the module and data from the sampled config, train them with a Lightning Trainer.

Runs inside a Ray worker. The trial owns the placement of its Trainer: one device, the GPU Ray
assigned (Ray exports it as the only visible CUDA device, so ``devices=1`` is that GPU even for a
fractional request such as ``{"gpu": 0.25}``), or the CPU with as many torch threads as CPUs reserved.
Defaults keep trials quiet and light: no logger (Tune records every reported metric), no progress bar,
no model summary, no Lightning checkpoints (the report callback keeps the best weights).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback

from lightning_speedup.tune.callback import TuneReportCallback
from lightning_speedup.tune.objective import TimeToTargetObjective

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


def _trainer_params() -> set[str]:
    return set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}


def check_trainer_kwargs(trainer_kwargs: Mapping[str, Any] | None, gpus: float) -> dict[str, Any]:
    """Validate ``trainer_kwargs`` against ``L.Trainer`` and the trial's placement; return a copy.

    Raises:
        TypeError: ``trainer_kwargs`` is not a dict.
        ValueError: an unknown Trainer argument (with the closest valid names), or an ``accelerator``,
            ``devices`` or ``num_nodes`` that disagrees with the one device a trial trains on.
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
        if key in trainer_kwargs and trainer_kwargs[key] != wanted[key]:
            raise ValueError(
                f"trainer_kwargs[{key!r}]={trainer_kwargs[key]!r} disagrees with resources_per_trial: a trial "
                f"trains on one device, here {wanted}. Remove {key!r} from trainer_kwargs; choose the "
                "device kind and share with resources_per_trial={'cpu': ..., 'gpu': ...}."
            )
    return dict(trainer_kwargs)


def placement(gpus: float) -> dict[str, Any]:
    """Trainer placement for a trial that reserved ``gpus`` GPUs (0, a fraction, or 1)."""
    return {"accelerator": "gpu" if gpus > 0 else "cpu", "devices": 1, "num_nodes": 1}


def check_built(built: Any) -> tuple[L.LightningModule, L.LightningDataModule, list[Callback]]:
    """Split what ``build(config)`` returned: ``(module, datamodule)`` or ``(module, datamodule, callbacks)``.

    The optional callbacks are per-trial (e.g. ``OneCycle(max_lr=config["max_lr"])``); they join the
    callbacks of ``trainer_kwargs``.

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
    callbacks = list(built[2]) if len(built) == 3 else []
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
    (``trainer_kwargs``'s, the trial's own, and the report callback last)."""
    kwargs = {**TRIAL_DEFAULTS, **copy.deepcopy(dict(trainer_kwargs)), **placement(gpus)}
    kwargs.setdefault("default_root_dir", root_dir)
    callbacks = [*(kwargs.pop("callbacks", None) or []), *trial_callbacks, report_callback]
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
) -> None:
    """Ray Tune function trainable: one Lightning ``fit`` that reports after every validation."""
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
    module, data, trial_callbacks = check_built(build(dict(config)))
    report = TuneReportCallback(metric, mode, objective=objective, checkpoint=checkpoint)
    trainer = make_trainer(trainer_kwargs, trial_callbacks, report, gpus, tune.get_context().get_trial_dir())
    trainer.fit(module, datamodule=data)
