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
``DataLoader`` (the normal path), in the same per-epoch order drawn from the same ``seed``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from typing_extensions import override

from lightning_speedup._compat import batches_done_on_resume
from lightning_speedup._validation import check_bool, check_int
from lightning_speedup.data.augment import batch_seed

__all__ = [
    "DeviceResidentDataModule",
    "ResidentBatches",
    "SeededDistributedSampler",
    "epoch_indices",
    "tensor_bytes",
]


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


def epoch_indices(
    num_samples: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``rank``'s sample indices for ``epoch`` on ``device``: length ``ceil(num_samples / world_size)``.

    A permutation drawn by a generator on ``device`` seeded from ``(seed, epoch)`` (the same on every
    rank; ``arange`` without ``shuffle``), padded to a multiple of ``world_size`` by repeating its head
    as ``DistributedSampler`` does, of which the rank takes every ``world_size``-th index from ``rank``.
    """
    device = torch.device(device)
    if shuffle:
        generator = torch.Generator(device=device)
        generator.manual_seed(batch_seed(seed, 0, epoch))  # same permutation on every rank
        order = torch.randperm(num_samples, device=device, generator=generator)
    else:
        order = torch.arange(num_samples, device=device)
    per_rank = math.ceil(num_samples / world_size)
    total = per_rank * world_size
    if total > num_samples:  # pad so every rank gets the same number of samples
        order = torch.cat([order, order[: total - num_samples]])
    return order[rank:total:world_size]


class SeededDistributedSampler(DistributedSampler):
    """``DistributedSampler`` with :class:`ResidentBatches`' order: :func:`epoch_indices` on the host.

    What :class:`DeviceResidentDataModule` gives its over-budget ``DataLoader``, so that ``seed`` decides
    the order on both paths (on the CPU the very same order). Being a ``DistributedSampler``, Lightning
    keeps it under DDP instead of injecting its own, and calls ``set_epoch`` every epoch.
    """

    def __init__(self, dataset: Any, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )

    @override
    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)  # type: ignore[arg-type]
        order = epoch_indices(n, self.shuffle, self.seed, self.epoch, self.rank, self.num_replicas)
        return iter(order.tolist())


class ResidentBatches:
    """Batches of tensors that already live on one device, shuffled and sliced there.

    Every epoch draws a permutation with a generator on the tensors' device seeded from
    ``(seed, epoch)``, pads it to a multiple of ``world_size`` by repeating its head (as
    ``DistributedSampler`` does), takes every ``world_size``-th index from ``rank`` and slices batches
    with ``index_select`` (:func:`epoch_indices`). Order is a pure function of ``(seed, epoch, rank,
    world_size)``. Each batch is a list of tensors (like ``default_collate``).

    ``epoch`` is read when an epoch's first batch is taken: pass ``lambda: trainer.current_epoch``
    under Lightning; without it, each ``iter()`` advances an internal counter.

    Resuming mid-epoch: :meth:`state_dict` holds the epoch and how many of its batches were consumed,
    and after :meth:`load_state_dict` the next ``iter()`` of that epoch starts at the next batch, so an
    interrupted run sees every batch once. Lightning saves and restores this state for the training
    loader it holds. ``consumed`` returns how many batches of the current epoch the consumer has
    finished; without it, the count is the batches handed out, which is too many for a consumer that
    reads ahead (Lightning's loop and a prefetcher both do): :class:`DeviceResidentDataModule` passes
    the training loop's own count.

    Raises:
        ValueError: no tensors, tensors of different lengths, a batch size < 1, a seed that is not an
            int, ``shuffle``/``drop_last`` not a bool, a rank outside ``[0, world_size)``, or no batch at
            all (``drop_last`` with fewer samples than a batch).
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
        consumed: Callable[[], int] | None = None,
    ) -> None:
        self.tensors = _check_tensors(tensors, "ResidentBatches")
        devices = {t.device for t in self.tensors}
        if len(devices) != 1:
            raise ValueError(
                f"ResidentBatches needs all tensors on one device; got {sorted(map(str, devices))}."
            )
        check_int("batch_size", batch_size, 1)
        check_int("seed", seed, minimum=None)
        check_bool("shuffle", shuffle, prefix="ResidentBatches: ")
        check_bool("drop_last", drop_last, prefix="ResidentBatches: ")
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
        self._consumed_fn = consumed
        # The epoch of the latest iterator that started, and how many of its batches it handed out.
        self._epoch: int | None = None
        self._handed_out = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches to skip) from load_state_dict
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
        return epoch_indices(
            self.num_samples, self.shuffle, self.seed, epoch, self.rank, self.world_size, self.device
        )

    @property
    def counts_consumed(self) -> bool:
        """Whether :meth:`state_dict` counts the batches the consumer finished (a ``consumed`` callable was
        given), so that a wrapper that reads ahead (``PrefetchLoader``) may pass the state on."""
        return self._consumed_fn is not None

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "batches": k}``: the next batch to train is batch ``k`` of epoch ``e``."""
        if self._epoch is None:  # no epoch started yet
            epoch = self._epoch_fn() if self._epoch_fn is not None else self._next_epoch
            if self._resume is not None and self._resume[0] == epoch:
                return {"epoch": epoch, "batches": self._resume[1]}  # loaded, not started: pass it on
            return {"epoch": epoch, "batches": 0}
        done = self._consumed_fn() if self._consumed_fn is not None else self._handed_out
        if done >= len(self):
            return {"epoch": self._epoch + 1, "batches": 0}
        return {"epoch": self._epoch, "batches": done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Start the next ``iter()`` at batch ``state_dict["batches"]`` if it is of ``state_dict["epoch"]``."""
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        self._resume = (epoch, batches)
        self._epoch = None
        if self._epoch_fn is None:
            self._next_epoch = epoch

    def __iter__(self) -> Iterator[list[Tensor]]:
        # A generator: nothing runs until the loop takes the first batch, when the epoch is known.
        if self._epoch_fn is not None:
            epoch = self._epoch_fn()
        else:
            epoch = self._next_epoch
            self._next_epoch += 1
        start = 0
        if self._resume is not None:
            # Only the epoch the state was saved in resumes mid-way (a checkpoint saved at an epoch's end
            # resumes with the next epoch, from its start).
            if self._resume[0] == epoch:
                start = self._resume[1]
            self._resume = None
        self._epoch, self._handed_out = epoch, start
        order = self.indices(epoch)
        bs = self.batch_size
        for i in range(start, len(self)):
            index = order[i * bs : (i + 1) * bs]
            batch = [t.index_select(0, index) for t in self.tensors]
            self._handed_out += 1
            yield batch


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
    ``DataLoader`` (``pin_memory`` on CUDA, ``num_workers`` as given) whose sampler draws the same
    per-epoch order from ``seed`` (:class:`SeededDistributedSampler`, sharded over ranks, which
    Lightning keeps under DDP). ``resident`` tells which path was taken. Under DDP the ranks agree:
    the data stays on the devices only if it fits the budget on every rank; a rank whose budget is too
    small warns with its numbers, and all ranks take the ``DataLoader`` path.

    A run resumed from a checkpoint saved mid-epoch continues the resident path's epoch at the next
    batch (the training loader's position is in the checkpoint), so it ends bitwise-identical to an
    uninterrupted run on the CPU. The over-budget ``DataLoader`` path resumes at epoch boundaries only.

    The device copies are released in every ``teardown`` (after ``fit``, ``validate``, ...), and a
    ``setup`` for another Trainer or device decides again.

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
        seed: seed of the per-epoch permutations, on both paths (not the global seed).
        num_workers: workers of the fallback DataLoader.

    Raises:
        ValueError: bad tensors, batch sizes, budget fraction, seed or number of workers, ``shuffle`` or
            ``drop_last`` not a bool, or a budget smaller than one batch.
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
        check_bool("shuffle", shuffle)
        check_bool("drop_last", drop_last)
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
        # (id of the Trainer, device) of the setup that holds the current decision; None: none holds one.
        self._prepared_for: tuple[int, torch.device] | None = None
        self._warned_repeat = False
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
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        key = (id(trainer), device)
        if self._prepared_for == key:
            return
        self._release()  # a setup for another Trainer or device (e.g. after a fit that raised) decides again
        self.device = device
        budget = self.budget_for(self.device)
        need = self.data_bytes
        fits = need <= budget
        # Every rank must take the same path: a resident rank shards its own permutation, a DataLoader rank
        # its sampler's, and a mix would train some samples twice and others never.
        self.resident = (
            trainer.strategy.reduce_boolean_decision(fits, all=True) if trainer is not None else fits
        )
        if self.resident:
            self._train_on_device = tuple(t.to(self.device) for t in self.train_tensors)
            if self.val_tensors is not None:
                self._val_on_device = tuple(t.to(self.device) for t in self.val_tensors)
        else:
            # Warned by every rank that falls back (not rank 0 only): the rank whose budget is too small may
            # be any of them.
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            where = f" (rank {rank} of {world})" if world > 1 else ""
            if fits:
                reason = (
                    f"the data set ({_format_bytes(need)}) fits the budget on {self.device}{where}, but not that "
                    f"of another rank, and all ranks must take one path, so"
                )
            else:
                reason = (
                    f"the data set needs {_format_bytes(need)} but the budget on {self.device}{where} is "
                    f"{_format_bytes(budget)}, so"
                )
            warnings.warn(
                f"DeviceResidentDataModule: {reason} it stays in host memory and is served by a DataLoader "
                f"(the normal path){' on every rank' if world > 1 else ''}. Pass budget_bytes= (or a larger "
                f"budget_fraction) to hold it on the device.",
                stacklevel=2,
            )
        self._prepared_for = key

    def _release(self) -> None:
        self._train_on_device = self._val_on_device = None
        self._prepared_for = None

    @property
    def _prepared(self) -> bool:
        """Whether a setup has decided the path and not been torn down since."""
        return self._prepared_for is not None

    def _rank_world(self) -> tuple[int, int, Callable[[], int] | None]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1, None
        return trainer.global_rank, trainer.world_size, lambda: trainer.current_epoch

    def _batches_done(self) -> int:
        """Training batches of the current epoch that Lightning's loop will count as done when it resumes
        from a checkpoint saved now.

        The loop's own count (:func:`~lightning_speedup._compat.batches_done_on_resume`): releases before
        Lightning 2.5 train a batch saved in ``on_train_batch_end`` again, and the loader follows the loop.
        """
        trainer = self.trainer
        assert trainer is not None
        done, repeats = batches_done_on_resume(trainer)
        if repeats and not self._warned_repeat:
            self._warned_repeat = True
            rank_zero_warn(
                f"DeviceResidentDataModule: Lightning {L.__version__} resumes a checkpoint saved in "
                "on_train_batch_end (e.g. ModelCheckpoint(every_n_train_steps=...)) one batch early and trains "
                "that batch a second time; the resident loader follows the loop, so a run resumed from this "
                "checkpoint is not bitwise identical to an uninterrupted one. Lightning >= 2.5 resumes it "
                "exactly; with this release, resume from checkpoints saved at the end of an epoch."
            )
        return done

    def _host_loader(
        self, tensors: tuple[Tensor, ...], batch_size: int, shuffle: bool, drop_last: bool
    ) -> DataLoader:
        dataset = TensorDataset(*tensors)
        sampler = None
        if shuffle:
            rank, world, _ = self._rank_world()
            sampler = SeededDistributedSampler(
                dataset, shuffle=True, seed=self.seed, rank=rank, world_size=world
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
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
            consumed=self._batches_done if self.trainer is not None else None,
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
        # Give the device memory back after every stage; a later fit/validate decides and copies again.
        self._release()
