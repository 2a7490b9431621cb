"""Keep a small data set in device memory and batch it there: no host work, no copies per step.

Fashion-MNIST is 47 MB as uint8, a rounding error next to an 80 GB GPU, yet the usual pipeline copies
every sample through worker processes, collation, pinned memory and a host-to-device copy every epoch.
Speed-run training scripts (Keller Jordan's airbench, tysam-code's hlb-CIFAR10) instead load the whole
data set onto the GPU once and draw each epoch's batches with a device-side ``randperm`` and
``index_select``: a few kernel launches per step and nothing for the host to wait on.

:class:`ResidentBatches` is the functional core (an iterable of batches over tensors already on one
device, shuffled per epoch from ``(seed, epoch)``, sharded over DDP ranks like ``DistributedSampler``).
:class:`DeviceResidentDataModule` is the LightningDataModule: it moves the tensors to the rank's device
once if they fit the memory budget, and otherwise says so and serves them through an ordinary
``DataLoader`` (the normal path).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_speedup._validation import check_int
from lightning_speedup.data.augment import batch_seed

__all__ = ["DeviceResidentDataModule", "ResidentBatches", "tensor_bytes"]


def tensor_bytes(tensors: Sequence[Tensor]) -> int:
    """Bytes the tensors occupy (their element count times element size)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def _format_bytes(n: float) -> str:
    """``n`` bytes in the largest unit (bytes, KiB, MiB, GiB) that keeps the number at least 1."""
    if n < 1024:
        return f"{n:,.0f} bytes"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:,.1f} {unit}"
    return f"{n / 1024:,.1f} GiB"


def _check_tensors(tensors: object, name: str) -> tuple[Tensor, ...]:
    if isinstance(tensors, Tensor) or not isinstance(tensors, Sequence) or not tensors:
        raise ValueError(
            f"{name} must be a non-empty tuple of tensors that share their first (sample) dimension, "
            f"e.g. (images, labels); got {type(tensors).__name__}."
        )
    if not all(isinstance(t, Tensor) and t.dim() >= 1 for t in tensors):
        kinds = [type(t).__name__ if not isinstance(t, Tensor) else f"{t.dim()}-d tensor" for t in tensors]
        raise ValueError(f"{name} must hold tensors with a sample dimension; got {kinds}.")
    lengths = {len(t) for t in tensors}
    if len(lengths) != 1:
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(f"The tensors of {name} must have the same number of samples; got shapes {shapes}.")
    if len(tensors[0]) == 0:
        raise ValueError(f"{name} has no samples.")
    return tuple(tensors)


class ResidentBatches:
    """Batches of tensors that already live on one device, shuffled and sliced there.

    Every epoch draws a permutation with a generator on the tensors' device seeded from
    ``(seed, epoch)``, pads it to a multiple of ``world_size`` by repeating its head (as
    ``DistributedSampler`` does), takes every ``world_size``-th index from ``rank`` and slices batches
    with ``index_select``. Order is a pure function of ``(seed, epoch, rank, world_size)``, so resuming
    at an epoch boundary replays it exactly. Each batch is a list of tensors (like ``default_collate``).

    ``epoch`` is read when an epoch's first batch is taken: pass ``lambda: trainer.current_epoch``
    under Lightning; without it, each ``iter()`` advances an internal counter.

    Raises:
        ValueError: no tensors, tensors of different lengths, a batch size < 1, a seed that is not an
            int, a rank outside ``[0, world_size)``, or no batch at all (``drop_last`` with fewer samples
            than a batch).
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: Callable[[], int] | None = None,
    ) -> None:
        self.tensors = _check_tensors(tensors, "ResidentBatches")
        devices = {t.device for t in self.tensors}
        if len(devices) != 1:
            raise ValueError(
                f"ResidentBatches needs all tensors on one device; got {sorted(map(str, devices))}."
            )
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, minimum=None)
        if not (
            isinstance(world_size, int)
            and world_size >= 1
            and isinstance(rank, int)
            and 0 <= rank < world_size
        ):
            raise ValueError(
                f"rank must be in [0, world_size) with world_size >= 1; got rank={rank}, world_size={world_size}."
            )
        self.device = devices.pop()
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self._epoch_fn = epoch
        self._next_epoch = 0
        self.num_samples = len(self.tensors[0])
        self.per_rank = math.ceil(self.num_samples / world_size)
        if len(self) == 0:
            raise ValueError(
                f"ResidentBatches would yield no batch: {self.per_rank} samples per rank, batch_size={batch_size} "
                f"and drop_last=True. Use a smaller batch size or drop_last=False."
            )

    def __len__(self) -> int:
        if self.drop_last:
            return self.per_rank // self.batch_size
        return math.ceil(self.per_rank / self.batch_size)

    def indices(self, epoch: int) -> Tensor:
        """This rank's sample indices for ``epoch``, in order, on the device (length ``per_rank``)."""
        n = self.num_samples
        if self.shuffle:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(batch_seed(self.seed, 0, epoch))  # same permutation on every rank
            order = torch.randperm(n, device=self.device, generator=generator)
        else:
            order = torch.arange(n, device=self.device)
        total = self.per_rank * self.world_size
        if total > n:  # pad so every rank gets the same number of samples
            order = torch.cat([order, order[: total - n]])
        return order[self.rank : total : self.world_size]

    def __iter__(self) -> Iterator[list[Tensor]]:
        # A generator: nothing runs until the loop takes the first batch, when the epoch is known.
        if self._epoch_fn is not None:
            epoch = self._epoch_fn()
        else:
            epoch = self._next_epoch
            self._next_epoch += 1
        order = self.indices(epoch)
        bs = self.batch_size
        for i in range(len(self)):
            index = order[i * bs : (i + 1) * bs]
            yield [t.index_select(0, index) for t in self.tensors]


class DeviceResidentDataModule(L.LightningDataModule):
    """Hold a data set on the training device and batch it there, if it fits a memory budget.

    Example::

        dm = ls.DeviceResidentDataModule.from_fashion_mnist(batch_size=512)      # uint8 on the GPU
        trainer = L.Trainer(callbacks=[ls.GPUAugment(ls.augment.RandomCrop(28, padding=2),
                                                     ls.augment.RandomHorizontalFlip(),
                                                     ls.augment.Normalize(0.286, 0.353))])
        trainer.fit(model, dm)

    In ``setup`` every rank compares the bytes of the train and validation tensors with the budget
    on its device: the explicit ``budget_bytes``, or ``budget_fraction`` of the device's free
    memory (CUDA), or no limit on the CPU (the tensors already live in host memory). If they fit they
    are copied to the device once and served by :class:`ResidentBatches` (sharded over ranks by
    ``global_rank``/``world_size``, reshuffled each epoch from ``seed`` and ``trainer.current_epoch``).
    Otherwise it warns once with the numbers and serves the tensors from host memory through a
    ``DataLoader`` (``pin_memory`` on CUDA, ``num_workers`` as given), which Lightning shards as usual.
    ``resident`` tells which path was taken.

    Args:
        train: tensors that share their first dimension, e.g. ``(images, labels)``.
        val: the same for validation, or None for no validation: the module then leaves
            ``val_dataloader`` undefined, as Lightning expects of a data module without validation
            data, so ``fit`` runs no validation loop and ``validate`` raises ``ValueError``.
        batch_size: training batch size (per rank); ``val_batch_size`` defaults to it.
        shuffle: reshuffle the training set every epoch.
        drop_last: drop the last incomplete training batch (keeps batch shapes static).
        budget_bytes: device memory the data may take; must hold at least one training batch.
        budget_fraction: share of free device memory used when ``budget_bytes`` is None, in (0, 1].
        seed: seed of the per-epoch permutations.
        num_workers: workers of the fallback DataLoader.

    Raises:
        ValueError: bad tensors, batch sizes, budget fraction, seed or number of workers, or a budget
            smaller than one batch.
    """

    def __init__(
        self,
        train: Sequence[Tensor],
        val: Sequence[Tensor] | None = None,
        batch_size: int = 512,
        val_batch_size: int | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        budget_bytes: int | None = None,
        budget_fraction: float = 0.5,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.train_tensors = _check_tensors(train, "train")
        self.val_tensors = _check_tensors(val, "val") if val is not None else None
        check_int("batch_size", batch_size, 1)
        check_int("val_batch_size", val_batch_size, 1, allow_none=True, hint="None uses batch_size.")
        if (
            isinstance(budget_fraction, bool)
            or not isinstance(budget_fraction, (int, float))
            or not 0.0 < budget_fraction <= 1.0  # also refuses NaN and inf
        ):
            raise ValueError(
                f"budget_fraction must be a number in (0, 1] (the share of free device memory the data may take); "
                f"got {budget_fraction!r}."
            )
        check_int("seed", seed, minimum=None)
        check_int("num_workers", num_workers, 0, meaning="worker processes of the fallback DataLoader")
        self.batch_size = batch_size
        self.val_batch_size = batch_size if val_batch_size is None else val_batch_size
        self.shuffle, self.drop_last, self.seed, self.num_workers = shuffle, drop_last, seed, num_workers
        self.budget_fraction = budget_fraction
        self.batch_bytes = tensor_bytes([t[:1] for t in self.train_tensors]) * batch_size
        if budget_bytes is not None:
            if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
                raise ValueError(f"budget_bytes must be an int (bytes) or None; got {budget_bytes!r}.")
            if budget_bytes < self.batch_bytes:
                shapes = ", ".join(f"{tuple(t.shape[1:])} {t.dtype}" for t in self.train_tensors)
                raise ValueError(
                    f"budget_bytes={budget_bytes:,} is smaller than one training batch: {batch_size} samples of "
                    f"[{shapes}] take {self.batch_bytes:,} bytes. Raise the budget to at least {self.batch_bytes:,} "
                    f"bytes or lower batch_size."
                )
        self.budget_bytes = budget_bytes
        self.resident: bool | None = None  # set in setup: which path the last setup took
        self._prepared = False
        self.device = torch.device("cpu")
        self._train_on_device: tuple[Tensor, ...] | None = None
        self._val_on_device: tuple[Tensor, ...] | None = None
        # Lightning runs no validation for a data module whose val_dataloader is the base class's (its
        # is_overridden check); returning an empty list instead makes it warn that the loader has zero length.
        # A subclass that defines its own val_dataloader keeps it.
        self._no_val_loader = (
            val is None and type(self).val_dataloader is DeviceResidentDataModule.val_dataloader
        )
        if self._no_val_loader:
            self.val_dataloader = functools.partial(L.LightningDataModule.val_dataloader, self)  # type: ignore[method-assign]

    @classmethod
    def from_fashion_mnist(
        cls,
        data_dir: str | Path | None = None,
        train_subset: int | None = None,
        val_subset: int | None = None,
        subset_seed: int = 0,
        **kwargs: object,
    ) -> DeviceResidentDataModule:
        """Fashion-MNIST as uint8 images ``(N, 1, 28, 28)`` and int64 labels; the test set is the validation set.

        ``train_subset``/``val_subset`` keep the same fixed random subsets as
        :class:`FashionMNISTDataModule` with ``seed=subset_seed`` (for quick runs).
        """
        # The bench's reference data set, imported on call: importing the data techniques does not
        # import the bench (this constructor is a convenience for the reference task and examples).
        from lightning_speedup.bench.datamodules import _subset
        from lightning_speedup.bench.datasets import load_fashion_mnist

        data = load_fashion_mnist(data_dir)
        tr = _subset(len(data.train_labels), train_subset, subset_seed)
        va = _subset(len(data.test_labels), val_subset, subset_seed + 1)
        return cls(
            train=(data.train_images[tr].unsqueeze(1), data.train_labels[tr]),
            val=(data.test_images[va].unsqueeze(1), data.test_labels[va]),
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def data_bytes(self) -> int:
        return tensor_bytes(self.train_tensors) + (tensor_bytes(self.val_tensors) if self.val_tensors else 0)

    def budget_for(self, device: torch.device) -> float:
        """The budget in bytes on ``device``: explicit, a share of free CUDA memory, or unlimited elsewhere."""
        if self.budget_bytes is not None:
            return float(self.budget_bytes)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return free * self.budget_fraction
        return math.inf

    @override
    def setup(self, stage: str) -> None:
        if stage == "validate" and self._no_val_loader:
            raise ValueError(
                "DeviceResidentDataModule has no validation data (val=None), so trainer.validate() has nothing to "
                "run; pass val=(images, labels) to the module."
            )
        if self._prepared:
            return
        trainer = self.trainer
        self.device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        budget = self.budget_for(self.device)
        need = self.data_bytes
        self.resident = need <= budget
        if self.resident:
            self._train_on_device = tuple(t.to(self.device) for t in self.train_tensors)
            if self.val_tensors is not None:
                self._val_on_device = tuple(t.to(self.device) for t in self.val_tensors)
        else:
            rank_zero_warn(
                f"DeviceResidentDataModule: the data set needs {_format_bytes(need)} but the budget on {self.device} "
                f"is {_format_bytes(budget)}, so it stays in host memory and is served by a DataLoader "
                f"(the normal path). Pass budget_bytes= (or a larger budget_fraction) to hold it on the device."
            )
        self._prepared = True

    def _rank_world(self) -> tuple[int, int, Callable[[], int] | None]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1, None
        return trainer.global_rank, trainer.world_size, lambda: trainer.current_epoch

    def _host_loader(
        self, tensors: tuple[Tensor, ...], batch_size: int, shuffle: bool, drop_last: bool
    ) -> DataLoader:
        return DataLoader(
            TensorDataset(*tensors),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=self.num_workers > 0,
        )

    def _require_setup(self) -> None:
        if not self._prepared:
            raise RuntimeError(
                "DeviceResidentDataModule.setup() has not run; pass the module to trainer.fit()."
            )

    @override
    def train_dataloader(self) -> ResidentBatches | DataLoader:
        self._require_setup()
        if not self.resident:
            return self._host_loader(self.train_tensors, self.batch_size, self.shuffle, self.drop_last)
        assert self._train_on_device is not None
        rank, world, epoch = self._rank_world()
        return ResidentBatches(
            self._train_on_device,
            self.batch_size,
            self.shuffle,
            self.drop_last,
            self.seed,
            rank,
            world,
            epoch,
        )

    @override
    def val_dataloader(self) -> ResidentBatches | DataLoader:
        self._require_setup()
        if self.val_tensors is None:
            raise RuntimeError(
                "DeviceResidentDataModule has no validation data (val=None); pass val=(images, labels)."
            )
        if not self.resident:
            return self._host_loader(self.val_tensors, self.val_batch_size, False, False)
        assert self._val_on_device is not None
        rank, world, _ = self._rank_world()
        return ResidentBatches(self._val_on_device, self.val_batch_size, False, False, self.seed, rank, world)

    @override
    def teardown(self, stage: str) -> None:
        if stage == "fit":
            # Give the device memory back; a later fit/validate moves the tensors again.
            self._train_on_device = self._val_on_device = None
            self._prepared = False
