"""Batched per-sample GPU augmentation ops, reachable as ``ls.augment``.

A thin re-export of :mod:`lightning_speedup.data.augment` so users write
``ls.GPUAugment(ls.augment.RandomCrop(28, padding=2), ls.augment.RandomHorizontalFlip())``.
Each op is also a plain callable on a ``(B, C, H, W)`` tensor, usable without Lightning.
"""

from lightning_speedup.data.augment import (
    ChannelsLast,
    Compose,
    CutMix,
    Cutout,
    ImageOp,
    MixOp,
    MixUp,
    Normalize,
    RandomCrop,
    RandomHorizontalFlip,
    ToDtype,
    sample_beta,
)

__all__ = [
    "ChannelsLast",
    "Compose",
    "CutMix",
    "Cutout",
    "ImageOp",
    "MixOp",
    "MixUp",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ToDtype",
    "sample_beta",
]
