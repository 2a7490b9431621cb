"""Data: real loaders for the reference tasks, and the pieces that keep the GPU fed."""

from lightning_speedup.data.datamodules import CharLMDataModule, FashionMNISTDataModule, ImageBatches
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
from lightning_speedup.data.gpu_augment import GPUAugment
from lightning_speedup.data.prefetch import GPUPrefetcher, PrefetchLoader
from lightning_speedup.data.resident import DeviceResidentDataModule, ResidentBatches
from lightning_speedup.data.stall import DataStallMonitor, StepTiming

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "CharLMDataModule",
    "DataError",
    "DataStallMonitor",
    "DeviceResidentDataModule",
    "FashionMNIST",
    "FashionMNISTDataModule",
    "GPUAugment",
    "GPUPrefetcher",
    "ImageBatches",
    "PrefetchLoader",
    "ResidentBatches",
    "StepTiming",
    "TextCorpus",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "load_text_corpus",
    "read_idx",
]
