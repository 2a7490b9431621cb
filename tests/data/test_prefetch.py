"""GPUPrefetcher and PrefetchLoader on the CPU: nested batch types, pass-through, the Lightning hook-in."""

from __future__ import annotations

import functools
import gc
import inspect
import logging
import pickle
import threading
import time
from collections import OrderedDict, defaultdict, namedtuple
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.types import _Stateful
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_speedup.data.prefetch import (
    GPUPrefetcher,
    PrefetchLoader,
    _BackgroundIterator,
    _InlineAhead,
    _install_dataloader_wrapper,
    iter_tensors,
    map_tensors,
)
from lightning_speedup.data.resident import ResidentBatches

Pair = namedtuple("Pair", ["left", "right"])


@dataclass
class Sample:
    image: Tensor
    meta: dict[str, Any]
    name: str = "x"


@dataclass(frozen=True)
class Frozen:
    value: Tensor
    extra: list[Tensor] = field(default_factory=list)


def nested_batch() -> dict[str, Any]:
    default: defaultdict[str, Tensor] = defaultdict(lambda: torch.zeros(1))
    default["d"] = torch.arange(3)
    return {
        "tuple": (torch.ones(2), 3, "label"),
        "list": [torch.zeros(2, 2), [torch.full((1,), 7.0)]],
        "named": Pair(torch.arange(4), None),
        "sample": Sample(torch.ones(1, 2, 2), {"id": torch.tensor([5])}),
        "frozen": Frozen(torch.tensor(1.5), [torch.tensor(2)]),
        "ordered": OrderedDict(a=torch.tensor([1, 2])),
        "default": default,
    }


def test_map_tensors_rebuilds_every_container_type() -> None:
    batch = nested_batch()
    out = map_tensors(batch, lambda t: t + 1)
    assert type(out["tuple"]) is tuple and out["tuple"][1:] == (3, "label")
    torch.testing.assert_close(out["tuple"][0], torch.full((2,), 2.0))
    assert type(out["list"]) is list and torch.equal(out["list"][1][0], torch.full((1,), 8.0))
    assert type(out["named"]) is Pair and out["named"].right is None
    assert torch.equal(out["named"].left, torch.arange(1, 5))
    assert type(out["sample"]) is Sample and out["sample"].name == "x"
    assert torch.equal(out["sample"].meta["id"], torch.tensor([6]))
    assert type(out["frozen"]) is Frozen and torch.equal(out["frozen"].extra[0], torch.tensor(3))
    assert type(out["ordered"]) is OrderedDict and type(out["default"]) is defaultdict
    assert torch.equal(out["default"]["d"], torch.arange(1, 4))
    assert torch.equal(out["default"]["missing"], torch.zeros(1))  # default_factory kept
    # The input is untouched (new containers, new dataclass instances).
    assert torch.equal(batch["sample"].image, torch.ones(1, 2, 2)) and out["sample"] is not batch["sample"]
    assert len(list(iter_tensors(batch))) == 10
    ids = [id(t) for t in iter_tensors(map_tensors(batch, lambda t: t))]
    assert ids == [id(t) for t in iter_tensors(batch)]  # same visiting order, identity fn keeps tensors


def test_cpu_prefetch_loader_is_a_pass_through() -> None:
    batches = [nested_batch() for _ in range(3)]
    loader = PrefetchLoader(batches, "cpu", depth=2)
    out = list(loader)
    assert len(out) == 3 and all(a is b for a, b in zip(out, batches))
    assert len(loader) == 3


def test_prefetch_loader_forwards_dataloader_attributes() -> None:
    dataset = TensorDataset(torch.arange(10.0))
    dataloader = DataLoader(dataset, batch_size=4)
    loader = PrefetchLoader(dataloader, "cpu")
    assert loader.dataset is dataset and loader.batch_size == 4 and loader.sampler is dataloader.sampler
    assert len(loader) == 3

    def init_fn(worker_id: int) -> None:
        pass

    loader.worker_init_fn = init_fn  # what Lightning's seed_everything(workers=True) does
    assert dataloader.worker_init_fn is init_fn
    with pytest.raises(AttributeError):
        _ = loader.no_such_attribute
    # Not resumable mid-epoch: a stateful loader's position runs `depth` batches ahead of the loop.
    assert not hasattr(PrefetchLoader(StatefulLoader(), "cpu"), "state_dict")
    # ...unless its state counts the batches the loop finished (resident batches under Lightning). Found as
    # Lightning's `_Stateful` check finds it on Python >= 3.12 (statically: no __getattr__), and pickled along.
    tensors = (torch.zeros(8, 1),)
    counting = PrefetchLoader(
        ResidentBatches(tensors, batch_size=2, consumed=functools.partial(int, 0)), "cpu"
    )
    for name in ("state_dict", "load_state_dict"):
        assert inspect.getattr_static(counting, name) == getattr(counting.loader, name)
    assert isinstance(counting, _Stateful) and counting.state_dict() == {"epoch": 0, "batches": 0}
    assert pickle.loads(pickle.dumps(counting)).state_dict() == {"epoch": 0, "batches": 0}
    assert not isinstance(PrefetchLoader(ResidentBatches(tensors, batch_size=2), "cpu"), _Stateful)


class StatefulLoader(list):
    def state_dict(self) -> dict[str, int]:
        return {"position": 0}


@pytest.mark.parametrize("depth", [0, -1, 1.5, True])
def test_depth_must_be_a_positive_int(depth: Any) -> None:
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        GPUPrefetcher(depth=depth)
    with pytest.raises(ValueError, match="depth"):
        PrefetchLoader([], "cpu", depth=depth)


@pytest.mark.parametrize("flag", ["background", "pin_memory"])
def test_flags_must_be_bools(flag: str) -> None:
    with pytest.raises(TypeError, match=f"{flag} must be True or False; got 'yes'"):
        GPUPrefetcher(**{flag: "yes"})
    with pytest.raises(TypeError, match=flag):
        PrefetchLoader([], "cpu", **{flag: 1})


# --- the fetch-ahead machinery of the CUDA path (device-independent, so tested here) -----------------


class CountingSource:
    """An iterator over 0..n-1 that records how many items were taken and whether it was released."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.taken = 0
        self.released = threading.Event()
        self.threads: set[str] = set()

    def __iter__(self) -> Any:
        try:
            for i in range(self.n):
                if i == self.fail_at:
                    raise KeyError(f"sample {i} is missing")
                self.taken += 1
                self.threads.add(threading.current_thread().name)
                yield i
        finally:
            self.released.set()


def wait_until(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.parametrize("ahead", [_BackgroundIterator, _InlineAhead])
def test_fetch_ahead_keeps_order_and_applies_prepare(ahead: Any) -> None:
    source = CountingSource(50)
    out = list(ahead(iter(source), lambda x: (x, x * x), 3))
    assert out == [(i, i * i) for i in range(50)]
    assert source.released.is_set()
    expected_thread = "lightning_speedup-prefetch" if ahead is _BackgroundIterator else "MainThread"
    assert source.threads == {expected_thread}


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_background_fetch_runs_exactly_depth_items_ahead(depth: int) -> None:
    source = CountingSource(100)
    it = _BackgroundIterator(iter(source), lambda x: x, depth)
    assert source.taken == 0  # the thread starts with the first next(), not before
    for consumed in range(1, 6):
        assert next(it) == consumed - 1
        target = consumed + depth
        assert wait_until(lambda t=target: source.taken == t), (source.taken, consumed, depth)
        time.sleep(0.05)  # give an unbounded fetcher the time to run further ahead
        assert source.taken == consumed + depth
    assert it.close(timeout=10)


@pytest.mark.parametrize("ahead", [_BackgroundIterator, _InlineAhead])
def test_fetch_ahead_reraises_the_sources_error_in_order(ahead: Any) -> None:
    it = ahead(iter(CountingSource(10, fail_at=4)), lambda x: x, 2)
    assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
    with pytest.raises(KeyError, match="sample 4 is missing"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_background_fetch_reraises_an_error_of_prepare() -> None:
    def prepare(x: int) -> int:
        if x == 2:
            raise ValueError("cannot copy batch 2")
        return x

    it = _BackgroundIterator(iter(range(5)), prepare, 2)
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(ValueError, match="cannot copy batch 2"):
        next(it)
    assert not it.thread.is_alive()


def test_closing_or_dropping_the_iterator_stops_the_thread_and_releases_the_source() -> None:
    source = CountingSource(1000)
    it = _BackgroundIterator(iter(source), lambda x: x, 2)
    next(it)
    assert it.close(timeout=10) and not it.thread.is_alive()
    assert source.released.wait(10) and source.taken <= 3
    with pytest.raises(StopIteration):
        next(it)

    # A loop that stops early just drops its iterator: that must end the thread too.
    source = CountingSource(1000)
    it = _BackgroundIterator(iter(source), lambda x: x, 2)
    next(it)
    thread = it.thread
    del it
    gc.collect()
    thread.join(10)
    assert not thread.is_alive() and source.released.wait(10)


def test_a_persistent_loader_with_a_running_pass_is_refused() -> None:
    # The guard of the CUDA path's iter(): one running fetch thread per DataLoader with persistent workers.
    from lightning_speedup.data.prefetch import _check_not_shared, _claim, _FetchThread

    release = threading.Event()
    thread = threading.Thread(target=release.wait, daemon=True)
    fetch = _FetchThread(thread, threading.Event(), threading.Semaphore(1))
    persistent = DataLoader(TensorDataset(torch.arange(4.0)), num_workers=1, persistent_workers=True)
    plain = DataLoader(TensorDataset(torch.arange(4.0)))
    _claim(persistent, fetch)
    _claim(plain, fetch)  # not tracked: every pass over it gets its own worker iterator
    _check_not_shared(persistent)  # registered, but its thread is not running
    thread.start()
    try:
        with pytest.raises(RuntimeError, match="give each loop its own DataLoader"):
            _check_not_shared(persistent)
        _check_not_shared(persistent, own=fetch)  # its own previous pass: already waited for and warned about
        _check_not_shared(plain)
    finally:
        release.set()
        thread.join(10)
    _check_not_shared(persistent)  # the pass ended


def test_closing_an_iterator_that_never_started_is_immediate() -> None:
    source = CountingSource(5)
    it = _BackgroundIterator(iter(source), lambda x: x, 2)
    assert it.close(timeout=0) and source.taken == 0
    with pytest.raises(StopIteration):
        next(it)


def test_callback_and_loader_pickle_for_ddp_spawn() -> None:
    # ddp_spawn pickles the callbacks; a PrefetchLoader may be pickled with its trainer's loaders.
    prefetcher = GPUPrefetcher(depth=3, background=False)
    wrapped = PrefetchLoader([1, 2], "cpu")
    prefetcher._wrapped.add(wrapped)  # what a run on CUDA leaves there
    copy = pickle.loads(pickle.dumps(prefetcher))
    assert (copy.depth, copy.background, len(copy._wrapped)) == (3, False, 0) and len(
        prefetcher._wrapped
    ) == 1
    loader = pickle.loads(pickle.dumps(PrefetchLoader([1, 2], "cpu", depth=4)))
    assert list(loader) == [1, 2] and loader.depth == 4


class NestedDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.x = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
        self.y = torch.arange(n) % 2

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"inputs": Pair(self.x[i], self.x[i] * 2), "target": self.y[i], "tag": "s"}


class NestedModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 2)
        self.seen: list[type] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.seen.append(type(batch["inputs"]))
        x = torch.cat([batch["inputs"].left, batch["inputs"].right], dim=1)
        return F.cross_entropy(self.net(x), batch["target"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.seen.append(type(batch["inputs"]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(callbacks: list[L.Callback], **loader_kwargs: Any) -> tuple[NestedModel, L.Trainer]:
    L.seed_everything(0, verbose=False)
    model = NestedModel()
    loader = DataLoader(NestedDataset(24), batch_size=8, **loader_kwargs)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, callbacks=callbacks, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, loader, loader)
    return model, trainer


def test_callback_is_a_logged_no_op_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    baseline, _ = fit([])
    prefetcher = GPUPrefetcher(depth=2)
    with caplog.at_level(logging.WARNING, logger="lightning_speedup.data.prefetch"):
        model, trainer = fit([prefetcher])
        fit([prefetcher])  # said once per callback, not once per fit or stage
    records = [r for r in caplog.records if r.name == "lightning_speedup.data.prefetch"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (
            logging.WARNING,
            "GPUPrefetcher will not act in this run: the accelerator is cpu, not CUDA; batches pass through "
            "unchanged.",
        )
    ]
    assert not prefetcher.active and "process_dataloader" not in vars(trainer.strategy)
    assert isinstance(trainer.train_dataloader, DataLoader)
    assert set(model.seen) == {Pair} and len(model.seen) == 2 * (3 + 3)
    for a, b in zip(baseline.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_loader_wrapping_hooks_in_after_lightning_prepares_the_loaders() -> None:
    # The CUDA path's hook-in point, exercised on the CPU with the pass-through loader: every train and
    # val loader Lightning builds goes through the wrapper, after Lightning's own processing, and the
    # strategy is restored afterwards.
    L.seed_everything(0, verbose=False)
    model = NestedModel()
    wrapped: list[object] = []
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=1,
    )  # fmt: skip
    original = trainer.strategy.process_dataloader

    def wrap(loader: object) -> object:
        wrapped.append(loader)
        return PrefetchLoader(loader, "cpu")  # type: ignore[arg-type]

    uninstall = _install_dataloader_wrapper(trainer.strategy, wrap)
    loader = DataLoader(NestedDataset(24), batch_size=8, shuffle=True)
    trainer.fit(model, loader, DataLoader(NestedDataset(16), batch_size=8))
    assert isinstance(trainer.train_dataloader, PrefetchLoader) and isinstance(
        trainer.val_dataloaders, PrefetchLoader
    )
    assert all(isinstance(w, DataLoader) for w in wrapped) and len(wrapped) == 2
    assert len(model.seen) == 1 + 2 * (3 + 2)  # one sanity-check batch, then 2 epochs of 3 train + 2 val
    uninstall()
    assert "process_dataloader" not in vars(trainer.strategy)
    assert trainer.strategy.process_dataloader == original


def test_a_failed_fit_stops_the_fetch_threads_of_the_loaders_it_wrapped() -> None:
    # Lightning calls on_exception, not teardown, when fit raises.
    prefetcher = GPUPrefetcher()
    loader = PrefetchLoader([], "cpu")
    running = _BackgroundIterator(iter(CountingSource(1000)), lambda x: x, 2)
    next(running)  # the thread now waits for a free slot, two items ahead
    loader._live = running.fetch  # what the CUDA path's iter() records
    prefetcher._wrapped.add(loader)
    prefetcher.on_exception(None, None, RuntimeError("boom"))  # type: ignore[arg-type]
    assert not running.thread.is_alive() and not prefetcher._wrapped and loader._live is None
