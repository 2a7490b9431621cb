"""Every use of Lightning's private API in lightning_speedup, in one place.

Lightning's public extension points (``Callback``, ``Strategy``, ``Precision``) cover almost everything
the techniques need. The few things they do not cover go through the small functions below, each with
one line on why no public API does the job. ``tests/test_compat.py`` checks every one of them against
the installed Lightning, in real Trainer runs: that the attribute or method exists and behaves as
assumed here. A Lightning release that changes one fails that test instead of a user's run.

Checked against the Lightning range ``pyproject.toml`` declares, oldest and newest (``make
test-lightning-oldest``, ``make test``). To support another version, see "Lightning's private API" in
``docs/design.md``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch.optim import Optimizer

__all__ = [
    "DDP_CONFIGURE_LAUNCHER",
    "DDP_OVERRIDES",
    "DDP_REGISTER_HOOKS",
    "DDP_SETUP_MODEL",
    "StrategyRegistryType",
    "batches_done_on_resume",
    "batches_stepped",
    "before_batch_transfer",
    "check_ddp_overrides",
    "current_hook",
    "ddp_kwargs",
    "ddp_layer_sync",
    "has_trainer",
    "launch_with_main_process_hook",
    "logged_step",
    "optimizer_to_device",
    "reset_logged_results",
    "running_hook",
    "set_module_device",
]

# ---------------------------------------------------------------------------------------------- registry

# Why: the type of ``lightning.pytorch.strategies.StrategyRegistry``, which a strategy's
# ``register_strategies(cls, strategy_registry)`` classmethod receives; Lightning exports the instance only.
StrategyRegistryType = _StrategyRegistry

# ---------------------------------------------------------------------------------------------- LightningModule


def current_hook(module: pl.LightningModule) -> str | None:
    """The Lightning hook now running on ``module``, or ``None`` outside a hook.

    Why: ``LightningModule._current_fx_name`` is what ``self.log`` checks to decide whether it may log and
    with which ``on_step``/``on_epoch`` defaults; nothing public says which hook is running.
    """
    return module._current_fx_name


@contextmanager
def running_hook(module: pl.LightningModule, name: str) -> Iterator[None]:
    """Run the block as if the Trainer were inside hook ``name``, then restore the previous hook name.

    Why: calling ``training_step`` outside the fit loop (the LR range test) makes its ``self.log`` calls
    raise unless ``_current_fx_name`` names the hook, which only the Trainer sets.
    """
    previous = module._current_fx_name
    module._current_fx_name = name
    try:
        yield
    finally:
        module._current_fx_name = previous


def before_batch_transfer(module: pl.LightningModule, batch: Any, dataloader_idx: int = 0) -> Any:
    """``batch`` after the ``on_before_batch_transfer`` hook, the datamodule's where it defines one.

    Why: the LR range test feeds ``training_step`` batches the way the training loop does; the loop calls
    ``LightningModule._on_before_batch_transfer``, which picks the module's or the datamodule's hook as the
    Trainer's data connector decides. The public hook alone would skip a datamodule's.
    """
    return module._on_before_batch_transfer(batch, dataloader_idx=dataloader_idx)


def has_trainer(module: pl.LightningModule) -> bool:
    """Whether ``module`` is attached to a Trainer.

    Why: the public ``module.trainer`` raises when no Trainer is attached; ``_trainer`` is ``None`` then.
    """
    return module._trainer is not None


def set_module_device(module: pl.LightningModule, device: torch.device) -> None:
    """Make ``module.device`` report ``device`` without moving any tensor.

    Why: ``LightningModule.device`` reads the private ``_device`` that ``module.to(device)`` sets; a
    pipeline stage cannot call ``.to`` because the layers other processes hold live on the meta device.
    """
    module._device = device


# ---------------------------------------------------------------------------------------------- Trainer


def batches_stepped(trainer: pl.Trainer) -> int:
    """Training batches after which the optimizers stepped so far, once per batch however many optimizers.

    Why: ``trainer.global_step`` counts every optimizer's steps, so under manual optimization with several
    optimizers it is not in the units of ``trainer.estimated_stepping_batches`` (batches); the epoch loop's
    ``_batches_that_stepped`` (the loggers' step counter, checkpointed with the loops) is. No public
    attribute counts it.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def batches_done_on_resume(trainer: pl.Trainer) -> tuple[int, bool]:
    """Training batches of the current epoch that the fit loop will count as done when it resumes from a
    checkpoint saved now, and whether it will train one of them again.

    Why: a loader that resumes mid-epoch must skip exactly the batches the loop skips; the loop's count is the
    epoch loop's ``batch_progress`` (checkpointed with the loops), which no public attribute exposes. A checkpoint
    saved in ``on_train_batch_end`` (``ModelCheckpoint(every_n_train_steps=...)``) has the batch processed but not
    completed (the epoch loop's own test, ``update_restart_stage``): Lightning >= 2.5 counts that batch as done on
    resume (``restarted_on_train_batch_end``); older releases count ``completed`` only and train that batch again
    (the second value is then True). A checkpoint saved earlier in a batch (``OnExceptionCheckpoint`` after an
    error in ``training_step``, a requeue signal) has it unprocessed: every release trains it again, rightly.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    total, current = epoch_loop.batch_progress.total, epoch_loop.batch_progress.current
    at_batch_end = total.started == total.ready and total.processed == total.started == total.completed + 1
    if hasattr(type(epoch_loop), "restarted_on_train_batch_end"):
        return int(current.completed) + int(at_batch_end), False
    return int(current.completed), at_batch_end


def logged_step(trainer: pl.Trainer) -> int | None:
    """The step Lightning's loggers record now, or ``None`` when this step writes no logs.

    Why: ``LearningRateMonitor`` decides with the same two private attributes
    (``_logger_connector.should_update_logs`` and the epoch loop's ``_batches_that_stepped``, the logger's
    step counter); reading them puts our values on exactly its steps. There is no public equivalent.
    """
    if not trainer.loggers or not trainer._logger_connector.should_update_logs:
        return None
    return batches_stepped(trainer)


def reset_logged_results(trainer: pl.Trainer) -> None:
    """Drop every value logged with ``self.log`` since the fit loop last reset its results.

    Why: what ``training_step`` logs during the LR range test must not reach the real first step's
    metrics; the fit loop's result collection is reachable only through ``_logger_connector``.
    """
    trainer._logger_connector.reset_results()


# ---------------------------------------------------------------------------------------------- optimizers


def optimizer_to_device(optimizer: Optimizer, device: torch.device) -> None:
    """Move ``optimizer``'s state tensors to ``device``, except the ``step`` counters (torch wants those where
    they are).

    Why: the pipeline strategy restores optimizer state itself and must leave it where Lightning's own
    restore would; Lightning's helper for that (``_optimizer_to_device``) is private.
    """
    _optimizer_to_device(optimizer, device)


# ---------------------------------------------------------------------------------------------- DDPStrategy

# DDPStrategy's private methods that our strategies override, with the parameters (after ``self``) each
# takes. Why: ``_setup_model`` is the only place that wraps the module in ``DistributedDataParallel`` (the
# averaging strategies skip or replace the wrapper), ``_register_ddp_hooks`` the only place a comm hook
# is installed after wrapping (CompressedDDPStrategy installs its own), and ``_configure_launcher`` the only
# place the launcher is chosen (PipelineStrategy wraps it: see :func:`launch_with_main_process_hook`).
DDP_SETUP_MODEL = "_setup_model"
DDP_REGISTER_HOOKS = "_register_ddp_hooks"
DDP_CONFIGURE_LAUNCHER = "_configure_launcher"
DDP_OVERRIDES: dict[str, tuple[str, ...]] = {
    DDP_SETUP_MODEL: ("model",),
    DDP_REGISTER_HOOKS: (),
    DDP_CONFIGURE_LAUNCHER: (),
}


def _parameters(fn: Any) -> tuple[str, ...]:
    return tuple(name for name in inspect.signature(fn).parameters if name != "self")


def check_ddp_overrides(cls: type[DDPStrategy] = DDPStrategy) -> list[str]:
    """What no longer fits in the private ``DDPStrategy`` methods that ``cls`` overrides (empty: all fit).

    For ``DDPStrategy`` itself: each method of :data:`DDP_OVERRIDES` exists with the expected parameters. For
    a subclass: in addition, each override it defines takes the same parameters as Lightning's method.
    """
    problems: list[str] = []
    for name, expected in DDP_OVERRIDES.items():
        base = getattr(DDPStrategy, name, None)
        if not callable(base):
            problems.append(f"DDPStrategy.{name} no longer exists")
            continue
        if _parameters(base) != expected:
            problems.append(f"DDPStrategy.{name} takes {_parameters(base)}, expected {expected}")
        own = next((vars(k)[name] for k in cls.__mro__ if k is not DDPStrategy and name in vars(k)), None)
        if own is not None and _parameters(own) != _parameters(base):
            problems.append(
                f"{cls.__name__}.{name} takes {_parameters(own)}, DDPStrategy's {_parameters(base)}"
            )
    return problems


def ddp_layer_sync(strategy: DDPStrategy) -> Any:
    """The layer sync (``SyncBatchNorm`` conversion) the Trainer gave ``strategy``, or ``None``.

    Why: ``Trainer(sync_batchnorm=True)`` reaches the strategy only as the private ``_layer_sync``; the
    averaging strategies must reject it in ``setup``, before it all-reduces batch statistics every step.
    """
    return strategy._layer_sync


def ddp_kwargs(strategy: DDPStrategy) -> dict[str, Any]:
    """The keyword arguments ``strategy`` forwards to ``DistributedDataParallel``.

    Why: ``DDPStrategy`` keeps them only as the private ``_ddp_kwargs``; an override of ``_setup_model``
    that builds the wrapper itself must pass the same ones.
    """
    return strategy._ddp_kwargs


# ---------------------------------------------------------------------------------------------- launcher

# The parameters (after ``self``) of the launcher method that :class:`_HookedLauncher` overrides.
LAUNCHER_RECOVER = "_recover_results_in_main_process"
LAUNCHER_RECOVER_PARAMETERS = ("worker_output", "trainer")


_COMM_STATS = "lightning_speedup.comm_stats"


class _HookedLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork/forkserver launcher that calls ``before_load(module)`` (if given) in the launching
    process just before the workers' trained weights are loaded back into ``module``, and brings rank 0's
    ``strategy.comm_stats`` back to the launching process's strategy (``_worker_comm_stats``)."""

    def __init__(self, strategy: DDPStrategy, start_method: str, before_load: Any) -> None:
        super().__init__(strategy, start_method=start_method)  # type: ignore[arg-type]
        self.before_load = before_load  # a module-level function or None: spawn pickles the launcher

    def _recover_results_in_main_process(self, worker_output: Any, trainer: pl.Trainer) -> None:
        if (
            self.before_load is not None
            and trainer.lightning_module is not None
            and worker_output.weights_path
        ):
            self.before_load(trainer.lightning_module)
        super()._recover_results_in_main_process(worker_output, trainer)

    def get_extra_results(self, trainer: pl.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        stats = getattr(trainer.strategy, "comm_stats", None)
        if isinstance(stats, dict):
            extra[_COMM_STATS] = dict(stats)
        return extra

    def update_main_process_results(self, trainer: pl.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        if _COMM_STATS in extra and hasattr(trainer.strategy, "_worker_comm_stats"):
            trainer.strategy._worker_comm_stats = extra[_COMM_STATS]


def launch_with_main_process_hook(strategy: DDPStrategy, before_load: Any) -> None:
    """Call after ``DDPStrategy._configure_launcher``: with start method spawn, fork or forkserver, the
    launching process calls ``before_load(module)`` just before it loads the trained weights (popen: nothing
    to do, the launching process trains as rank 0).

    Why: with those start methods the launching process receives the trained weights only in the launcher's
    private ``_recover_results_in_main_process``, as ``load_state_dict(strict=False)``. For a module built on
    the meta device that load is a no-op (one warning per tensor) and the trained model would be lost there;
    nothing public runs in the launching process between the workers' end and that load.
    """
    launcher = strategy.launcher
    if isinstance(launcher, _HookedLauncher):
        launcher.before_load = before_load
    elif isinstance(launcher, _MultiProcessingLauncher):
        strategy._launcher = _HookedLauncher(strategy, launcher._start_method, before_load)
