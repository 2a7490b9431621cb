"""Logging without stalling the GPU: progress-bar metrics read without a per-step sync, numbers logged as is.

Lightning converts every metric logged with ``self.log(..., prog_bar=True)`` to a Python number with
``.item()`` after every training step (``_LoggerConnector.on_batch_end``), also when no progress bar is
shown. On CUDA ``.item()`` waits until the GPU has finished every kernel queued so far, so the host cannot
queue step ``k + 1`` while the GPU runs step ``k``: after each step the GPU idles while the host runs the
loop's per-step Python (hooks, the next batch, the launches). A number passed to ``self.log`` costs the
same: Lightning turns it into a device tensor with a blocking copy. ``DataStallMonitor`` names such
sync sites (``sync_sites``); this module removes the two that Lightning's logging adds.
"""

from __future__ import annotations

import logging
import numbers
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_speedup._chain import chain_method
from lightning_speedup._compat import current_hook
from lightning_speedup._validation import check_int

log = logging.getLogger(__name__)

__all__ = ["AsyncProgressBarMetrics", "log_number"]


def log_number(module: L.LightningModule, name: str, value: float, **kwargs: Any) -> None:
    """``module.log(name, value, **kwargs)`` for a Python number, without a host-device sync.

    ``LightningModule.log`` turns a number into a tensor on the module's device, and on CUDA that copy
    from pageable host memory blocks until the GPU's stream has drained (``torch.tensor(x,
    device="cuda")`` synchronises), which every step keeps the host from running ahead of the GPU.
    Logged as a CPU tensor, the value stays on the host and reaches loggers and the progress bar the same.

    With ``sync_dist=True`` the number is passed to ``module.log`` as it is: Lightning all-reduces a logged
    tensor on the device it lies on, and the process group of a GPU run (NCCL) cannot reduce a CPU tensor,
    so Lightning makes the tensor on the module's device itself (and that copy syncs, as the reduction does).
    """
    if kwargs.get("sync_dist"):
        module.log(name, float(value), **kwargs)
        return
    module.log(name, _host_scalar(value), **kwargs)


def _host_scalar(value: float) -> Tensor:
    """A number as the CPU tensor :func:`log_number` logs (float64, so large counts stay exact)."""
    return torch.tensor(float(value), dtype=torch.float64)


# Hooks of a training batch where Lightning logs on step only by default (its _FxValidator, Lightning 2.6).
_TRAIN_STEP_HOOKS = frozenset({
    "training_step", "on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
    "on_before_optimizer_step", "optimizer_step", "configure_gradient_clipping", "on_before_zero_grad",
})  # fmt: skip


def _running_hook(module: L.LightningModule) -> str | None:
    """The Lightning hook now running on ``module`` (as ``self.log`` reads it), or None outside a hook."""
    return current_hook(module)


class AsyncProgressBarMetrics(Callback):
    """Show on-step progress-bar metrics without synchronising the host with the GPU after every step.

    Example::

        trainer = L.Trainer(callbacks=[ls.AsyncProgressBarMetrics()])   # no change to the LightningModule

    While training on CUDA, a call ``self.log(name, tensor, prog_bar=True)`` that logs on step only (the
    default in ``training_step`` and the other training-batch hooks) is passed on to Lightning with
    ``prog_bar=False``: loggers, ``callback_metrics``, checkpoint monitors and early stopping get the same
    tensor as before. Its value is copied to pinned host memory without blocking, and the progress bar
    shows the newest copy that has arrived, usually a step or two behind the current one; at the end of
    training it shows the last step's values. A Python number logged without ``sync_dist`` is logged as
    a CPU tensor (:func:`log_number`), so it no longer costs a blocking copy to the device.

    Calls it leaves as they are: calls with ``sync_dist=True`` (they sync with the other ranks anyway, and
    the progress bar must show the reduced value), metrics that also log on epoch (``on_epoch=True``), calls
    outside the training-batch hooks (validation syncs once per validation run), and everything on a
    non-CUDA device (there ``.item()`` does not wait for anything; it logs that once).

    Measured trade-off: ``docs/methods/gpu-data.md``.

    Args:
        max_lag: copies kept in flight per metric; with more, the oldest is dropped (never waited for).

    Raises:
        ValueError: ``max_lag`` is not an int >= 1.
    """

    def __init__(self, max_lag: int = 8) -> None:
        self.max_lag = check_int("max_lag", max_lag, 1, "copies in flight per metric")
        self._pending: defaultdict[str, deque[tuple[Tensor, torch.cuda.Event]]] = defaultdict(self._new_queue)
        self._restore: Callable[[], None] | None = None
        self._warned_inactive = False
        #: Names of the metrics whose progress-bar copy this callback manages in the current run.
        self.deferred: set[str] = set()

    def _new_queue(self) -> deque[tuple[Tensor, torch.cuda.Event]]:
        return deque(maxlen=self.max_lag)

    @property
    def active(self) -> bool:
        """Whether ``LightningModule.log`` calls are being intercepted (a CUDA run in progress)."""
        return self._restore is not None

    # -- interception ---------------------------------------------------------------------------

    def _log(self, module: L.LightningModule, original: Callable[..., None]) -> Callable[..., None]:
        def log(
            name: str,
            value: Any,
            prog_bar: bool = False,
            logger: bool | None = None,
            on_step: bool | None = None,
            on_epoch: bool | None = None,
            **kwargs: Any,
        ) -> None:
            # A call with sync_dist passes through as it is: Lightning reduces a clone of the value, so a copy
            # of the caller's tensor would put the rank's own value in the progress bar, and the reduction
            # syncs anyway, so nothing would be gained by deferring it.
            synced = bool(kwargs.get("sync_dist"))
            if not synced and isinstance(value, numbers.Number) and not isinstance(value, bool):
                value = _host_scalar(value)  # as log_number logs it
            step_only = _running_hook(module) in _TRAIN_STEP_HOOKS and on_step is not False and not on_epoch
            if (
                prog_bar
                and step_only
                and not synced
                and isinstance(value, Tensor)
                and value.is_cuda
                and value.numel() == 1
            ):
                original(
                    name, value, prog_bar=False, logger=logger, on_step=on_step, on_epoch=on_epoch, **kwargs
                )
                self._copy(name, value)
                return
            original(
                name, value, prog_bar=prog_bar, logger=logger, on_step=on_step, on_epoch=on_epoch, **kwargs
            )

        return log

    def _copy(self, name: str, value: Tensor) -> None:
        host = torch.empty((), dtype=value.dtype, pin_memory=True)
        host.copy_(value.detach().reshape(()), non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record(torch.cuda.current_stream(value.device))
        self._pending[name].append((host, arrived))
        self.deferred.add(name)

    def _publish(self, trainer: L.Trainer, wait: bool = False) -> None:
        """Put the newest arrived value of each deferred metric in the progress bar's metrics."""
        newest: dict[str, float] = {}
        for name, pending in self._pending.items():
            while pending and (wait or pending[0][1].query()):
                host, arrived = pending.popleft()
                if wait:
                    arrived.synchronize()
                newest[name] = host.item()
        if newest:
            # Trainer.progress_bar_metrics returns the dict that progress bars read (Lightning 2.6).
            trainer.progress_bar_metrics.update(newest)

    # -- hooks ----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self._restore is not None:
            return
        if trainer.strategy.root_device.type != "cuda":
            if trainer.is_global_zero and not self._warned_inactive:
                self._warned_inactive = True
                log.warning(
                    "AsyncProgressBarMetrics will not act in this run: the accelerator is %s, where .item() does "
                    "not wait for a device; logging is left as it is.",
                    trainer.strategy.root_device.type,
                )
            return
        self._restore = chain_method(pl_module, "log", lambda original: self._log(pl_module, original))

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending:
            self._publish(trainer)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._publish(trainer, wait=True)  # the epoch's last values, exact

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._publish(trainer, wait=True)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._release()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._release()  # Lightning does not call teardown when fit raises

    def _release(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None
        self._pending.clear()
