"""Time-to-target measurement (the MLPerf/DAWNBench headline metric) as a Lightning callback.

Wall time runs from the start of ``fit`` (the callback's ``setup``) to the end of the first
validation whose metric is at or past the target. Everything in between counts: data loading,
compilation, validation. The warm-up (compilation, cuDNN autotuning, the sanity check) is reported
in its own column, never subtracted. Throughput is training samples per second of training time
(validation excluded), median over epochs after the first.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from typing_extensions import override


def _batch_size(batch: Any) -> int:
    """Leading dimension of the first tensor in a (nested) batch."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, dict):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            n = _batch_size(item)
            if n:
                return n
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimeToTarget(Callback):
    """Records time to target, warm-up, throughput, peak GPU memory and the metric history.

    Args:
        metric: logged validation metric to watch (e.g. ``"val_acc"``).
        target: the quality target.
        mode: ``"max"`` (reached when metric >= target) or ``"min"`` (metric <= target).
        stop_at_target: stop training at the first validation that reaches the target.
    """

    def __init__(self, metric: str, target: float, mode: str = "max", stop_at_target: bool = True) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}.")
        self.metric, self.target, self.mode, self.stop_at_target = metric, target, mode, stop_at_target
        self.history: list[dict[str, float]] = []
        self.time_to_target_s: float | None = None
        self.epochs_to_target: int | None = None
        self.steps_to_target: int | None = None
        self.step_times: list[float] = []
        self.epoch_train_s: list[float] = []
        self.epoch_samples: list[int] = []
        self.sanity_s = 0.0
        self.total_s = 0.0
        self.peak_mem_mb: float | None = None
        self._t0 = 0.0
        self.clock_started_at: float | None = None
        self._samples = 0
        self._epoch_t0 = 0.0
        self._epoch_samples = 0
        self._val_s_in_epoch = 0.0
        self._val_t0 = 0.0
        self._step_t0 = 0.0

    def reached(self, value: float) -> bool:
        return value >= self.target if self.mode == "max" else value <= self.target

    @property
    def warmup_s(self) -> float:
        """First training step beyond the median step, plus the sanity-check validation."""
        if not self.step_times:
            return self.sanity_s
        extra = self.step_times[0] - statistics.median(self.step_times[1:] or self.step_times)
        return max(0.0, extra) + self.sanity_s

    @property
    def samples_per_s(self) -> float | None:
        rates = [n / t for n, t in zip(self.epoch_samples, self.epoch_train_s) if t > 0 and n > 0]
        if not rates:
            return None
        return statistics.median(rates[1:] or rates)

    @property
    def best_metric(self) -> float | None:
        values = [h["metric"] for h in self.history]
        if not values:
            return None
        return max(values) if self.mode == "max" else min(values)

    def _now(self, trainer: L.Trainer) -> float:
        _sync(trainer.strategy.root_device)
        return time.perf_counter()

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        self._t0 = time.perf_counter()
        self.clock_started_at = time.time()  # wall clock, for the bench's account of what came before

    @override
    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_t0 = self._now(trainer)

    @override
    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.sanity_s = self._now(trainer) - self._val_t0

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_t0 = self._now(trainer)
        self._epoch_samples = 0
        self._val_s_in_epoch = 0.0

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if len(self.step_times) < 50:  # a few dozen steps give the median; later steps run unsynchronised
            self._step_t0 = self._now(trainer)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = _batch_size(batch) * trainer.world_size
        self._epoch_samples += n
        self._samples += n
        if len(self.step_times) < 50:
            self.step_times.append(self._now(trainer) - self._step_t0)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._val_t0 = self._now(trainer)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        now = self._now(trainer)
        self._val_s_in_epoch += now - self._val_t0
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            raise KeyError(
                f"TimeToTarget watches {self.metric!r}, but validation logged only "
                f"{sorted(trainer.callback_metrics)}. Log {self.metric!r} in validation_step."
            )
        value = float(value)
        elapsed = now - self._t0
        self.history.append(
            {"time_s": elapsed, "epoch": trainer.current_epoch + 1, "step": trainer.global_step,
             "samples": self._samples, "metric": value}
        )  # fmt: skip
        if self.time_to_target_s is None and self.reached(value):
            self.time_to_target_s = elapsed
            self.epochs_to_target = trainer.current_epoch + 1
            self.steps_to_target = trainer.global_step
            if self.stop_at_target:
                trainer.should_stop = True

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation runs inside the training epoch; its time is not training time.
        self.epoch_train_s.append(self._now(trainer) - self._epoch_t0 - self._val_s_in_epoch)
        self.epoch_samples.append(self._epoch_samples)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total_s = self._now(trainer) - self._t0
        if trainer.strategy.root_device.type == "cuda":
            self.peak_mem_mb = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**20

    def summary(self) -> dict[str, Any]:
        return {
            "reached": self.time_to_target_s is not None,
            "time_to_target_s": self.time_to_target_s,
            "epochs_to_target": self.epochs_to_target,
            "steps_to_target": self.steps_to_target,
            "best_metric": self.best_metric,
            "final_metric": self.history[-1]["metric"] if self.history else None,
            "warmup_s": self.warmup_s,
            "sanity_s": self.sanity_s,
            "first_step_s": self.step_times[0] if self.step_times else None,
            "samples_per_s": self.samples_per_s,
            "peak_mem_mb": self.peak_mem_mb,
            "total_s": self.total_s,
            "epochs": len(self.epoch_train_s),
            "history": list(self.history),
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "time_to_target_s": self.time_to_target_s,
            "epochs_to_target": self.epochs_to_target,
            "steps_to_target": self.steps_to_target,
            "samples": self._samples,
            "epoch_train_s": self.epoch_train_s,
            "epoch_samples": self.epoch_samples,
            # None before fit started (a fresh callback, e.g. pickled for ddp_spawn)
            "elapsed_s": time.perf_counter() - self._t0 if self._t0 else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
        self.time_to_target_s = state_dict["time_to_target_s"]
        self.epochs_to_target = state_dict["epochs_to_target"]
        self.steps_to_target = state_dict["steps_to_target"]
        # Older checkpoints have no counters: take the samples from the last history row.
        last = self.history[-1]["samples"] if self.history else 0
        self._samples = int(state_dict.get("samples", last))
        self.epoch_train_s = list(state_dict.get("epoch_train_s", []))
        self.epoch_samples = list(state_dict.get("epoch_samples", []))
        if state_dict.get("elapsed_s") is not None:
            # Lightning restores callback state after setup(): the clock continues from the saved time, so a
            # resumed run's times count training time, not the interruption.
            self._t0 = time.perf_counter() - float(state_dict["elapsed_s"])
