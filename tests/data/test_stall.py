"""DataStallMonitor with the host clock: slow loaders show up as wait, slow compute does not."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_speedup.data.prefetch import PrefetchLoader
from lightning_speedup.data.resident import ResidentBatches
from lightning_speedup.data.stall import DataStallMonitor, StepTiming, stall_advice

# Sleeps are lower bounds of what the monitor must measure, so the assertions hold on a loaded machine.
LOAD_S = 0.05  # per batch, in the loader
COMPUTE_S = 0.1  # per step, in training_step


class SlowBatches(Dataset):
    """Each item is a whole batch (DataLoader(batch_size=None)) that takes ``delay`` seconds to load."""

    def __init__(self, n: int, delay: float) -> None:
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        time.sleep(self.delay)
        return torch.randn(4, 8), torch.arange(4) % 2


class Model(L.LightningModule):
    def __init__(self, compute_s: float = 0.0, val_s: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Linear(8, 2)
        self.compute_s, self.val_s = compute_s, val_s
        self.val_calls = 0

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        time.sleep(self.compute_s)
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.val_calls += 1
        time.sleep(self.val_s)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(
    monitor: DataStallMonitor,
    load_s: float,
    compute_s: float,
    steps: int = 12,
    callbacks: list[L.Callback] | None = None,
    ckpt_path: str | None = None,
    **kwargs: Any,
) -> L.Trainer:
    loader = DataLoader(SlowBatches(steps, load_s), batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[monitor, *(callbacks or [])], **kwargs,
    )  # fmt: skip
    trainer.fit(Model(compute_s), loader, ckpt_path=ckpt_path)
    return trainer


def test_slow_loader_is_reported_as_wait_and_warned_once() -> None:
    monitor = DataStallMonitor(threshold=0.05, window=5, warmup_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = run(monitor, load_s=LOAD_S, compute_s=0.0)
    stall = [str(w.message) for w in caught if "DataStallMonitor" in str(w.message)]
    assert len(stall) == 1
    assert "num_workers=0" in stall[0] and "GPUAugment" in stall[0] and "DeviceResidentDataModule" in stall[0]
    summary = monitor.summary()
    assert summary["steps"] == 10 and summary["mean_wait_ms"] >= LOAD_S * 1e3
    assert all(t.wait >= LOAD_S for t in monitor.history)  # the sleep is a lower bound of the wait
    assert {"data/wait_ms", "data/wait_fraction"} <= set(trainer.callback_metrics)
    assert trainer.callback_metrics["data/wait_ms"] >= LOAD_S * 1e3
    # logged as host tensors: on CUDA a number logged as is becomes a device tensor through a blocking copy
    assert trainer.callback_metrics["data/wait_ms"].device.type == "cpu"
    assert (
        monitor.sync_sites is None and summary["syncs_per_step"] != summary["syncs_per_step"]
    )  # CUDA only: nan


def test_slow_compute_is_not_wait() -> None:
    monitor = DataStallMonitor(threshold=0.5, window=5, warmup_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(monitor, load_s=0.0, compute_s=COMPUTE_S, steps=8)
    assert not any("DataStallMonitor" in str(w.message) for w in caught) and not monitor.warned
    assert len(monitor.history) == 6 and all(t.compute >= COMPUTE_S for t in monitor.history)
    assert monitor.summary()["median_fraction"] < 0.5


def test_validation_time_is_not_counted_as_wait() -> None:
    monitor = DataStallMonitor(warmup_steps=0, log=False)
    loader = DataLoader(SlowBatches(6, 0.0), batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[monitor], val_check_interval=2,
    )  # fmt: skip
    model = Model(val_s=0.25)
    trainer.fit(model, loader, DataLoader(SlowBatches(1, 0.0), batch_size=None))
    assert model.val_calls == 3 and len(monitor.history) == 6
    assert all(t.wait < 0.25 for t in monitor.history)


def test_two_monitors_checkpoint_and_resume_each_its_own_state(tmp_path: Path) -> None:
    """A logging monitor beside a silent one (as the GPU tests run them): Lightning refuses two stateful callbacks
    with one state key, so each monitor's key carries its prefix, and a resume gives each its own steps back."""

    def monitors() -> list[DataStallMonitor]:
        return [DataStallMonitor(warmup_steps=2, prefix="a/"), DataStallMonitor(warmup_steps=5, log=False)]

    first = monitors()
    trainer = run(
        first[0], load_s=0.0, compute_s=0.0, steps=8, callbacks=[first[1]], default_root_dir=tmp_path
    )
    assert [len(m.history) for m in first] == [6, 3]
    ckpt = tmp_path / "end.ckpt"
    trainer.save_checkpoint(ckpt)
    keys = set(torch.load(ckpt, weights_only=False)["callbacks"])
    assert {m.state_key for m in first} <= keys and first[0].state_key != first[1].state_key

    resumed = monitors()  # the run ended with its epoch: fitting from the checkpoint only restores
    run(resumed[0], load_s=0.0, compute_s=0.0, steps=8, callbacks=[resumed[1]], ckpt_path=str(ckpt))
    for before, after in zip(first, resumed):
        assert list(after.history) == list(before.history) and after._step == before._step == 8


def test_advice_names_the_loader_settings() -> None:
    loader = DataLoader(SlowBatches(2, 0.0), batch_size=None, num_workers=0, pin_memory=False)
    tips = stall_advice([PrefetchLoader(loader, "cpu")], torch.device("cuda"), prefetching=False)
    text = " | ".join(tips)
    assert "num_workers=0" in text and "pin_memory=True" in text and "GPUPrefetcher" in text
    assert stall_advice({"a": loader}, torch.device("cpu"), prefetching=False)[0].startswith("the DataLoader")
    resident = ResidentBatches((torch.zeros(4, 1),), batch_size=2)
    assert "already live on the device" in stall_advice(resident, torch.device("cpu"), True)[0]
    assert StepTiming(0, 1.0, 3.0).fraction == 0.25
    site = "lightning/fabric/utilities/apply_func.py:134"
    first = stall_advice(loader, torch.device("cuda"), prefetching=True, sync_sites={site: 1.0})[0]
    assert first.startswith(f"the loop synchronises the host with the GPU every step, at {site} (1x)")
    assert "ls.AsyncProgressBarMetrics()" in first and "prog_bar=False" in first
    assert not any(
        "synchronises" in tip for tip in stall_advice(loader, torch.device("cuda"), True, sync_sites={})
    )


def test_sync_sites_are_named_relative_to_their_import_root() -> None:
    import lightning.fabric.utilities.apply_func as apply_func

    from lightning_speedup.data.stall import _short_path

    assert _short_path(apply_func.__file__) == "lightning/fabric/utilities/apply_func.py"
    assert _short_path("/nowhere/on/the/path.py") == "/nowhere/on/the/path.py"


def test_bad_arguments() -> None:
    for kwargs in (
        {"threshold": 0.0},
        {"threshold": 1.5},
        {"window": 0},
        {"warmup_steps": -1},
        {"timing": "gpu"},
    ):
        with pytest.raises(ValueError):
            DataStallMonitor(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="find_syncs must be True or False"):
        DataStallMonitor(find_syncs="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"timing='cuda'.*needs a CUDA device"):
        run(DataStallMonitor(timing="cuda"), load_s=0.0, compute_s=0.0, steps=1)


def test_bad_flags_and_history_are_clear_errors() -> None:
    for kwargs, match in (
        (
            {"max_history": 0},
            r"^max_history must be an int >= 1 or None \(per-step timings kept for summary\(\)\)",
        ),
        ({"max_history": -1}, "max_history must be an int >= 1 or None"),
        ({"max_history": 10.0}, "max_history must be an int >= 1 or None"),
        ({"log": "no"}, r"^log must be True or False, got 'no'\.$"),
        ({"prefix": 3}, r"^prefix must be a str"),
    ):
        with pytest.raises(ValueError, match=match):
            DataStallMonitor(**kwargs)  # type: ignore[arg-type]
    assert DataStallMonitor(max_history=None).history.maxlen is None


class SlowFirstBatch(SlowBatches):
    """The first batch of every pass takes ``delay`` seconds (worker start-up, autotuning), the rest none."""

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if i == 0:
            time.sleep(self.delay)
        return torch.randn(4, 8), torch.arange(4) % 2


def test_a_reused_monitor_measures_each_fresh_fit_on_its_own() -> None:
    """A second fit gets its own warm-up: its slow start-up step is not recorded and does not warn, and the
    history holds its steps only, as a new monitor's would."""
    monitor = DataStallMonitor(threshold=0.5, window=2, warmup_steps=2, log=False)
    run(monitor, load_s=0.0, compute_s=0.0, steps=6)
    first = list(monitor.history)
    loader = DataLoader(SlowFirstBatch(6, 0.3), batch_size=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = L.Trainer(
            accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, num_sanity_val_steps=0, callbacks=[monitor],
        )  # fmt: skip
        trainer.fit(Model(), loader)
    assert not [w for w in caught if "DataStallMonitor" in str(w.message)] and not monitor.warned
    assert [t.step for t in monitor.history] == [2, 3, 4, 5] and monitor._step == 6
    assert all(t.wait < 0.3 for t in monitor.history) and list(monitor.history) != first


def test_an_exception_in_the_watched_cycle_ends_the_sync_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning calls on_exception, not teardown, when fit raises. The watch must end there: restore the sync
    debug mode and stop recording the process's warnings (and show the ones it recorded that are not sync
    warnings). The CPU build of torch has no sync debug mode, so only its two functions are stood in for;
    the CUDA path runs in test_gpu_data_gpu.py."""
    mode = {"value": 0}
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode["value"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda value: mode.__setitem__("value", value))
    monitor = DataStallMonitor(warmup_steps=0, log=False)

    class StartWatch(L.Callback):  # where the monitor starts it on CUDA: inside the step cycle
        def on_train_batch_start(self, *args: Any) -> None:
            monitor._start_sync_watch()

    class Failing(Model):
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            warnings.warn("a warning of the user's step", stacklevel=1)
            raise RuntimeError("the watched step failed")

    loader = DataLoader(SlowBatches(2, 0.0), batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=[monitor, StartWatch()],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="the watched step failed"):
            trainer.fit(Failing(), loader)
        assert monitor._sync_watch is None and mode["value"] == 0 and monitor.sync_sites == {}
        warnings.warn("a later warning", stacklevel=1)
    messages = [str(w.message) for w in caught]
    assert "a warning of the user's step" in messages and "a later warning" in messages
    assert monitor._sync_caught == []
