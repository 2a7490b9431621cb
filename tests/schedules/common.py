"""Small modules, loaders and recorders shared by the schedule tests."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


@pytest.fixture(autouse=True)
def single_thread() -> Any:
    """One intra-op thread: these tiny models run several times faster on a shared 2-core machine, and
    the bitwise comparisons inside a test need the same thread count on both sides anyway."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def regression_loader(n_batches: int = 10, batch_size: int = 4, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_batches * batch_size, 8, generator=g)
    y = x @ torch.linspace(-1, 1, 8).unsqueeze(1) + 0.1 * torch.randn(len(x), 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Regressor(L.LightningModule):
    """An MLP regressor whose optimizer, param groups and scheduler are configurable."""

    def __init__(
        self,
        optimizer: str = "sgd",
        group_lrs: tuple[float, ...] = (0.1,),
        scheduler: bool = False,
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)
        self.optimizer_name, self.group_lrs, self.with_scheduler = optimizer, group_lrs, scheduler
        self.momentum = momentum
        self.training_steps = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.training_steps += 1
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        if len(self.group_lrs) == 1:
            params: Any = [{"params": self.parameters(), "lr": self.group_lrs[0]}]
        else:
            params = [
                {"params": self.body.parameters(), "lr": self.group_lrs[0]},
                {"params": self.head.parameters(), "lr": self.group_lrs[1]},
            ]
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=self.group_lrs[0], momentum=self.momentum)
        elif self.optimizer_name == "adam":
            opt = torch.optim.Adam(params, lr=self.group_lrs[0])
        else:
            opt = torch.optim.Adagrad(params, lr=self.group_lrs[0])
        if self.with_scheduler:
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=5)}
        return opt


class Recorder(L.Callback):
    """Records every param group's LR and momentum right before each optimizer step."""

    def __init__(self) -> None:
        self.records: list[tuple[int, list[float], list[float | None]]] = []

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        index = next(i for i, o in enumerate(trainer.optimizers) if o is optimizer)
        lrs = [float(g["lr"]) for g in optimizer.param_groups]
        moms = [
            float(g["betas"][0]) if "betas" in g else (float(g["momentum"]) if "momentum" in g else None)
            for g in optimizer.param_groups
        ]
        self.records.append((index, lrs, moms))

    def of(self, index: int = 0) -> list[tuple[list[float], list[float | None]]]:
        return [(lrs, moms) for i, lrs, moms in self.records if i == index]


def make_trainer(**kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "max_epochs": 2,
    }
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def torch_one_cycle_reference(
    optimizer: str, group_lrs: tuple[float, ...], total_steps: int, **kwargs: Any
) -> list[tuple[list[float], list[float]]]:
    """(lrs, momenta) per step from torch's OneCycleLR on an optimizer with the same groups."""
    params = [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in group_lrs]
    opt = (
        torch.optim.SGD(params, lr=group_lrs[0], momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(params, lr=group_lrs[0])
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, total_steps=total_steps, **kwargs)
    out = []
    for _ in range(total_steps):
        lrs = [g["lr"] for g in opt.param_groups]
        moms = [g["betas"][0] if optimizer != "sgd" else g["momentum"] for g in opt.param_groups]
        out.append((lrs, moms))
        opt.step()
        sched.step()
    return out


def assert_close_sequences(got: list[Any], expected: list[Any], tol: float = 1e-12) -> None:
    assert len(got) == len(expected), f"{len(got)} steps recorded, {len(expected)} expected"
    for t, ((g_lr, g_m), (e_lr, e_m)) in enumerate(zip(got, expected)):
        for a, b in zip(g_lr, e_lr):
            assert abs(a - b) <= tol, f"step {t}: lr {a!r} != {b!r}"
        for a, b in zip(g_m, e_m):
            assert a is not None and abs(a - b) <= tol, f"step {t}: momentum {a!r} != {b!r}"
