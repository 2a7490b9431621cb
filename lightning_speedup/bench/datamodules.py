"""LightningDataModules for the bench's reference tasks, in the shape a typical Lightning user writes them.

``FashionMNISTDataModule(augment=True, output="float")`` is the baseline pipeline of docs/design.md:
per-sample CPU augmentation (random crop with 2-pixel padding, horizontal flip) inside a ``Dataset``,
then normalisation, fed by a ``DataLoader`` with worker processes. ``output="uint8"`` hands out raw
uint8 images with no CPU work, for pipelines that augment and convert on the GPU (4x fewer bytes);
without CPU augmentation the loaders gather whole batches with one index (:class:`ImageBatches`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_speedup.bench.datasets import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNIST,
    TextCorpus,
    find_fashion_mnist,
    load_fashion_mnist,
    load_text_corpus,
)


class AugmentedImages(Dataset):
    """Per-sample CPU augmentation, one image at a time, as torchvision-style pipelines do it."""

    def __init__(self, images: Tensor, labels: Tensor, augment: bool, output: str, padding: int = 2) -> None:
        self.images, self.labels = images, labels  # (N, H, W) uint8, (N,) int64
        self.augment, self.output, self.padding = augment, output, padding

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img = self.images[i].unsqueeze(0)  # (1, H, W) uint8
        if self.augment:
            p = self.padding
            h, w = img.shape[-2:]
            padded = torch.nn.functional.pad(img, (p, p, p, p))
            dy, dx = torch.randint(0, 2 * p + 1, (2,)).tolist()
            img = padded[:, dy : dy + h, dx : dx + w]
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
        return self._as_output(img), self.labels[i]

    def _as_output(self, img: Tensor) -> Tensor:
        """uint8 images as they are, or normalised float32 (one sample or a whole batch alike)."""
        if self.output == "uint8":
            return img.contiguous()
        return (img.float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


class ImageBatches(AugmentedImages):
    """Un-augmented images fetched a whole batch at a time: one index per batch, no per-sample work.

    The ``DataLoader`` hands a batch's indices to ``__getitems__``, which gathers them with one
    indexing operation and returns the batch already collated (``[images (B, 1, H, W), labels (B,)]``,
    what the default collate makes of the per-sample path, bit for bit); :func:`collated` passes it on.
    Per sample, a worker does Python work for every image (an index, an unsqueeze, then a collate of B
    small tensors); gathered, a batch of 2048 is one copy of 1.6 MB (docs/methods/gpu-data.md: the
    prefetching pipeline at batch 2048 ran 3-4% faster, its data wait 12.6% -> 9.8%). Indexing one
    sample (``ds[i]``) still works.
    """

    def __init__(self, images: Tensor, labels: Tensor, output: str) -> None:
        super().__init__(images, labels, augment=False, output=output)

    def __getitems__(self, indices: list[int]) -> list[Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return [self._as_output(self.images[idx].unsqueeze(1)), self.labels[idx]]  # (B, 1, H, W), (B,)


def collated(batch: list[Tensor]) -> list[Tensor]:
    """The collate function of :class:`ImageBatches`: its ``__getitems__`` already collated the batch."""
    return batch


def make_loader(
    dataset: Dataset, batch_size: int, num_workers: int, pin_memory: bool, shuffle: bool, drop_last: bool
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
        collate_fn=collated if isinstance(dataset, ImageBatches) else None,
    )


def _subset(n: int, size: int | None, seed: int) -> Tensor:
    if size is None or size >= n:
        return torch.arange(n)
    if size < 1:
        raise ValueError(f"Subset size must be >= 1, got {size}.")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


class FashionMNISTDataModule(L.LightningDataModule):
    """Fashion-MNIST: 60k train / 10k test (the test set is the validation set, as in the literature).

    Args:
        data_dir: folder with the IDX files; ``None`` searches as ``find_fashion_mnist`` documents.
        batch_size: batch size of both loaders.
        num_workers: DataLoader worker processes.
        augment: per-sample random crop (padding 2) and horizontal flip on the CPU, training only.
        output: ``"float"`` normalised float32 (B, 1, 28, 28); ``"uint8"`` raw uint8 (B, 1, 28, 28).
        train_subset / val_subset: use a fixed random subset of this many samples (for quick runs).
        seed: seed of the subset choice.
        drop_last: drop the last incomplete training batch (one batch shape, so ``torch.compile`` compiles
            once); validation always sees every sample.
        batched_fetch: gather each batch with one index (:class:`ImageBatches`) instead of sample by sample;
            the batches are the same. ``None`` (default): whenever nothing is augmented on the CPU
            (``augment=False``: GPU augmentation pipelines). Per-sample CPU augmentation cannot be batched.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 128,
        num_workers: int = 4,
        augment: bool = True,
        output: Literal["float", "uint8"] = "float",
        train_subset: int | None = None,
        val_subset: int | None = None,
        seed: int = 0,
        pin_memory: bool | None = None,
        drop_last: bool = False,
        batched_fetch: bool | None = None,
    ) -> None:
        super().__init__()
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}.")
        if batched_fetch and augment:
            raise ValueError(
                "batched_fetch=True gathers whole batches, but augment=True augments sample by sample on the "
                "CPU: pass augment=False (and augment on the GPU with GPUAugment), or batched_fetch=False."
            )
        if batch_size < 1 or num_workers < 0:
            raise ValueError(
                f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}."
            )
        self.data_dir, self.batch_size, self.num_workers = data_dir, batch_size, num_workers
        self.augment, self.output = augment, output
        self.train_subset, self.val_subset, self.seed = train_subset, val_subset, seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.drop_last = drop_last
        self.batched_fetch = not augment if batched_fetch is None else batched_fetch
        self.data: FashionMNIST | None = None

    def prepare_data(self) -> None:
        find_fashion_mnist(self.data_dir)  # finds or downloads once, on rank 0; setup reads the files

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = load_fashion_mnist(self.data_dir)
        d = self.data
        tr = _subset(len(d.train_labels), self.train_subset, self.seed)
        va = _subset(len(d.test_labels), self.val_subset, self.seed + 1)
        if self.batched_fetch:
            self.train_set: AugmentedImages = ImageBatches(
                d.train_images[tr], d.train_labels[tr], self.output
            )
            self.val_set: AugmentedImages = ImageBatches(d.test_images[va], d.test_labels[va], self.output)
        else:
            self.train_set = AugmentedImages(
                d.train_images[tr], d.train_labels[tr], self.augment, self.output
            )
            self.val_set = AugmentedImages(d.test_images[va], d.test_labels[va], False, self.output)

    def train_dataloader(self) -> DataLoader:
        return make_loader(
            self.train_set, self.batch_size, self.num_workers, self.pin_memory, True, self.drop_last
        )

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, self.batch_size, self.num_workers, self.pin_memory, False, False)


class RandomWindows(Dataset):
    """``samples_per_epoch`` random (x, y) windows of a token stream; y is x shifted by one.

    Starts come from torch's global RNG (which Lightning seeds per worker). That RNG is seeded alike on
    every DDP rank, so rank ``r`` of ``world_size`` shifts each draw by ``r / world_size`` of the
    stream (circularly): ranks read different windows, each uniform over the stream, and rank 0 reads
    exactly what a single process reads.
    """

    def __init__(
        self, ids: Tensor, block_size: int, samples_per_epoch: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if len(ids) <= block_size + 1:
            raise ValueError(
                f"The token stream ({len(ids)}) must be longer than block_size+1 ({block_size + 1})."
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}.")
        self.ids, self.block_size, self.n = ids, block_size, samples_per_epoch
        self.span = len(ids) - block_size - 1
        self.offset = rank * self.span // world_size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        start = (int(torch.randint(0, self.span, ())) + self.offset) % self.span
        chunk = self.ids[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class ConsecutiveWindows(Dataset):
    """Non-overlapping windows covering the stream once, for a deterministic validation loss."""

    def __init__(self, ids: Tensor, block_size: int, max_windows: int | None = None) -> None:
        n = (len(ids) - 1) // block_size
        self.ids, self.block_size = ids, block_size
        self.n = n if max_windows is None else min(n, max_windows)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        s = i * self.block_size
        chunk = self.ids[s : s + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class CharLMDataModule(L.LightningDataModule):
    """Character-level LM data: random training windows, the last 10% of the text for validation.

    One "epoch" is ``samples_per_epoch`` random windows (default: as many windows as fit in the
    training text, i.e. about one pass over its characters).
    """

    def __init__(
        self,
        path: str | Path,
        block_size: int = 256,
        batch_size: int = 128,
        num_workers: int = 4,
        samples_per_epoch: int | None = None,
        val_windows: int | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if block_size < 1 or batch_size < 1:
            raise ValueError(f"block_size and batch_size must be >= 1, got {block_size}, {batch_size}.")
        self.path, self.block_size, self.batch_size = Path(path), block_size, batch_size
        self.num_workers, self.samples_per_epoch, self.val_windows = (
            num_workers,
            samples_per_epoch,
            val_windows,
        )
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.corpus: TextCorpus | None = None

    @property
    def vocab_size(self) -> int:
        self.setup()
        assert self.corpus is not None
        return self.corpus.vocab_size

    def setup(self, stage: str | None = None) -> None:
        if self.corpus is None:
            self.corpus = load_text_corpus(self.path)
        n = self.samples_per_epoch or len(self.corpus.train_ids) // self.block_size
        n = max(self.batch_size, n - n % self.batch_size)
        trainer = self.trainer  # None when the module is used outside a Trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.train_set = RandomWindows(self.corpus.train_ids, self.block_size, n, rank=rank, world_size=world)
        self.val_set = ConsecutiveWindows(self.corpus.val_ids, self.block_size, self.val_windows)

    def train_dataloader(self) -> DataLoader:
        # Windows are already random: no shuffle. Every training batch is full (samples_per_epoch is
        # rounded to whole batches), so a compiled model sees one shape.
        return make_loader(self.train_set, self.batch_size, self.num_workers, self.pin_memory, False, True)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set, self.batch_size, self.num_workers, self.pin_memory, False, False)
