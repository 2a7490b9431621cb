"""Data techniques that keep the GPU fed: prefetching, batched GPU augmentation, device-resident data, stall monitor.

The reference data sets and data modules of the bench (Fashion-MNIST, the char-LM corpus) live in
:mod:`lightning_speedup.bench.datasets` and :mod:`lightning_speedup.bench.datamodules`.
"""

from lightning_speedup.data.gpu_augment import GPUAugment
from lightning_speedup.data.prefetch import GPUPrefetcher, PrefetchLoader
from lightning_speedup.data.resident import DeviceResidentDataModule, ResidentBatches
from lightning_speedup.data.stall import DataStallMonitor, StepTiming

__all__ = [
    "DataStallMonitor",
    "DeviceResidentDataModule",
    "GPUAugment",
    "GPUPrefetcher",
    "PrefetchLoader",
    "ResidentBatches",
    "StepTiming",
]
