"""A tiny real task for sweep tests: a one-hidden-layer MLP on a few thousand Fashion-MNIST images.

One epoch over 2048 images takes a fraction of a second on one CPU core, and the learning rate moves
validation accuracy from ~0.1 (lr 1e-6) to ~0.75 (lr 1e-2) after one epoch: a search has something to find.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_speedup.bench.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist


@functools.cache
def fashion_subset(data_dir: str, n_train: int, n_val: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The first ``n_train`` training and ``n_val`` test images, flattened and normalised (cached per process)."""
    d = load_fashion_mnist(data_dir, download=False)

    def prep(images: Tensor) -> Tensor:
        x = torch.as_tensor(images).float().div(255.0).reshape(len(images), -1)  # (N, 784)
        return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD

    return (
        prep(d.train_images[:n_train]),
        torch.as_tensor(d.train_labels[:n_train]).long(),
        prep(d.test_images[:n_val]),
        torch.as_tensor(d.test_labels[:n_val]).long(),
    )


class TinyMLP(L.LightningModule):
    def __init__(self, lr: float = 1e-3, hidden: int = 32, log_metrics: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @override
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    @override
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        if self.hparams.log_metrics:
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(-1) == y).float().mean())
            self.log("on_cuda", float(logits.is_cuda))
        else:
            self.log("val_error", (logits.argmax(-1) != y).float().mean())

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class TrainOnlyDataModule(L.LightningDataModule):
    """Training data only: no ``val_dataloader``, so Lightning skips validation (with a warning)."""

    def __init__(
        self, tensors: tuple[Tensor, Tensor, Tensor, Tensor], batch_size: int = 128, shuffle: bool = True
    ) -> None:
        super().__init__()
        self.tensors, self.batch_size, self.shuffle = tensors, batch_size, shuffle

    @override
    def train_dataloader(self) -> DataLoader:
        x, y = self.tensors[0], self.tensors[1]
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=self.shuffle)


class TensorDataModule(TrainOnlyDataModule):
    @override
    def val_dataloader(self) -> DataLoader:
        x, y = self.tensors[2], self.tensors[3]
        return DataLoader(TensorDataset(x, y), batch_size=512)


def build_mlp(config: dict[str, Any]) -> tuple[L.LightningModule, L.LightningDataModule]:
    """``build`` for the sweeps: ``config`` holds ``lr`` (searched), ``data_dir`` and optional knobs.

    ``marker_dir`` (optional) gets one empty file per trial start, named after the trial id, so tests can
    count how often each trial ran. ``batch_sleep_s`` (optional) sleeps after every training batch, so
    a test can interrupt a sweep while a trial is running. ``val_marker_dir`` (optional) gets one empty
    file per finished validation (``<trial id>.<epoch>``), so a test can interrupt after a report.
    ``validate=False`` returns a datamodule without validation data (Lightning then runs no validation).
    """
    if config.get("marker_dir"):
        from ray import tune

        trial_id = tune.get_context().get_trial_id()
        n = len([p for p in os.listdir(config["marker_dir"]) if p.startswith(trial_id)])
        open(os.path.join(config["marker_dir"], f"{trial_id}.{n}"), "w").close()
    data = fashion_subset(str(config["data_dir"]), config.get("n_train", 2048), config.get("n_val", 1024))
    module = TinyMLP(
        lr=config["lr"], hidden=config.get("hidden", 32), log_metrics=config.get("log_metrics", True)
    )
    datamodule_cls = TensorDataModule if config.get("validate", True) else TrainOnlyDataModule
    datamodule = datamodule_cls(
        data, batch_size=config.get("batch_size", 128), shuffle=config.get("shuffle", True)
    )
    callbacks: list[L.Callback] = []
    if config.get("batch_sleep_s"):
        callbacks.append(_SleepAfterBatch(float(config["batch_sleep_s"])))
    if config.get("val_marker_dir"):
        callbacks.append(_MarkValidation(str(config["val_marker_dir"])))
    return (module, datamodule, callbacks) if callbacks else (module, datamodule)


class _MarkValidation(L.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            from ray import tune

            trial_id = tune.get_context().get_trial_id()
            open(os.path.join(self.folder, f"{trial_id}.{trainer.current_epoch}"), "w").close()


class _SleepAfterBatch(L.Callback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    @override
    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(self.seconds)
