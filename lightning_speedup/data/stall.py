"""Measure how long each training step waits for data, and say what to do when it is too long.

A data stall is the time between the end of one step's work and the start of the next one's
compute: fetching the batch from the loader, copying it to the device, and whatever else the loop
does in between. Mohan et al. ("Analyzing and Mitigating Data Stalls in DNN Training", VLDB 2021)
found it to be a large share of step time for common vision models; the PyTorch profiler's
"DataLoader" time and TensorFlow's ``tf.data`` bottleneck analysis report the same quantity.

On a CUDA device the monitor times it with CUDA events on the compute stream (what the *GPU* waited:
a host that fetches while the GPU is still busy with the previous step costs nothing, while a copy on
the compute stream does); elsewhere with the host clock. Per step it logs ``data/wait_ms`` and
``data/wait_fraction`` (wait over wait + compute), and it warns once, with concrete advice about the
run's own loaders, when the mean fraction over a window of steps passes a threshold.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_speedup._validation import check_bool, check_int
from lightning_speedup.data.prefetch import GPUPrefetcher, PrefetchLoader
from lightning_speedup.data.resident import ResidentBatches
from lightning_speedup.metrics import log_number

__all__ = ["DataStallMonitor", "StepTiming", "stall_advice"]

Timing = Literal["auto", "cuda", "host"]


@dataclass(frozen=True)
class StepTiming:
    """One training step: seconds waiting for data before it, and seconds from its start to its end."""

    step: int
    wait: float
    compute: float

    @property
    def total(self) -> float:
        return self.wait + self.compute

    @property
    def fraction(self) -> float:
        return self.wait / self.total if self.total > 0 else 0.0


def _flatten(iterables: Any) -> Iterator[Any]:
    if isinstance(iterables, Mapping):
        for value in iterables.values():
            yield from _flatten(value)
    elif isinstance(iterables, (list, tuple)):
        for value in iterables:
            yield from _flatten(value)
    elif iterables is not None:
        yield iterables


def _short_path(filename: str) -> str:
    """A module's path relative to the ``sys.path`` entry it was imported from (``lightning/fabric/x.py``)."""
    for entry in sorted((e for e in sys.path if e), key=len, reverse=True):
        root = os.path.join(os.path.abspath(entry), "")
        if filename.startswith(root):
            return filename[len(root) :].replace(os.sep, "/")
    return filename


def stall_advice(
    loaders: Any,
    device: torch.device,
    prefetching: bool,
    world_size: int = 1,
    sync_sites: Mapping[str, float] | None = None,
) -> list[str]:
    """Concrete suggestions for the given training loaders (one or a nested list/dict of them).

    ``sync_sites`` maps the code locations that synchronised the host with the GPU to how often they
    did per step (what :class:`DataStallMonitor` finds with ``find_syncs=True``).
    """
    tips: list[str] = []
    if sync_sites:
        where = ", ".join(f"{site} ({count:g}x)" for site, count in sync_sites.items())
        tips.append(
            f"the loop synchronises the host with the GPU every step, at {where}; after each sync the GPU idles "
            "while the host prepares the next step. A metric logged with self.log(..., prog_bar=True) on step is "
            "converted with .item() every step (lightning/fabric/utilities/apply_func.py), even without a "
            "progress bar: add ls.AsyncProgressBarMetrics() (the bar shows it without the sync; no change to the "
            "module) or log it with prog_bar=False, and avoid .item()/.cpu()/print of CUDA tensors in training_step"
        )
    cpus = os.cpu_count() or 1
    for loader in _flatten(loaders):
        inner = loader.loader if isinstance(loader, PrefetchLoader) else loader
        if isinstance(inner, ResidentBatches):
            tips.append(
                "the batches already live on the device, so the wait is the loop's own host overhead: use larger "
                "batches, fewer per-step callbacks/logging, or torch.compile to cut kernel launches"
            )
            continue
        if not isinstance(inner, DataLoader):
            continue
        fair_share = max(1, cpus // max(1, world_size) - 1)
        if inner.num_workers == 0:
            tips.append(
                f"the DataLoader has num_workers=0, so every batch is loaded in the training process; set "
                f"num_workers={min(8, fair_share)} (this machine has {cpus} CPUs)"
            )
        elif inner.num_workers < fair_share:
            tips.append(
                f"raise DataLoader(num_workers={inner.num_workers}) towards {fair_share} "
                f"({cpus} CPUs for {world_size} rank(s))"
            )
        if device.type == "cuda" and not inner.pin_memory:
            tips.append("set DataLoader(pin_memory=True) so copies to the GPU are asynchronous")
        tips.append(
            "if the workers augment on the CPU one sample at a time, ship uint8 images and augment on the GPU "
            "with ls.GPUAugment (batched per-sample ops, 4x fewer bytes to copy than float32)"
        )
        tips.append(
            "if the data set fits in GPU memory, ls.DeviceResidentDataModule removes the loader from the step"
        )
    if device.type == "cuda" and not prefetching:
        tips.append(
            "add ls.GPUPrefetcher(depth=2) to copy batches on a side CUDA stream, overlapped with compute"
        )
    return list(dict.fromkeys(tips))  # keep order, drop repeats


class DataStallMonitor(Callback):
    """Log per training step how long the loop waited for data and that wait's share of step time.

    Example::

        monitor = ls.DataStallMonitor(threshold=0.05)
        trainer = L.Trainer(callbacks=[monitor])
        trainer.fit(model, datamodule)
        monitor.summary()   # {'steps': ..., 'wait_fraction': ..., 'mean_wait_ms': ..., ...}

    The wait of a step runs from the end of the previous training step (or the start of the epoch,
    or the end of a validation run) to the start of this one; its compute runs from its
    ``on_train_batch_start`` to its ``on_train_batch_end``. With CUDA timing both are measured on the
    compute stream with events and read once the GPU has passed them (without blocking), so logged
    values can trail the current step by a few steps. Time that callbacks placed after this one
    spend in ``on_train_batch_end`` (e.g. a checkpoint save) counts as wait; augmentation callbacks
    placed after this one count as compute.

    Args:
        threshold: warn once when the mean wait fraction over ``window`` steps exceeds this.
        window: steps averaged for the warning.
        warmup_steps: first steps ignored by the warning and by :meth:`summary` (worker start-up,
            cuDNN autotuning, compilation).
        timing: ``"cuda"`` (events on the compute stream), ``"host"`` (``time.perf_counter``) or
            ``"auto"`` (CUDA on a CUDA device, host otherwise).
        log: log ``{prefix}wait_ms`` and ``{prefix}wait_fraction`` through ``LightningModule.log``.
        prefix: prefix of the logged names.
        max_history: per-step timings kept for :meth:`summary` (the most recent ones), >= 1; None keeps all.
        find_syncs: on CUDA, watch one step cycle after warm-up with ``torch.cuda.set_sync_debug_mode``
            and record where the host waited for the GPU (:attr:`sync_sites`); the warning names them.
            A sync every step keeps the host from running ahead, so the GPU waits for the host's
            per-step work, which this monitor counts as data wait. Warnings other than the sync warnings
            that are raised during the watched cycle are shown when it ends.

    One monitor measures one fit: a fresh ``fit`` (one that starts at step 0, not from a checkpoint)
    starts with no history, its own warm-up, its own warning and sync watch; resuming from a checkpoint
    restores the checkpointed steps and history.

    Raises:
        ValueError: a threshold outside (0, 1), a window < 1, negative warmup, an unknown timing,
            ``log`` not a bool, ``prefix`` not a str, ``max_history`` not an int >= 1 or None,
            or ``timing="cuda"`` on a non-CUDA device (at setup).
    """

    def __init__(
        self,
        threshold: float = 0.1,
        window: int = 50,
        warmup_steps: int = 10,
        timing: Timing = "auto",
        log: bool = True,
        prefix: str = "data/",
        max_history: int | None = 100_000,
        find_syncs: bool = True,
    ) -> None:
        if not isinstance(threshold, (int, float)) or not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold is a fraction of step time in (0, 1); got {threshold!r}.")
        check_int("window", window, 1)
        check_int("warmup_steps", warmup_steps, 0)
        if timing not in ("auto", "cuda", "host"):
            raise ValueError(f"timing must be 'auto', 'cuda' or 'host'; got {timing!r}.")
        if not isinstance(find_syncs, bool):
            raise TypeError(f"find_syncs must be True or False; got {find_syncs!r}.")
        check_bool("log", log)
        if not isinstance(prefix, str):
            raise ValueError(
                f"prefix must be a str (put before the logged names, e.g. 'data/'); got {prefix!r}."
            )
        check_int(
            "max_history", max_history, 1, "per-step timings kept for summary()", allow_none=True,
            hint="None keeps every step.",
        )  # fmt: skip
        self.threshold, self.window, self.warmup_steps = float(threshold), window, warmup_steps
        self.timing: Timing = timing
        self.log_metrics, self.prefix = log, prefix
        self.history: deque[StepTiming] = deque(maxlen=max_history)
        self.warned = False
        self._use_cuda = False
        self._step = 0
        self._mark: Any = None
        self._start: Any = None
        self._pending: deque[tuple[int, Any, Any, Any]] = deque()
        self._recent: deque[StepTiming] = deque(maxlen=window)
        self.find_syncs = find_syncs
        #: Code locations (``file:line``) that synchronised the host with the GPU during the watched step
        #: cycle, with their count; None until a step cycle was watched (only on CUDA, ``find_syncs=True``).
        self.sync_sites: dict[str, float] | None = None
        self._sync_watch: Any = None
        self._sync_caught: list[warnings.WarningMessage] = []
        self._sync_mode_before = 0

    # -- clocks ----------------------------------------------------------------------------------

    def _now(self) -> Any:
        if self._use_cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _elapsed(self, begin: Any, end: Any) -> float:
        if self._use_cuda:
            return begin.elapsed_time(end) / 1e3
        return end - begin

    def _resolve(self, block: bool) -> StepTiming | None:
        """Turn finished steps' marks into timings; return the newest one (None if nothing finished)."""
        newest = None
        while self._pending:
            step, mark, start, end = self._pending[0]
            if self._use_cuda:
                if block:
                    end.synchronize()
                elif not end.query():
                    break
            self._pending.popleft()
            newest = StepTiming(step, self._elapsed(mark, start), self._elapsed(start, end))
            if step >= self.warmup_steps:
                self.history.append(newest)
                self._recent.append(newest)
        return newest

    # -- hooks -----------------------------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        is_cuda = trainer.strategy.root_device.type == "cuda"
        if self.timing == "cuda" and not is_cuda:
            raise ValueError(
                f"DataStallMonitor(timing='cuda') needs a CUDA device; this run uses {trainer.strategy.root_device}. "
                "Use timing='auto' or 'host'."
            )
        if stage == "fit" and trainer.global_step == 0:
            # A fresh fit: its start-up steps are warm-up again and its timings are its own. A resumed fit
            # loads the checkpoint's state after this hook (Lightning restores callbacks after setup).
            self._reset_fit_state()
        self._use_cuda = is_cuda and self.timing != "host"

    def _reset_fit_state(self) -> None:
        self._stop_sync_watch()
        self._step = 0
        self._mark = self._start = None
        self._pending.clear()
        self._recent.clear()
        self.history.clear()
        self.warned = False
        self.sync_sites = None

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark = self._now()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation inside fit is not data wait of the next training step.
        self._mark = self._now()

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start = self._now()

    # -- where the host waits for the GPU ---------------------------------------------------------

    def _start_sync_watch(self) -> None:
        self._sync_watch = warnings.catch_warnings(record=True)
        self._sync_caught = self._sync_watch.__enter__()
        warnings.simplefilter("always")
        self._sync_mode_before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")

    def _stop_sync_watch(self) -> None:
        if self._sync_watch is None:
            return
        torch.cuda.set_sync_debug_mode(self._sync_mode_before)  # what the user had set
        self._sync_watch.__exit__(None, None, None)
        self._sync_watch = None
        sites: dict[str, float] = {}
        others: list[warnings.WarningMessage] = []
        for caught in self._sync_caught:
            if "called a synchronizing CUDA operation" in str(caught.message):
                site = _short_path(caught.filename) + f":{caught.lineno}"
                sites[site] = sites.get(site, 0) + 1
            else:
                others.append(caught)
        self.sync_sites = dict(sorted(sites.items(), key=lambda kv: -kv[1]))
        self._sync_caught = []
        # The watch recorded every warning of the cycle; the others are the user's, shown under their filters.
        for caught in others:
            warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # One whole step cycle is watched: from the end of this hook for step `warmup_steps - 1`, through
        # the loop's own end-of-step work, the next fetch and step, to the start of this hook a step later.
        if self._sync_watch is not None:
            self._stop_sync_watch()
        end = self._now()
        if self._start is not None and self._mark is not None:
            self._pending.append((self._step, self._mark, self._start, end))
        self._step += 1
        self._start = None
        newest = self._resolve(block=False)
        if newest is not None:
            if self.log_metrics:
                log_number(
                    pl_module, f"{self.prefix}wait_ms", newest.wait * 1e3, on_step=True, on_epoch=False
                )
                log_number(
                    pl_module, f"{self.prefix}wait_fraction", newest.fraction, on_step=True, on_epoch=False
                )
            self._maybe_warn(trainer)
        # Marked after this callback's own bookkeeping, so logging is not counted as the next step's wait.
        self._mark = self._now()
        if (
            self._use_cuda
            and self.find_syncs
            and self.sync_sites is None
            and self._step == max(1, self.warmup_steps)
        ):
            self._start_sync_watch()

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve(block=True)
        self._maybe_warn(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_sync_watch()
        self._resolve(block=True)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_sync_watch()  # a run that ended inside the watched step

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Lightning does not call teardown when fit raises: without this, the sync debug mode would stay at
        # "warn" and every later warning of the process would be recorded here and never shown.
        self._stop_sync_watch()

    # -- results ---------------------------------------------------------------------------------

    def _maybe_warn(self, trainer: L.Trainer) -> None:
        if self.warned or len(self._recent) < self.window:
            return
        wait = sum(t.wait for t in self._recent)
        total = sum(t.total for t in self._recent)
        fraction = wait / total if total > 0 else 0.0
        if fraction <= self.threshold:
            return
        self.warned = True
        device = trainer.strategy.root_device
        prefetching = any(isinstance(cb, GPUPrefetcher) and cb.active for cb in trainer.callbacks)
        tips = stall_advice(
            trainer.train_dataloader, device, prefetching, trainer.world_size, self.sync_sites
        )
        advice = "".join(f"\n  - {tip}" for tip in tips) or "\n  - profile the loader with torch.profiler"
        rank_zero_warn(
            f"DataStallMonitor: the training loop waited for data {fraction:.0%} of step time over the last "
            f"{len(self._recent)} steps ({wait / len(self._recent) * 1e3:.2f} ms per step; threshold "
            f"{self.threshold:.0%}). To feed the {device.type.upper()} faster:{advice}"
        )

    def summary(self) -> dict[str, float]:
        """Aggregate of the recorded steps after warm-up: total wait over total time, means and medians.

        Call after ``fit`` (or after the epoch) so every step's CUDA events have been read.
        """
        steps = list(self.history)
        if not steps:
            return {"steps": 0, "wait_fraction": float("nan"), "mean_wait_ms": float("nan"),
                    "mean_step_ms": float("nan"), "median_fraction": float("nan"),
                    "syncs_per_step": float("nan")}  # fmt: skip
        wait = sum(t.wait for t in steps)
        total = sum(t.total for t in steps)
        return {
            "steps": len(steps),
            "wait_fraction": wait / total if total > 0 else 0.0,
            "mean_wait_ms": wait / len(steps) * 1e3,
            "mean_step_ms": total / len(steps) * 1e3,
            "median_fraction": statistics.median(t.fraction for t in steps),
            "syncs_per_step": sum(self.sync_sites.values()) if self.sync_sites is not None else float("nan"),
        }

    @property
    @override
    def state_key(self) -> str:
        # One per prefix, so that two monitors (e.g. a logging and a silent one) checkpoint side by side; Lightning
        # refuses two stateful callbacks with one key.
        return self._generate_state_key(prefix=self.prefix)

    @override
    def state_dict(self) -> dict[str, Any]:
        self._resolve(block=True)  # every finished step's timing read before it is saved
        return {
            "step": self._step,
            "warned": self.warned,
            "history": [(t.step, t.wait, t.compute) for t in self.history],
            "recent": [(t.step, t.wait, t.compute) for t in self._recent],
            "sync_sites": self.sync_sites,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._step = int(state_dict["step"])
        self.warned = bool(state_dict["warned"])
        self.history.clear()
        self.history.extend(StepTiming(*t) for t in state_dict["history"])
        self._recent.clear()
        self._recent.extend(StepTiming(*t) for t in state_dict["recent"])
        self.sync_sites = state_dict["sync_sites"]

    def reset(self) -> None:
        """Forget recorded timings (e.g. to measure a window of a longer run); the warning stays as it is."""
        self._resolve(block=True)
        self.history.clear()
        self._recent.clear()
