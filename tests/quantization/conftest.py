"""Fixtures for the quantization tests: real Fashion-MNIST tensors and single-threaded CPU math.

The models here are tiny; on a shared 2-core machine two intra-op threads fight other processes and
run ~10x slower than one, so every test in this folder runs with one thread (restored afterwards).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lightning_speedup.bench.datasets import load_fashion_mnist


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass(frozen=True)
class FlatFashionMNIST:
    """Normalised, flattened subsets: train (8192, 784) and test (2000, 784) with int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@pytest.fixture(scope="session")
def fmnist(fashion_mnist_dir: Path) -> FlatFashionMNIST:
    data = load_fashion_mnist(fashion_mnist_dir, download=False)

    def prep(images: Tensor) -> Tensor:
        return images.float().div(255).sub(0.2860).div(0.3530).reshape(len(images), -1)

    return FlatFashionMNIST(
        x_train=prep(data.train_images[:8192]),
        y_train=data.train_labels[:8192],
        x_test=prep(data.test_images[:2000]),
        y_test=data.test_labels[:2000],
    )
