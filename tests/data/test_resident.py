"""Device-resident data: exact epoch coverage, sharding, the over-budget path, and a real 2-process DDP run."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loops import _TrainingEpochLoop
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_speedup.data.augment import RandomCrop, RandomHorizontalFlip
from lightning_speedup.data.gpu_augment import GPUAugment
from lightning_speedup.data.prefetch import _install_dataloader_wrapper
from lightning_speedup.data.resident import (
    DeviceResidentDataModule,
    ResidentBatches,
    _format_bytes,
    epoch_indices,
)


def ids(n: int) -> tuple[Tensor, Tensor]:
    """Images whose every pixel is the sample id, and labels equal to the id."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return images, torch.arange(n)


def test_epoch_covers_every_sample_exactly_once() -> None:
    x, y = ids(103)
    batches = ResidentBatches((x, y), batch_size=10, shuffle=True, seed=1)
    assert len(batches) == 11
    epochs = []
    for _ in range(3):
        seen = torch.cat([b[1] for b in batches])
        assert torch.equal(seen.sort().values, torch.arange(103))
        epochs.append(seen)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    # Images travel with their labels.
    for xb, yb in batches:
        assert torch.equal(xb[:, 0, 0, 0].long(), yb)
    # Order is a function of (seed, epoch) only.
    again = ResidentBatches((x, y), batch_size=10, shuffle=True, seed=1)
    assert torch.equal(torch.cat([b[1] for b in again]), epochs[0])


@pytest.mark.parametrize("n, world", [(96, 3), (100, 3)])
def test_ranks_partition_the_epoch(n: int, world: int) -> None:
    x, y = ids(n)
    per_rank = [
        torch.cat([b[1] for b in ResidentBatches((x, y), 8, seed=2, rank=r, world_size=world)])
        for r in range(world)
    ]
    assert len({len(p) for p in per_rank}) == 1  # equal length on every rank (no DDP hang)
    seen = torch.cat(per_rank)
    assert set(seen.tolist()) == set(range(n))
    assert len(seen) - n == (-n) % world  # only the DistributedSampler-style padding repeats


def test_drop_last_and_bad_arguments() -> None:
    x, y = ids(50)
    batches = ResidentBatches((x, y), batch_size=16, drop_last=True, shuffle=False)
    assert len(batches) == 3 and all(len(b[0]) == 16 for b in batches)
    assert [len(b[0]) for b in ResidentBatches((x, y), batch_size=16)] == [16, 16, 16, 2]
    with pytest.raises(ValueError, match=r"same number of samples.*\(50, 1, 4, 4\).*\(49,\)"):
        ResidentBatches((x, y[:49]), batch_size=4)
    with pytest.raises(ValueError, match="no batch"):
        ResidentBatches((x, y), batch_size=64, drop_last=True)
    with pytest.raises(ValueError, match="batch_size"):
        ResidentBatches((x, y), batch_size=0)
    with pytest.raises(ValueError, match="tuple of tensors"):
        DeviceResidentDataModule(x)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget_fraction": "0.5"}, r"budget_fraction must be a number in \(0, 1\].*got '0.5'"),
        ({"budget_fraction": True}, "budget_fraction must be a number"),
        ({"budget_fraction": float("nan")}, "budget_fraction must be a number"),
        ({"budget_fraction": float("inf")}, "budget_fraction must be a number"),
        ({"budget_fraction": 0.0}, "budget_fraction must be a number"),
        ({"val_batch_size": 0}, "val_batch_size must be an int >= 1 or None, got 0"),
        ({"seed": 1.5}, r"^seed must be an int, got 1\.5\.$"),  # the package's one message for seeds
        ({"seed": "0"}, r"^seed must be an int, got '0'\.$"),
        ({"seed": True}, r"^seed must be an int, got True\.$"),
        ({"num_workers": -1}, r"num_workers must be an int >= 0 \(worker processes"),
        ({"num_workers": 2.0}, "num_workers must be an int >= 0"),
    ],
)
def test_bad_numeric_arguments_are_clear_errors(kwargs: dict[str, Any], match: str) -> None:
    x, y = ids(50)
    with pytest.raises(ValueError, match=match):
        DeviceResidentDataModule((x, y), batch_size=8, **kwargs)


def test_resident_batches_seed_must_be_an_int() -> None:
    x, y = ids(50)
    with pytest.raises(ValueError, match=r"^seed must be an int, got 0\.5\.$"):
        ResidentBatches((x, y), batch_size=8, seed=0.5)  # type: ignore[arg-type]


def test_budget_smaller_than_one_batch_is_an_error() -> None:
    x, y = ids(50)  # one sample: 16 float32 pixels + one int64 label = 72 bytes
    with pytest.raises(
        ValueError, match=r"budget_bytes=100 is smaller than one training batch: 8 samples.*576 bytes"
    ):
        DeviceResidentDataModule((x, y), batch_size=8, budget_bytes=100)


class IdModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 2)
        self.seen: list[list[int]] = []
        self.val_seen: list[int] = []

    def on_train_epoch_start(self) -> None:
        self.seen.append([])

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        self.seen[-1].extend(y.tolist())
        return F.cross_entropy(self.net(x.flatten(1).float()), y % 2)

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.val_seen.extend(batch[1].tolist())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def cpu_trainer(**kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0,
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def test_resident_module_in_lightning_reshuffles_each_epoch() -> None:
    x, y = ids(60)
    dm = DeviceResidentDataModule((x, y), (x[:20], y[:20]), batch_size=12)
    model = IdModel()
    trainer = cpu_trainer(max_epochs=3)
    trainer.fit(model, dm)
    assert dm.resident and isinstance(trainer.train_dataloader, ResidentBatches)
    assert len(model.seen) == 3
    for epoch in model.seen:
        assert sorted(epoch) == list(range(60))
    assert model.seen[0] != model.seen[1] != model.seen[2]  # trainer.current_epoch reaches the loader
    assert model.val_seen == list(range(20)) * 3


def test_over_budget_warns_and_uses_a_dataloader() -> None:
    x, y = ids(60)
    dm = DeviceResidentDataModule((x, y), batch_size=12, budget_bytes=1000)
    model = IdModel()
    # 60 samples of 16 float32 pixels and an int64 label: 4,320 bytes.
    with pytest.warns(UserWarning, match=r"needs 4.2 KiB but the budget on cpu is 1,000 bytes.*DataLoader"):
        cpu_trainer(max_epochs=1).fit(model, dm)
    assert dm.resident is False
    assert sorted(model.seen[0]) == list(range(60))


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 bytes"), (1023, "1,023 bytes"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), (5 * 2**20, "5.0 MiB"),
     (3.5 * 2**30, "3.5 GiB"), (2**50, "1,048,576.0 GiB")],
)  # fmt: skip
def test_sizes_are_shown_in_a_unit_that_shows_them(n: float, text: str) -> None:
    assert _format_bytes(n) == text


class NoValStepModel(IdModel):
    """IdModel without a validation_step."""

    validation_step = L.LightningModule.validation_step  # type: ignore[assignment]


def test_no_val_data_runs_no_validation_and_warns_nothing() -> None:
    """``val=None`` leaves val_dataloader undefined, Lightning's sign of no validation, instead of returning an
    empty list (which made Lightning warn "Total length of `list` across ranks is zero")."""
    x, y = ids(48)
    for model in (IdModel(), NoValStepModel()):
        dm = DeviceResidentDataModule((x, y), batch_size=8)
        trainer = cpu_trainer(max_epochs=2, num_sanity_val_steps=2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, dm)
        messages = [str(w.message) for w in caught]
        assert not [m for m in messages if "across ranks is zero" in m], messages
        assert not trainer.enable_validation and model.val_seen == [] and len(model.seen) == 2
        if isinstance(model, NoValStepModel):  # nothing about validation at all
            assert not [m for m in messages if "val" in m], messages
        else:  # Lightning's own note: the model has a validation_step but the data has no validation set
            assert [m for m in messages if "have no `val_dataloader`. Skipping val loop" in m], messages
    with pytest.raises(ValueError, match=r"no validation data \(val=None\).*pass val=\(images, labels\)"):
        cpu_trainer().validate(IdModel(), dm)
    # A subclass that defines its own val_dataloader keeps it.
    model = IdModel()
    cpu_trainer(max_epochs=1).fit(model, DDPDataModule((x, y), batch_size=8))
    assert model.val_seen == list(range(48))


def test_from_fashion_mnist_loads_uint8_images(fashion_mnist_dir: Path) -> None:
    dm = DeviceResidentDataModule.from_fashion_mnist(fashion_mnist_dir, batch_size=256)
    images, labels = dm.train_tensors
    assert images.shape == (60_000, 1, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert dm.val_tensors is not None and dm.val_tensors[0].shape == (10_000, 1, 28, 28)
    assert dm.data_bytes == 70_000 * (784 + 8)


# -- real DDP (gloo, 2 processes) -------------------------------------------------------------------


class DDPProbe(L.Callback):
    """Records, per rank, the sampler of every loader Lightning hands to the prefetcher's hook-in point."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.samplers: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        def record(loader: object) -> object:
            self.samplers.append(type(getattr(loader, "sampler", None)).__name__)
            return loader

        self.uninstall = _install_dataloader_wrapper(trainer.strategy, record)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        pl_module.augmented.append(batch[0].clone())  # type: ignore[attr-defined]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.uninstall()
        record = {"seen": pl_module.seen, "augmented": pl_module.augmented, "samplers": self.samplers}  # type: ignore[attr-defined]
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


class DDPDataModule(DeviceResidentDataModule):
    def val_dataloader(self) -> DataLoader:
        x, y = self.train_tensors
        return DataLoader(list(zip(x, y)), batch_size=8)


class DDPModel(IdModel):
    def __init__(self) -> None:
        super().__init__()
        self.augmented: list[Tensor] = []


def test_ddp_shards_resident_data_and_draws_rank_specific_augmentation(tmp_path: Path) -> None:
    x, y = ids(64)
    # 64 identical images, so any difference between ranks comes from the augmentation.
    x = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4).expand(64, 1, 4, 4).contiguous()
    dm = DDPDataModule((x, y), batch_size=8)
    probe = DDPProbe(tmp_path)
    aug = GPUAugment(RandomCrop(4, padding=2), RandomHorizontalFlip(), seed=5)
    # The probe comes after GPUAugment, so it records augmented batches.
    trainer = cpu_trainer(max_epochs=1, devices=2, strategy="ddp_fork", callbacks=[aug, probe])
    trainer.fit(DDPModel(), dm)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    seen0, seen1 = set(r0["seen"][0]), set(r1["seen"][0])
    assert not seen0 & seen1 and seen0 | seen1 == set(range(64))
    # The resident loader is not a DataLoader (passes through); the val DataLoader got Lightning's sampler.
    assert r0["samplers"] == r1["samplers"] == ["NoneType", DistributedSampler.__name__]
    assert len(r0["augmented"]) == len(r1["augmented"]) == 4
    for a, b in zip(r0["augmented"], r1["augmented"]):
        assert a.shape == b.shape == (8, 1, 4, 4) and not torch.equal(a, b)


# -- mid-epoch resume -------------------------------------------------------------------------------


def test_state_dict_resumes_the_epoch_at_the_next_batch() -> None:
    """Without Lightning: the state says which batch of which epoch comes next, and a new loader that loads it
    yields exactly the rest of that epoch, then the following epochs as usual."""
    x, y = ids(50)
    whole = ResidentBatches((x, y), batch_size=8, seed=4)
    epochs = [[b[1] for b in whole] for _ in range(2)]  # 7 batches per epoch
    part = ResidentBatches((x, y), batch_size=8, seed=4)
    taken = iter(part)
    for _ in range(3):
        next(taken)
    state = part.state_dict()
    assert state == {"epoch": 0, "batches": 3}
    resumed = ResidentBatches((x, y), batch_size=8, seed=4)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # loaded but not started: saved again as loaded
    rest = [b[1] for b in resumed]
    assert len(rest) == 4 and all(torch.equal(a, b) for a, b in zip(rest, epochs[0][3:]))
    assert resumed.state_dict() == {"epoch": 1, "batches": 0}  # an epoch taken to its end
    assert all(torch.equal(a, b[1]) for a, b in zip(epochs[1], resumed))
    # A state of another epoch than the one the next iter() is of starts that epoch from its first batch.
    other = ResidentBatches((x, y), batch_size=8, seed=4, epoch=lambda: 1)
    other.load_state_dict({"epoch": 0, "batches": 3})
    assert all(torch.equal(a, b[1]) for a, b in zip(epochs[1], other))
    # A consumer that reads ahead (Lightning's loop, a prefetcher) says how many batches it finished.
    finished = {"n": 0}
    ahead = ResidentBatches((x, y), batch_size=8, seed=4, consumed=lambda: finished["n"])
    taken = iter(ahead)
    for _ in range(4):
        next(taken)
    finished["n"] = 2
    assert ahead.counts_consumed and ahead.state_dict() == {"epoch": 0, "batches": 2}


class Interrupt(L.Callback):
    """Stops the run with an error before training step ``at``, as a crash would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError(f"interrupted at step {self.at}")


class FlatIdModel(IdModel):
    """Records the ids it trains on in one list (a resumed run starts mid-epoch, without on_train_epoch_start)."""

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        self.flat.extend(batch[1].tolist())
        return F.cross_entropy(self.net(batch[0].flatten(1).float()), batch[1] % 2)

    def on_fit_start(self) -> None:
        self.flat: list[int] = []


def _fit_resident(
    root: Path, interrupt_at: int | None = None, ckpt: str | None = None
) -> tuple[FlatIdModel, list[str]]:
    torch.manual_seed(0)
    x, y = ids(64)
    dm = DeviceResidentDataModule((x, y), batch_size=8, seed=3)  # 8 batches per epoch
    model = FlatIdModel()
    callbacks: list[L.Callback] = [
        GPUAugment(RandomHorizontalFlip(), seed=1),
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=root, save_last=True, save_top_k=0, every_n_train_steps=3
        ),
    ]
    if interrupt_at is not None:
        callbacks.append(Interrupt(interrupt_at))
    trainer = cpu_trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if interrupt_at is None:
            trainer.fit(model, dm, ckpt_path=ckpt)
        else:
            with pytest.raises(RuntimeError, match="interrupted at step"):
                trainer.fit(model, dm, ckpt_path=ckpt)
    return model, [str(w.message) for w in caught]


# Lightning < 2.5 resumes a checkpoint saved in on_train_batch_end one batch early and trains that batch again
# (its epoch loop lacks restarted_on_train_batch_end); the resident loader follows the loop, and the data module
# says so when it saves such a checkpoint.
EXACT_MID_EPOCH_RESUME = hasattr(_TrainingEpochLoop, "restarted_on_train_batch_end")


def test_mid_epoch_resume_is_bitwise_identical(tmp_path: Path) -> None:
    """A run that crashes at step 11 and resumes from its step-9 checkpoint (batch 1 of epoch 1) trains the
    rest of epoch 1, batch 1 onwards, and ends with the weights of an uninterrupted run."""
    full, _ = _fit_resident(tmp_path / "full")
    part, part_messages = _fit_resident(tmp_path / "part", interrupt_at=11)
    state = torch.load(tmp_path / "part" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 9
    resumed, messages = _fit_resident(tmp_path / "resumed", ckpt=str(tmp_path / "part" / "last.ckpt"))
    assert len(full.flat) == 2 * 64 and part.flat == full.flat[: 11 * 8]
    assert not [m for m in messages if "not resumable" in m], messages
    if not EXACT_MID_EPOCH_RESUME:
        assert [m for m in part_messages if "one batch early and trains that batch a second time" in m]
        assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 0}]
        assert resumed.flat == full.flat[8 * 8 :]  # batch 0 of epoch 1 again, as the loop counts it
        return
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 1}]
    assert resumed.flat == full.flat[9 * 8 :]  # the 7 batches after the checkpoint, nothing twice
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


class CrashInStep(FlatIdModel):
    """Fails inside ``training_step`` of step ``at`` (an OOM, a NaN check): the batch is started, not trained."""

    def __init__(self, at: int | None) -> None:
        super().__init__()
        self.at = at

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        if self.global_step == self.at:
            raise RuntimeError(f"failed at step {self.at}")
        return super().training_step(batch, batch_idx)


def _fit_after_crash(root: Path, at: int | None = None, ckpt: str | None = None) -> CrashInStep:
    torch.manual_seed(0)
    x, y = ids(64)
    dm = DeviceResidentDataModule((x, y), batch_size=8, seed=3)
    model = CrashInStep(at)
    callbacks = [L.pytorch.callbacks.OnExceptionCheckpoint(dirpath=root)]
    trainer = cpu_trainer(max_epochs=2, callbacks=callbacks, enable_checkpointing=True, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if at is None:
            trainer.fit(model, dm, ckpt_path=ckpt)
        else:
            with pytest.raises(RuntimeError, match="failed at step"):
                trainer.fit(model, dm, ckpt_path=ckpt)
    return model


def test_a_checkpoint_saved_inside_a_failed_step_resumes_at_that_batch(tmp_path: Path) -> None:
    """``OnExceptionCheckpoint`` saves inside the failed step (batch 3 of epoch 1, started but not trained): the
    loop trains that batch again on resume, on every Lightning release, and the loader must hand it out again
    (counting it as done lost it: 8 samples never trained)."""
    full = _fit_after_crash(tmp_path / "full")
    part = _fit_after_crash(tmp_path / "part", at=11)
    state = torch.load(tmp_path / "part" / "on_exception.ckpt", weights_only=False)
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 1, "batches": 3}]
    resumed = _fit_after_crash(tmp_path / "resumed", ckpt=str(tmp_path / "part" / "on_exception.ckpt"))
    assert part.flat == full.flat[: 11 * 8]
    assert resumed.flat == full.flat[11 * 8 :]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# -- the over-budget path and DDP --------------------------------------------------------------------


def _first_epoch_order(budget_bytes: int | None, seed: int, global_seed: int) -> list[int]:
    L.seed_everything(global_seed, verbose=False)
    x, y = ids(60)
    dm = DeviceResidentDataModule((x, y), batch_size=12, seed=seed, budget_bytes=budget_bytes)
    model = IdModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cpu_trainer(max_epochs=2).fit(model, dm)
    assert dm.resident is (budget_bytes is None)
    return model.seen[0] + model.seen[1]


def test_over_budget_dataloader_draws_the_order_from_seed() -> None:
    """The fallback DataLoader's order comes from ``seed`` (on the CPU it is the resident path's very order),
    not from the global RNG."""
    resident = _first_epoch_order(None, seed=1, global_seed=0)
    assert _first_epoch_order(1000, seed=1, global_seed=0) == resident
    assert _first_epoch_order(1000, seed=1, global_seed=7) == resident
    assert _first_epoch_order(1000, seed=2, global_seed=0) != resident


class UnevenBudget(DDPDataModule):
    """Stands in for free CUDA memory that differs per rank: the data fits rank 0's budget, not rank 1's."""

    def budget_for(self, device: torch.device) -> float:
        assert self.trainer is not None
        return math.inf if self.trainer.global_rank == 0 else 1000.0

    def setup(self, stage: str) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            super().setup(stage)
        self.setup_warnings = [str(w.message) for w in caught if "DeviceResidentDataModule" in str(w.message)]


class DumpRank(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        record = {"resident": dm.resident, "seen": pl_module.seen, "warnings": dm.setup_warnings}  # type: ignore[attr-defined, union-attr]
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


def test_ddp_ranks_agree_to_fall_back_and_the_rank_over_budget_says_so(tmp_path: Path) -> None:
    x, y = ids(64)
    dm = UnevenBudget((x, y), batch_size=8, seed=5)
    trainer = cpu_trainer(max_epochs=1, devices=2, strategy="ddp_fork", callbacks=[DumpRank(tmp_path)])
    trainer.fit(IdModel(), dm)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["resident"] is False and r1["resident"] is False
    # One DataLoader path on both ranks, sharded and ordered by the seeded sampler: every sample once.
    for rank, record in enumerate((r0, r1)):
        assert record["seen"][0] == epoch_indices(64, True, 5, 0, rank, 2).tolist(), rank
    assert sorted(r0["seen"][0] + r1["seen"][0]) == list(range(64))
    (w1,) = r1["warnings"]
    assert "needs 4.5 KiB but the budget on cpu (rank 1 of 2) is 1,000 bytes" in w1 and "every rank" in w1
    (w0,) = r0["warnings"]
    assert "fits the budget on cpu (rank 0 of 2), but not that of another rank" in w0


# -- teardown and a new Trainer ----------------------------------------------------------------------


class CountingDecisions(DeviceResidentDataModule):
    decisions = 0

    def budget_for(self, device: torch.device) -> float:
        self.decisions += 1
        return super().budget_for(device)


class FailingModel(IdModel):
    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        raise RuntimeError("the step failed")


def test_every_teardown_releases_the_device_copies_and_a_new_trainer_decides_again() -> None:
    x, y = ids(48)
    dm = CountingDecisions((x, y), (x[:16], y[:16]), batch_size=8)
    cpu_trainer().validate(IdModel(), dm, verbose=False)
    assert dm.decisions == 1 and dm.resident
    assert dm._train_on_device is None and dm._val_on_device is None and not dm._prepared
    cpu_trainer(max_epochs=1).fit(IdModel(), dm)
    assert dm.decisions == 2 and dm._train_on_device is None
    # A fit that raises gets no teardown; the next Trainer decides again instead of reusing that setup.
    with pytest.raises(RuntimeError, match="the step failed"):
        cpu_trainer(max_epochs=1).fit(FailingModel(), dm)
    assert dm._prepared and dm.decisions == 3
    model = IdModel()
    cpu_trainer(max_epochs=1).fit(model, dm)
    assert dm.decisions == 4 and sorted(model.seen[0]) == list(range(48))


@pytest.mark.parametrize("name", ["shuffle", "drop_last"])
def test_flags_must_be_bools(name: str) -> None:
    x, y = ids(50)
    with pytest.raises(ValueError, match=rf"^{name} must be True or False, got 'no'\.$"):
        DeviceResidentDataModule((x, y), batch_size=8, **{name: "no"})
    with pytest.raises(ValueError, match=rf"^ResidentBatches: {name} must be True or False, got 'no'\.$"):
        ResidentBatches((x, y), batch_size=8, **{name: "no"})
