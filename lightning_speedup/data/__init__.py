"""Data: real loaders for the reference tasks, and the pieces that keep the GPU fed."""

from lightning_speedup.data.datamodules import CharLMDataModule, FashionMNISTDataModule
from lightning_speedup.data.datasets import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DataError,
    FashionMNIST,
    TextCorpus,
    find_fashion_mnist,
    load_fashion_mnist,
    load_text_corpus,
    read_idx,
)

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "CharLMDataModule",
    "DataError",
    "FashionMNIST",
    "FashionMNISTDataModule",
    "TextCorpus",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "load_text_corpus",
    "read_idx",
]
