"""GPU data path on a real CUDA device: exactness and memory of the prefetcher, and what the monitor sees.

Run on the device machine: ``pytest -m gpu tests/data/test_gpu_data_gpu.py``.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate

from lightning_speedup.bench.datamodules import FashionMNISTDataModule
from lightning_speedup.bench.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from lightning_speedup.data.augment import Compose, Cutout, MixUp, Normalize, RandomCrop, RandomHorizontalFlip
from lightning_speedup.data.gpu_augment import GPUAugment
from lightning_speedup.data.prefetch import GPUPrefetcher, PrefetchLoader
from lightning_speedup.data.resident import DeviceResidentDataModule, ResidentBatches
from lightning_speedup.data.stall import DataStallMonitor

pytestmark = pytest.mark.gpu


def gpu_trainer(**kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="gpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0,
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


class SmallCNN(L.LightningModule):
    """Conv-BN-ReLU with strided convs (no max-pool, whose backward has no deterministic CUDA kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 10),
        )  # fmt: skip
        self.devices_before_transfer: set[str] = set()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.devices_before_transfer.add(batch[0].device.type)
        return batch

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        assert batch[0].is_cuda and batch[0].dtype == torch.float32

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _fit_fashion(fashion_mnist_dir: Path, prefetch: bool, background: bool = True) -> SmallCNN:
    L.seed_everything(0, verbose=False)
    dm = FashionMNISTDataModule(
        fashion_mnist_dir,
        batch_size=64,
        num_workers=2,
        augment=False,
        output="uint8",
        train_subset=200 * 64,
        val_subset=512,
    )
    model = SmallCNN()
    callbacks: list[L.Callback] = [
        GPUAugment(RandomCrop(28, padding=2), RandomHorizontalFlip(), Cutout(6),
                   Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD), seed=1),
    ]  # fmt: skip
    if prefetch:
        callbacks.insert(0, GPUPrefetcher(depth=2, background=background))
    trainer = gpu_trainer(max_steps=200, callbacks=callbacks, deterministic=True, limit_val_batches=2)
    trainer.fit(model, dm)
    assert isinstance(trainer.train_dataloader, PrefetchLoader) == prefetch
    return model


@pytest.mark.parametrize("background", [True, False], ids=["fetch-thread", "training-thread"])
def test_prefetcher_gives_bitwise_identical_weights(fashion_mnist_dir: Path, background: bool) -> None:
    plain = _fit_fashion(fashion_mnist_dir, prefetch=False)
    prefetched = _fit_fashion(fashion_mnist_dir, prefetch=True, background=background)
    assert plain.devices_before_transfer == {"cpu"} and prefetched.devices_before_transfer == {"cuda"}
    for (name, a), b in zip(plain.state_dict().items(), prefetched.state_dict().values()):
        assert torch.equal(a, b), name


class PinnedBatches(Dataset):
    """``n`` distinct batches built once in pinned host memory; item i is batch i."""

    def __init__(self, n: int, shape: tuple[int, ...], classes: int = 10) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = [torch.randn(shape, generator=g).pin_memory() for _ in range(n)]
        self.y = [torch.randint(0, classes, shape[:1], generator=g).pin_memory() for _ in range(n)]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


class MLP(L.LightningModule):
    def __init__(self, width: int, depth: int, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, classes))
        self.allocated: list[int] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x.flatten(1)), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.allocated.append(torch.cuda.memory_allocated())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_prefetcher_memory_does_not_grow_over_2000_steps() -> None:
    loader = DataLoader(PinnedBatches(100, (256, 1024)), batch_size=None, shuffle=False, num_workers=0)
    model = MLP(1024, 1)
    gpu_trainer(max_steps=2000, callbacks=[GPUPrefetcher(depth=3)]).fit(model, loader)
    allocated = model.allocated
    assert len(allocated) == 2000
    early, late = max(allocated[100:600]), max(allocated[1500:])
    # A leak of the copies would add a batch (1 MiB) per step; allow two batches of jitter in flight.
    batch_bytes = 256 * 1024 * 4 + 256 * 8
    assert late <= early + 2 * batch_bytes, f"allocated memory grew from {early:,} to {late:,} bytes"


class LossLogger(MLP):
    def __init__(self, prog_bar: bool) -> None:
        super().__init__(1024, 1)
        self.prog_bar = prog_bar

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, prog_bar=self.prog_bar)
        return loss


@pytest.mark.parametrize("prog_bar", [True, False])
def test_monitor_finds_the_per_step_sync_of_a_progress_bar_metric(prog_bar: bool) -> None:
    # Lightning reads prog_bar metrics with .item() after every step, even without a progress bar. The
    # first monitor logs its numbers every step inside the second one's watched step cycle: they must
    # not synchronise (log_number), so with prog_bar=False the watched cycle has no sync at all.
    logging_monitor = DataStallMonitor(warmup_steps=3, prefix="first/", find_syncs=False)
    monitor = DataStallMonitor(warmup_steps=3, log=False)
    loader = DataLoader(PinnedBatches(12, (256, 1024)), batch_size=None)
    gpu_trainer(max_epochs=1, callbacks=[logging_monitor, monitor]).fit(LossLogger(prog_bar), loader)
    assert logging_monitor.sync_sites is None
    if prog_bar:
        assert monitor.sync_sites is not None and len(monitor.sync_sites) == 1, monitor.sync_sites
        ((site, count),) = monitor.sync_sites.items()
        assert site.startswith("lightning/fabric/utilities/apply_func.py:") and count == 1
        assert monitor.summary()["syncs_per_step"] == 1
    else:
        assert monitor.sync_sites == {}


class StepLosses(LossLogger):
    def __init__(self) -> None:
        super().__init__(prog_bar=True)
        self.losses: list[Tensor] = []

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.detach())
        self.log("lr", 0.5, prog_bar=True)  # a number: logged as a host tensor, no blocking copy
        return loss


def test_async_progress_bar_metrics_remove_the_sync_and_keep_every_value() -> None:
    from lightning_speedup import AsyncProgressBarMetrics

    async_metrics = AsyncProgressBarMetrics()
    logging_monitor = DataStallMonitor(warmup_steps=3, prefix="first/", find_syncs=False)
    monitor = DataStallMonitor(warmup_steps=3, log=False)
    model = StepLosses()
    loader = DataLoader(PinnedBatches(12, (256, 1024)), batch_size=None)
    trainer = gpu_trainer(max_epochs=1, callbacks=[async_metrics, logging_monitor, monitor])
    trainer.fit(model, loader)
    assert monitor.sync_sites == {}, monitor.sync_sites  # the prog_bar metric no longer syncs every step
    assert async_metrics.deferred == {"train_loss"} and not async_metrics.active and "log" not in vars(model)
    # Loggers and callbacks get the tensor as before (Lightning moves its results to the CPU at the end of
    # fit); the progress bar gets the last step's exact value.
    assert trainer.callback_metrics["train_loss"].item() == model.losses[-1].item()
    assert trainer.progress_bar_metrics["train_loss"] == model.losses[-1].item()
    assert trainer.progress_bar_metrics["lr"] == 0.5


def test_monitor_reports_a_slow_loader() -> None:
    class SlowLoader(PinnedBatches):
        def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
            time.sleep(0.03)  # a loader that cannot keep up with a 1-layer MLP
            return super().__getitem__(i)

    monitor = DataStallMonitor(warmup_steps=3, window=10, log=False)
    loader = DataLoader(SlowLoader(20, (256, 1024)), batch_size=None)
    gpu_trainer(max_epochs=1, callbacks=[monitor]).fit(MLP(1024, 1), loader)
    assert monitor._use_cuda and monitor.warned
    summary = monitor.summary()
    assert summary["steps"] == 17 and summary["wait_fraction"] > 0.5 and summary["mean_wait_ms"] > 25


def _calibrate_depth(batch_shape: tuple[int, int], width: int) -> int:
    """Layers of an MLP whose bf16 step takes about twice as long as copying one batch to the GPU."""
    host = torch.randn(batch_shape).pin_memory()
    layer = nn.Linear(width, width).cuda()
    x = torch.randn(batch_shape, device="cuda")
    start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    for _ in range(3):  # warm up, then time the last round
        start.record()
        host.to("cuda", non_blocking=True)
        mid.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            layer(x).float().sum().backward()
        end.record()
        torch.cuda.synchronize()
    copy_ms, layer_ms = start.elapsed_time(mid), mid.elapsed_time(end)
    return max(1, min(64, math.ceil(2 * copy_ms / layer_ms)))


def _wait_fraction(data: PinnedBatches, prefetch: bool, depth: int) -> float:
    loader = DataLoader(data, batch_size=None)
    monitor = DataStallMonitor(warmup_steps=10, log=False)
    callbacks: list[L.Callback] = [monitor] + ([GPUPrefetcher(depth=2)] if prefetch else [])
    gpu_trainer(max_epochs=6, precision="bf16-mixed", callbacks=callbacks).fit(
        MLP(data.x[0].shape[1], depth), loader
    )
    return monitor.summary()["wait_fraction"]


def test_monitor_sees_the_copy_and_the_prefetcher_hides_it() -> None:
    # Copy-heavy batches (128 MiB) and a step about twice as long as their copy: on the compute stream
    # the copy is about a third of step time; on a side stream it overlaps the previous step.
    shape = (8192, 4096)
    depth = _calibrate_depth(shape, shape[1])
    data = PinnedBatches(8, shape)
    plain = _wait_fraction(data, prefetch=False, depth=depth)
    prefetched = _wait_fraction(data, prefetch=True, depth=depth)
    assert plain > 0.15, plain
    # Measured 0.275 without and 0.051 with the prefetcher on an H100, 0.283 and 0.075 on an H200
    # (2026-11-27): the copy is hidden, what remains is the loop's own host work between steps, which
    # weighs more on the faster GPU, and more still on a busy host (0.286 and 0.167 on an H200 while
    # another job profiled on the same host's other GPUs). So: the wait at least cut by a third.
    assert prefetched < 0.2 and prefetched < plain / 1.5, (plain, prefetched)


def test_ops_on_cuda_are_reproducible_and_resident_data_stays_on_device(fashion_mnist_dir: Path) -> None:
    images = torch.randint(0, 256, (512, 1, 28, 28), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 10, (512,), device="cuda")
    pipe = Compose(RandomCrop(28, padding=2), RandomHorizontalFlip(), Normalize(0.286, 0.353), MixUp(0.4, 10))
    runs = [pipe(images, labels, torch.Generator(device="cuda").manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])

    dm = DeviceResidentDataModule.from_fashion_mnist(fashion_mnist_dir, batch_size=500)
    model = SmallCNN()
    aug = GPUAugment(
        RandomCrop(28, padding=2), RandomHorizontalFlip(), Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    )
    trainer = gpu_trainer(max_epochs=1, limit_val_batches=2, callbacks=[aug])
    trainer.fit(model, dm)
    assert dm.resident and isinstance(trainer.train_dataloader, ResidentBatches)
    assert trainer.train_dataloader.device.type == "cuda" and model.devices_before_transfer == {"cuda"}


Pair = namedtuple("Pair", ["image", "label"])


@dataclass
class Meta:
    ids: Tensor
    note: str


class NestedUint8(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = torch.full((1, 28, 28), i, dtype=torch.uint8)
        return {"pair": Pair(image, torch.tensor(i)), "meta": Meta(torch.tensor([i, -i]), "n")}


def collate_nested(samples: list[dict[str, Any]]) -> dict[str, Any]:
    # default_collate does not know dataclasses; the DataLoader's pin thread leaves them unpinned, so
    # this also exercises the prefetcher's own pinning.
    return {
        "pair": default_collate([s["pair"] for s in samples]),
        "meta": Meta(torch.stack([s["meta"].ids for s in samples]), "n"),
    }


class NestedCheck(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(28 * 28, 10)
        self.checked = 0

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # The prefetcher already moved every tensor, kept every container type and every dtype.
        assert type(batch["pair"]) is Pair and type(batch["meta"]) is Meta and batch["meta"].note == "n"
        assert batch["pair"].image.is_cuda and batch["pair"].image.dtype == torch.uint8
        assert batch["meta"].ids.is_cuda and batch["meta"].ids.dtype == torch.int64
        self.checked += 1
        return batch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image, label = batch["pair"]
        assert torch.equal(batch["meta"].ids[:, 0], label)
        assert torch.equal(image[:, 0, 0, 0].long(), label % 256)
        return F.cross_entropy(self.net(image.flatten(1).float()), label % 10)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_prefetcher_moves_nested_batches_and_keeps_uint8() -> None:
    loader = DataLoader(
        NestedUint8(), batch_size=16, pin_memory=True, num_workers=2, collate_fn=collate_nested
    )
    model = NestedCheck()
    trainer = gpu_trainer(max_epochs=2, callbacks=[GPUPrefetcher(depth=2)])
    trainer.fit(model, loader, loader)
    assert model.checked == 2 * (4 + 4)  # train and validation batches both came through the prefetcher
    assert "process_dataloader" not in vars(trainer.strategy)  # restored at teardown


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lightning_speedup-prefetch"]


def test_loops_that_stop_early_leave_no_fetch_thread_in_a_persistent_loader() -> None:
    # Persistent workers hand the same DataLoader iterator to every pass, so a pass that stops early
    # (limit_val_batches, max_steps mid-epoch) must get its fetch thread out of it before the next pass.
    loader = DataLoader(
        NestedUint8(), batch_size=8, pin_memory=True, num_workers=2, persistent_workers=True,
        collate_fn=collate_nested,
    )  # fmt: skip
    prefetching = PrefetchLoader(loader, "cuda", depth=3)
    for _ in range(3):
        first = next(iter(prefetching))  # one batch, then the iterator is dropped mid-pass
        assert torch.equal(first["pair"].label.cpu(), torch.arange(8))
        labels = torch.cat([batch["pair"].label.cpu() for batch in prefetching])
        assert torch.equal(labels, torch.arange(64))  # every full pass still sees every sample, in order
    assert not _prefetch_threads()  # each early pass's thread was joined by the next iter()

    def persistent() -> DataLoader:
        return DataLoader(
            NestedUint8(), batch_size=8, pin_memory=True, num_workers=2, persistent_workers=True,
            collate_fn=collate_nested,
        )  # fmt: skip

    model = NestedCheck()
    trainer = gpu_trainer(
        max_steps=11, limit_val_batches=2, val_check_interval=4, callbacks=[GPUPrefetcher(depth=2)]
    )
    # Stops mid-epoch; validation stops after 2 of 8 batches, twice. Each loop has its own DataLoader: one
    # persistent DataLoader for both would have its worker iterator reset by validation mid-epoch (with
    # or without the prefetcher); with the fetch thread running, the prefetcher refuses it (below).
    trainer.fit(model, persistent(), persistent())
    assert model.checked == 11 + 2 * 2
    assert not _prefetch_threads()  # teardown stopped the train loader's, still 2 batches ahead

    shared = persistent()
    with pytest.raises(RuntimeError, match="same DataLoader object serves training and validation"):
        gpu_trainer(
            max_steps=6, limit_val_batches=2, val_check_interval=4, callbacks=[GPUPrefetcher(depth=2)]
        ).fit(NestedCheck(), shared, shared)
    assert not _prefetch_threads()  # on_exception stopped the training pass's thread


class DDPPrefetchModel(NestedCheck):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.seen: list[int] = []
        self.devices: set[str] = set()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.seen.extend(batch["pair"].label.tolist())
        self.devices.add(str(batch["pair"].image.device))
        return super().training_step(batch, batch_idx)

    def on_train_end(self) -> None:
        torch.save(
            {"seen": self.seen, "devices": sorted(self.devices)}, f"{self.out}/rank{self.global_rank}.pt"
        )


@pytest.mark.multigpu
def test_prefetcher_under_ddp_uses_each_ranks_device(tmp_path: Path) -> None:
    loader = DataLoader(NestedUint8(), batch_size=8, pin_memory=True, collate_fn=collate_nested)
    trainer = gpu_trainer(max_epochs=1, devices=2, strategy="ddp_spawn", callbacks=[GPUPrefetcher(depth=2)])
    trainer.fit(DDPPrefetchModel(str(tmp_path)), loader)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["devices"] == ["cuda:0"] and r1["devices"] == ["cuda:1"]
    assert not set(r0["seen"]) & set(r1["seen"]) and set(r0["seen"]) | set(r1["seen"]) == set(range(64))


# -- mid-epoch resume through the prefetcher, and the sync watch after an exception -------------------


class _Interrupt(L.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int
    ) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError(f"interrupted at step {self.at}")


def _fit_resident_prefetched(
    root: Path, interrupt_at: int | None = None, ckpt: str | None = None
) -> SmallCNN:
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (512, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (512,), generator=g)
    dm = DeviceResidentDataModule((images, labels), batch_size=64, seed=3)  # 8 batches per epoch
    model = SmallCNN()
    callbacks: list[L.Callback] = [
        GPUPrefetcher(depth=2),
        GPUAugment(RandomCrop(28, padding=2), RandomHorizontalFlip(), Normalize(0.286, 0.353), seed=1),
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=3
        ),
    ]
    if interrupt_at is not None:
        callbacks.append(_Interrupt(interrupt_at))
    trainer = gpu_trainer(max_epochs=2, callbacks=callbacks, deterministic=True, enable_checkpointing=True)
    if interrupt_at is None:
        trainer.fit(model, dm, ckpt_path=ckpt)
    else:
        with pytest.raises(RuntimeError, match="interrupted at step"):
            trainer.fit(model, dm, ckpt_path=ckpt)
    assert isinstance(trainer.train_dataloader, PrefetchLoader) and dm.resident
    return model


def test_mid_epoch_resume_of_resident_data_through_the_prefetcher_is_bitwise_identical(
    tmp_path: Path,
) -> None:
    """The prefetcher reads the resident batches ahead on its thread; the loader's state counts the batches the
    loop finished, so the wrapper passes it on and a resume from the step-9 checkpoint continues at batch 1 of
    epoch 1."""
    full = _fit_resident_prefetched(tmp_path / "full")
    _fit_resident_prefetched(tmp_path / "part", interrupt_at=11)
    state = torch.load(tmp_path / "part" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 9 and state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 1}
    ]
    resumed = _fit_resident_prefetched(tmp_path / "resumed", ckpt=str(tmp_path / "part" / "last.ckpt"))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_exception_in_the_watched_step_restores_the_sync_debug_mode() -> None:
    monitor = DataStallMonitor(warmup_steps=1, log=False)

    class Failing(MLP):
        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            if self.global_step == 1:  # the step cycle the monitor watches
                assert monitor._sync_watch is not None and torch.cuda.get_sync_debug_mode() == 1
                raise RuntimeError("the watched step failed")
            return super().training_step(batch, batch_idx)

    loader = DataLoader(PinnedBatches(4, (8, 16)), batch_size=None)
    with pytest.raises(RuntimeError, match="the watched step failed"):
        gpu_trainer(max_epochs=1, callbacks=[monitor]).fit(Failing(16, 1), loader)
    assert monitor._sync_watch is None and torch.cuda.get_sync_debug_mode() == 0
    with pytest.warns(UserWarning, match="a later warning"):
        warnings.warn("a later warning", stacklevel=1)
