"""The LR range test on real Fashion-MNIST: exact restore, a sane choice, files, and clear failures."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_speedup.bench.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist
from lightning_speedup.schedules import LRRangeTest, OneCycle, RangeTestDivergedError, WarmupCosine
from tests.schedules.common import Regressor, make_trainer, regression_loader, single_thread  # noqa: F401
from tests.schedules.test_callbacks import TwoOptimizers


@pytest.fixture(scope="module")
def fashion_loader(fashion_mnist_dir: Path) -> DataLoader:
    data = load_fashion_mnist(fashion_mnist_dir)
    x = (data.train_images[:1024].float().unsqueeze(1) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return DataLoader(TensorDataset(x, data.train_labels[:1024]), batch_size=64, shuffle=True)


class SmallNet(L.LightningModule):
    """Conv + BatchNorm + Dropout, so the sweep changes weights, running stats and RNG state."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1),  # (B, 8, 14, 14)
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(8 * 14 * 14, 10),
        )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


class Snapshot(L.Callback):
    """Placed before the schedule: takes one real Adam step (so the optimizer has state to lose), then
    snapshots model, optimizer and RNG in on_fit_start."""

    def __init__(self, batch: tuple[Tensor, Tensor]) -> None:
        self.batch = batch

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _ = trainer.estimated_stepping_batches  # Lightning's data setup draws from the RNG; get it done first
        opt = trainer.optimizers[0]
        x, y = self.batch
        F.cross_entropy(pl_module.net(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.model = copy.deepcopy(pl_module.state_dict())
        self.optimizer = copy.deepcopy(opt.state_dict())
        self.rng = torch.get_rng_state()
        self.training = [m.training for m in pl_module.modules()]


class Verify(L.Callback):
    """Placed after the schedule: everything must be as the snapshot saw it."""

    def __init__(self, snapshot: Snapshot, schedule: OneCycle) -> None:
        self.snapshot, self.schedule, self.checked = snapshot, schedule, False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt = trainer.optimizers[0]
        assert _equal(pl_module.state_dict(), self.snapshot.model)
        state, saved = opt.state_dict(), self.snapshot.optimizer
        assert len(state["state"]) == len(list(pl_module.parameters()))
        assert _equal(state["state"], saved["state"])
        # The schedule owns lr and betas[0] and has just written its step-0 values; the rest is untouched.
        (group,), (saved_group,) = state["param_groups"], saved["param_groups"]
        assert (group["lr"], group["betas"][0]) == (
            pytest.approx(self.schedule.peak_lrs[0][0] / 25, rel=1e-12),
            0.95,
        )
        assert group["betas"][1] == saved_group["betas"][1]
        assert _equal(
            {k: v for k, v in group.items() if k not in ("lr", "betas")},
            {k: v for k, v in saved_group.items() if k not in ("lr", "betas")},
        )
        assert all(p.grad is None for p in pl_module.parameters())
        assert torch.equal(torch.get_rng_state(), self.snapshot.rng)
        assert [m.training for m in pl_module.modules()] == self.snapshot.training
        self.checked = True


def test_range_test_restores_everything_and_training_matches_an_explicit_run(
    fashion_loader: DataLoader, tmp_path: Path
) -> None:
    settings = LRRangeTest(min_lr=1e-5, max_lr=10.0, num_steps=40)

    def run(max_lr: Any, logger: Any = False) -> tuple[SmallNet, OneCycle, Verify]:
        torch.manual_seed(3)
        model, snapshot = SmallNet(), Snapshot(fashion_loader.dataset[:64])
        schedule = OneCycle(max_lr=max_lr, range_test=settings if max_lr == "auto" else None)
        verify = Verify(snapshot, schedule)
        trainer = make_trainer(max_epochs=1, callbacks=[snapshot, schedule, verify], logger=logger)
        trainer.fit(model, fashion_loader)
        return model, schedule, verify

    logger = CSVLogger(tmp_path, name="auto")
    auto_model, auto, verified = run("auto", logger)
    assert verified.checked
    result = auto.range_test_result
    assert result is not None and len(result.losses) > 20
    assert 1e-4 < result.lr < 1.0 and result.lr == pytest.approx(result.suggestion.lr_at_minimum / 2)
    assert auto.peak_lrs == [[result.lr]]

    # Training after the test is bit-identical to a run that was given the chosen LR directly.
    explicit_model, _, _ = run(result.lr)
    for a, b in zip(auto_model.state_dict().values(), explicit_model.state_dict().values()):
        assert torch.equal(a, b)

    log_dir = Path(logger.log_dir)
    assert (log_dir / "lr_range_test.png").stat().st_size > 1000
    curve = json.loads((log_dir / "lr_range_test.json").read_text())
    assert curve["lr"] == result.lr and len(curve["losses"]) == len(result.losses)
    rows = list(csv.DictReader((log_dir / "metrics.csv").read_text().splitlines()))
    assert [float(r["schedule/range_test_lr"]) for r in rows if r.get("schedule/range_test_lr")] == [
        result.lr
    ]


class BatchesPerEpoch(L.Callback):
    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.counts.append(0)

    def on_train_batch_end(self, *args: Any) -> None:
        self.counts[-1] += 1


def test_range_test_leaves_a_persistent_workers_loader_epoch_whole(fashion_loader: DataLoader) -> None:
    """A persistent-workers DataLoader hands one iterator to every ``iter()``: sweeping it would eat the
    first epoch the fit loop had already started (found on the device: the epoch ended after the batches
    the sweep left over, without validation)."""
    loader = DataLoader(
        fashion_loader.dataset, batch_size=64, shuffle=True, num_workers=1, persistent_workers=True
    )
    schedule = OneCycle(max_lr="auto", range_test=LRRangeTest(min_lr=1e-5, max_lr=10.0, num_steps=40))
    counter = BatchesPerEpoch()
    trainer = make_trainer(max_epochs=2, callbacks=[schedule, counter])
    trainer.fit(SmallNet(), loader)
    assert schedule.range_test_result is not None and len(schedule.range_test_result.losses) > 20
    assert counter.counts == [len(loader), len(loader)]
    assert trainer.global_step == 2 * len(loader)


def test_range_test_that_diverges_immediately_raises_and_restores(tmp_path: Path) -> None:
    model = Regressor("adam", (1e-3,))
    before = copy.deepcopy(model.state_dict())
    schedule = WarmupCosine(peak_lr="auto", range_test=LRRangeTest(min_lr=1e3, max_lr=1e6, num_steps=20))
    trainer = make_trainer(callbacks=[schedule])
    with pytest.raises(RangeTestDivergedError, match="diverged immediately") as err:
        trainer.fit(model, regression_loader(n_batches=10))
    assert "min_lr=10" in str(err.value)  # names the way out
    assert trainer.global_step == 0
    assert _equal(model.state_dict(), before)


def test_range_test_refuses_manual_optimization() -> None:
    model = TwoOptimizers()
    trainer = make_trainer(callbacks=[OneCycle(max_lr="auto")])
    with pytest.raises(ValueError, match="needs automatic optimization"):
        trainer.fit(model, regression_loader(n_batches=10))
    assert trainer.global_step == 0


class WithTemperature(Regressor):
    """Trains a tensor the module does not register (a learnable temperature kept as a plain attribute)."""

    def __init__(self) -> None:
        super().__init__("sgd")
        self.log_temp = torch.zeros(1, requires_grad=True)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x) * self.log_temp.exp(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([*self.parameters(), self.log_temp], lr=0.1, momentum=0.9)


class SeesTemperature(L.Callback):
    """Placed after the schedule: the temperature and its grad when training starts (the sweep is over)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.value = pl_module.log_temp.detach().clone()
        self.grad = pl_module.log_temp.grad.clone()


def test_range_test_restores_tensors_the_optimizer_trains_outside_the_module() -> None:
    """Before, only the module's parameters and buffers were restored: the temperature kept the sweep's value."""
    model = WithTemperature()
    model.log_temp.grad = torch.full((1,), 0.5)
    seen = SeesTemperature()
    schedule = OneCycle(max_lr="auto", range_test=LRRangeTest(min_lr=1e-4, max_lr=10.0, num_steps=20))
    make_trainer(max_epochs=1, callbacks=[schedule, seen]).fit(model, regression_loader(n_batches=10))
    assert schedule.range_test_result is not None and len(schedule.range_test_result.losses) >= 10
    assert seen.value.tolist() == [0.0] and seen.grad.tolist() == [0.5]


@pytest.mark.parametrize(
    ("schedule_kwargs", "trainer_kwargs"),
    [({}, {"max_epochs": None, "max_steps": 10}), ({"total_steps": 10}, {"max_epochs": 1})],
    ids=["max_steps", "total_steps"],
)
def test_auto_lr_works_when_the_run_length_is_given_in_steps(
    schedule_kwargs: dict[str, Any], trainer_kwargs: dict[str, Any]
) -> None:
    """Neither max_steps nor total_steps makes Lightning load the training loader before on_fit_start."""
    schedule = OneCycle(
        max_lr="auto", range_test=LRRangeTest(min_lr=1e-4, max_lr=1.0, num_steps=15), **schedule_kwargs
    )
    trainer = make_trainer(callbacks=[schedule], **trainer_kwargs)
    trainer.fit(Regressor("sgd", (0.01,)), regression_loader(n_batches=10))
    assert schedule.range_test_result is not None and len(schedule.range_test_result.losses) >= 10
    assert schedule.peak_lrs == [[schedule.range_test_result.lr]]
    assert schedule.schedule_total_steps == 10
    assert trainer.global_step == 10  # one epoch of the 10-batch loader


def test_range_test_batches_pass_through_gpu_augment_and_leave_its_stream_alone(
    fashion_mnist_dir: Path,
) -> None:
    """A uint8 data set converted by GPUAugment (the resident-data recipe): the sweep's batches need the
    conversion as training batches do (the sweep crashed on uint8 images before), and the training run after
    the sweep is bit-identical to one given the chosen LR directly, so the augmentation stream is unchanged."""
    from lightning_speedup.data import GPUAugment, augment

    data = load_fashion_mnist(fashion_mnist_dir)
    loader = DataLoader(
        TensorDataset(data.train_images[:512].unsqueeze(1), data.train_labels[:512]), batch_size=64
    )

    def run(max_lr: Any) -> tuple[SmallNet, OneCycle, GPUAugment]:
        torch.manual_seed(5)
        model = SmallNet()
        gpu_augment = GPUAugment(
            augment.RandomCrop(28, padding=2),
            augment.Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD),
            seed=7,
        )
        range_test = LRRangeTest(min_lr=1e-5, max_lr=10.0, num_steps=30) if max_lr == "auto" else None
        schedule = OneCycle(max_lr=max_lr, range_test=range_test)
        make_trainer(max_epochs=1, callbacks=[gpu_augment, schedule]).fit(model, loader)
        return model, schedule, gpu_augment

    auto_model, auto, auto_augment = run("auto")
    result = auto.range_test_result
    assert result is not None and len(result.losses) >= 10 and 1e-5 < result.lr < 10.0
    assert auto_augment.step == 8  # the training batches only
    explicit_model, _, _ = run(result.lr)
    for a, b in zip(auto_model.state_dict().values(), explicit_model.state_dict().values()):
        assert torch.equal(a, b)


class BatchOrder(L.Callback):
    def __init__(self) -> None:
        self.first_labels: list[int] = []

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int
    ) -> None:
        self.first_labels.append(int(batch[1][0]))


def test_a_seeded_loaders_shuffle_order_is_restored_after_the_sweep(fashion_loader: DataLoader) -> None:
    """``DataLoader(generator=...)`` draws each epoch's permutation from its own generator, which the global
    RNG state does not cover: the sweep used to advance it, so training after it saw another batch order
    than a run given the chosen LR directly."""
    settings = LRRangeTest(min_lr=1e-5, max_lr=10.0, num_steps=30)

    def run(max_lr: Any) -> tuple[SmallNet, OneCycle, BatchOrder, torch.Generator]:
        torch.manual_seed(3)
        generator = torch.Generator().manual_seed(123)
        loader = DataLoader(fashion_loader.dataset, batch_size=64, shuffle=True, generator=generator)
        model, order = SmallNet(), BatchOrder()
        schedule = OneCycle(max_lr=max_lr, range_test=settings if max_lr == "auto" else None)
        make_trainer(max_epochs=2, callbacks=[schedule, order]).fit(model, loader)
        return model, schedule, order, generator

    auto_model, auto, auto_order, auto_generator = run("auto")
    assert auto.range_test_result is not None and len(auto.range_test_result.losses) > 20  # > one epoch
    explicit_model, _, explicit_order, explicit_generator = run(auto.range_test_result.lr)
    assert auto_order.first_labels == explicit_order.first_labels
    assert torch.equal(auto_generator.get_state(), explicit_generator.get_state())
    for a, b in zip(auto_model.state_dict().values(), explicit_model.state_dict().values()):
        assert torch.equal(a, b)


class DictBatches(Regressor):
    """Its loader yields dicts; ``on_before_batch_transfer`` (the module's or its datamodule's) turns them
    into the ``(x, y)`` tuples ``training_step`` takes, as the training loop calls it."""

    def __init__(self, own_hook: bool) -> None:
        super().__init__("adam", (1e-3,))
        self.own_hook = own_hook
        self.sweep_dtypes: set[torch.dtype] = set()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return (batch["x"], batch["y"]) if self.own_hook else batch

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.sweep_dtypes.add(batch[0].dtype)
        return super().training_step(batch, batch_idx)


class DictData(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        x, y = regression_loader(n_batches=10).dataset.tensors
        return DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=4)


class DictDataWithHook(DictData):
    """Lightning calls a datamodule's hook instead of the module's when the datamodule defines one."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return batch["x"], batch["y"]


@pytest.mark.parametrize("hook", ["module", "datamodule"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "64-true"])
def test_sweep_batches_take_the_training_loops_path_to_training_step(hook: str, precision: str) -> None:
    """The precision plugin's ``convert_input`` and the ``on_before_batch_transfer`` hook run on the sweep's
    batches as on the training batches (the sweep used to skip both: float32 inputs met bf16 or float64
    weights, and dict batches reached ``training_step``)."""
    model = DictBatches(own_hook=hook == "module")
    data = DictData() if hook == "module" else DictDataWithHook()
    schedule = OneCycle(max_lr="auto", range_test=LRRangeTest(min_lr=1e-4, max_lr=1.0, num_steps=15))
    trainer = make_trainer(max_epochs=1, precision=precision, callbacks=[schedule])
    trainer.fit(model, datamodule=data)
    assert schedule.range_test_result is not None and len(schedule.range_test_result.losses) >= 10
    expected = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "64-true": torch.float64}[precision]
    assert model.sweep_dtypes == {expected}
    assert trainer.global_step == 10
