"""AsyncProgressBarMetrics and log_number on the CPU: arguments, the no-op, how logged values are passed on.

The CUDA path (deferred progress-bar copies, no host-device sync) is tested on the GPU in
tests/data/test_gpu_data_gpu.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_speedup import AsyncProgressBarMetrics
from lightning_speedup.metrics import log_number


class LoggingModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss, prog_bar=True)
        log_number(self, "step_number", float(batch_idx))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(callbacks: list[L.Callback]) -> tuple[LoggingModel, L.Trainer]:
    L.seed_everything(0, verbose=False)
    data = DataLoader(TensorDataset(torch.randn(24, 4), torch.arange(24) % 2), batch_size=8)
    model = LoggingModel()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(model, data)
    return model, trainer


def test_log_number_logs_a_host_tensor() -> None:
    _, trainer = fit([])
    value = trainer.callback_metrics["step_number"]
    assert value.device.type == "cpu" and value.dtype == torch.float64 and value.item() == 2.0


def test_is_a_logged_no_op_off_cuda(caplog: pytest.LogCaptureFixture) -> None:
    callback = AsyncProgressBarMetrics()
    with caplog.at_level(logging.WARNING, logger="lightning_speedup.metrics"):
        model, trainer = fit([callback])
    said = [r for r in caplog.records if "will not act in this run: the accelerator is cpu" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert not callback.active and "log" not in vars(model) and not callback.deferred
    assert trainer.progress_bar_metrics["train_loss"] == pytest.approx(
        trainer.callback_metrics["train_loss"].item()
    )


@pytest.mark.parametrize("max_lag", [0, -1, 2.0, True])
def test_max_lag_must_be_a_positive_int(max_lag: Any) -> None:
    with pytest.raises(ValueError, match="max_lag must be an int >= 1"):
        AsyncProgressBarMetrics(max_lag=max_lag)


def test_the_wrapper_passes_everything_but_cuda_step_metrics_through() -> None:
    # The interception rules, with the module's log replaced by a recorder (on the CPU no tensor is on
    # CUDA, so every prog_bar call passes through unchanged; numbers become host tensors unless reduced).
    calls: list[tuple[str, Any, dict[str, Any]]] = []

    def record(name: str, value: Any, **kwargs: Any) -> None:
        calls.append((name, value, kwargs))

    module = LoggingModel()
    module._current_fx_name = "training_step"
    log = AsyncProgressBarMetrics()._log(module, record)
    log("loss", torch.tensor(1.5), prog_bar=True)
    log("lr", 0.25, prog_bar=True)
    log("reduced", 3.0, sync_dist=True)
    log("flag", True)
    names = {name: (value, kwargs) for name, value, kwargs in calls}
    assert names["loss"][1]["prog_bar"] is True and names["loss"][0].item() == 1.5
    lr, kwargs = names["lr"]
    assert isinstance(lr, Tensor) and lr.device.type == "cpu" and lr.item() == 0.25 and kwargs["prog_bar"]
    assert names["reduced"][0] == 3.0 and names["flag"][0] is True  # reduced numbers and bools as they were


class OnCuda(Tensor):
    """A CPU tensor that says it is on CUDA: what a metric logged in a GPU run looks like to the wrapper."""

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True


def test_reduced_metrics_are_passed_through_and_shown_reduced() -> None:
    # Lightning reduces a clone of a sync_dist value, so a deferred copy of the caller's tensor showed the rank's
    # own value in the progress bar; a reduced metric keeps prog_bar and is not copied.
    calls: dict[str, dict[str, Any]] = {}

    def record(name: str, value: Any, **kwargs: Any) -> None:
        calls[name] = kwargs

    module = LoggingModel()
    module._current_fx_name = "training_step"
    callback = AsyncProgressBarMetrics()
    copied: list[str] = []
    callback._copy = lambda name, value: copied.append(name)  # type: ignore[method-assign]
    log = callback._log(module, record)
    log("local", torch.tensor(1.0).as_subclass(OnCuda), prog_bar=True)
    log("reduced", torch.tensor(1.0).as_subclass(OnCuda), prog_bar=True, sync_dist=True)
    assert calls["local"]["prog_bar"] is False  # deferred, as before
    assert calls["reduced"]["prog_bar"] is True and calls["reduced"]["sync_dist"] is True
    assert copied == ["local"]


def test_log_number_with_sync_dist_leaves_the_tensor_to_lightning() -> None:
    # A CPU tensor logged with sync_dist would be all-reduced on the CPU, which NCCL (a GPU run) cannot do.
    calls: dict[str, tuple[Any, dict[str, Any]]] = {}
    module = LoggingModel()
    module.log = lambda name, value, **kwargs: calls.update({name: (value, kwargs)})  # type: ignore[method-assign]
    log_number(module, "reduced", 3, sync_dist=True)
    log_number(module, "local", 3)
    assert calls["reduced"] == (3.0, {"sync_dist": True}) and isinstance(calls["reduced"][0], float)
    local = calls["local"][0]
    assert isinstance(local, Tensor) and local.device.type == "cpu" and local.dtype == torch.float64


class LogsItsRank(LoggingModel):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        log_number(self, "rank_number", float(self.global_rank), sync_dist=True)
        return F.cross_entropy(self.net(batch[0]), batch[1])


class WritesMetrics(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics["rank_number"]
        result = {"value": value.item(), "dtype": str(value.dtype), "device": value.device.type}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def test_log_number_with_sync_dist_logs_the_mean_over_ranks_under_ddp(tmp_path: Path) -> None:
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.arange(16) % 2), batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="fork"), max_steps=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        callbacks=[WritesMetrics(tmp_path)],
    )  # fmt: skip
    trainer.fit(LogsItsRank(), data)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Rank 0 logs 0, rank 1 logs 1. The tensor is Lightning's own (default dtype, the module's device), not the
    # float64 host tensor of a log_number without sync_dist.
    assert ranks == [{"value": 0.5, "dtype": str(torch.get_default_dtype()), "device": "cpu"}] * 2


class Arrival:
    """Stands in for a CUDA event: whether the copy has arrived, and a record of being waited for."""

    def __init__(self, done: bool) -> None:
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True


def test_the_progress_bar_shows_the_newest_arrived_copy_and_waits_only_at_epoch_end() -> None:
    callback = AsyncProgressBarMetrics(max_lag=3)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    late = Arrival(False)
    for value, arrival in ((1.0, Arrival(True)), (2.0, Arrival(True)), (3.0, late)):
        callback._pending["loss"].append((torch.tensor(value), arrival))
    callback._publish(trainer)
    assert trainer.progress_bar_metrics["loss"] == 2.0  # the newest that arrived; the third is in flight
    assert list(callback._pending["loss"]) == [(callback._pending["loss"][0][0], late)] and not late.waited
    for value in (4.0, 5.0, 6.0):  # more copies than max_lag: the oldest in flight is dropped
        callback._pending["loss"].append((torch.tensor(value), Arrival(False)))
    assert [t.item() for t, _ in callback._pending["loss"]] == [4.0, 5.0, 6.0]
    callback._publish(trainer, wait=True)  # the end of an epoch: every copy waited for, the last one shown
    assert trainer.progress_bar_metrics["loss"] == 6.0 and not callback._pending["loss"]


def test_a_failed_fit_restores_the_modules_log() -> None:
    # Lightning calls on_exception, not teardown, when fit raises; the module must get its own log back.
    module = LoggingModel()
    callback = AsyncProgressBarMetrics()
    original = module.log
    module.log = callback._log(module, original)  # type: ignore[method-assign]

    def restore() -> None:
        del module.log

    callback._restore = restore
    callback._pending["loss"].append((torch.tensor(1.0), Arrival(True)))
    callback.on_exception(None, module, RuntimeError("boom"))  # type: ignore[arg-type]
    assert "log" not in vars(module) and not callback.active and not callback._pending
