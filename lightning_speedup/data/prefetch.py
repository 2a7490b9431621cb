"""Copy batches to the GPU ahead of time on a side CUDA stream, so the copy overlaps compute.

Lightning moves each batch with ``batch.to(device)`` on the *current* stream right before the step,
so the host-to-device copy sits between two steps' kernels and the GPU idles while it runs. Lightning
1.x had an experimental side-stream fetcher (``InterBatchParallelDataFetcher``), removed in 2.0.
This is the classic data prefetcher of NVIDIA's Apex ImageNet example and of timm's ``PrefetchLoader``:
keep ``depth`` batches in flight, each copied from pinned host memory on a side stream with
``non_blocking=True``; when the loop takes a batch, the compute stream waits on that batch's copy-done
event (a GPU-side wait, the host never blocks), and every tensor is ``record_stream``-ed on the compute
stream so the caching allocator does not hand its memory back to the side stream while compute still
reads it.

:class:`PrefetchLoader` is the functional core (plain torch, any nested collate output); on a
non-CUDA device it is a pass-through. :class:`GPUPrefetcher` is the Lightning callback that wraps
every train/val/test/predict loader of the run after Lightning has added its distributed sampler.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import Strategy
from torch import Tensor
from typing_extensions import override

log = logging.getLogger(__name__)

__all__ = ["GPUPrefetcher", "PrefetchLoader", "iter_tensors", "map_tensors"]


# ----------------------------------------------------------------------------------------------------
# functional core
# ----------------------------------------------------------------------------------------------------


def map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every tensor in a nested batch, rebuilding containers of the same types.

    Handles tensors nested in tuples, lists, namedtuples, mappings (dict, OrderedDict, defaultdict and
    other ``Mapping`` types constructible from a dict) and dataclass instances (frozen ones too; the
    instance is shallow-copied, ``__init__`` is not re-run). Anything else is returned as is.
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for field in dataclasses.fields(obj):
            # object.__setattr__ works on frozen dataclasses as well.
            object.__setattr__(new, field.name, map_tensors(getattr(obj, field.name), fn))
        return new
    if isinstance(obj, Mapping):
        items = {key: map_tensors(value, fn) for key, value in obj.items()}
        if isinstance(obj, defaultdict):
            return type(obj)(obj.default_factory, items)
        return type(obj)(items)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(map_tensors(value, fn) for value in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(value, fn) for value in obj)
    return obj


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a nested batch, in the order :func:`map_tensors` visits them."""
    if isinstance(obj, Tensor):
        yield obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from iter_tensors(getattr(obj, field.name))
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_tensors(value)


class _CUDAPrefetchIterator(Iterator[Any]):
    """Keeps up to ``depth`` batches copying on a side stream, ahead of the one the loop is using."""

    def __init__(self, iterator: Iterator[Any], loader: PrefetchLoader) -> None:
        self._iterator = iterator
        self._loader = loader
        self._device = loader.device
        # One side stream per iterator: on DDP every rank builds its own, on its own device.
        self._stream = torch.cuda.Stream(device=self._device)
        self._queue: deque[tuple[Any, torch.cuda.Event]] = deque()
        self._exhausted = False

    def _to_device(self, tensor: Tensor) -> Tensor:
        if tensor.device == self._device:
            return tensor
        if tensor.device.type == "cpu" and self._loader.pin_memory and not tensor.is_pinned():
            # A copy from pageable memory is staged synchronously by the driver; pinning here costs one
            # host memcpy on this thread. DataLoader(pin_memory=True) does it on its pin thread instead.
            self._loader._warn_unpinned()
            tensor = tensor.pin_memory()
        return tensor.to(self._device, non_blocking=True)

    def _fill(self) -> None:
        while not self._exhausted and len(self._queue) < self._loader.depth:
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._exhausted = True
                return
            with torch.cuda.stream(self._stream):
                # Device memory is allocated on the side stream; the pinned host buffers are safe to drop
                # once the copy is enqueued because the caching host allocator records an event for them.
                moved = map_tensors(batch, self._to_device)
                done = torch.cuda.Event()
                done.record(self._stream)
            self._queue.append((moved, done))

    @override
    def __next__(self) -> Any:
        self._fill()  # lazily: the first batch is taken when the loop asks, not when it calls iter()
        if not self._queue:
            raise StopIteration
        batch, done = self._queue.popleft()
        consumer = torch.cuda.current_stream(self._device)
        consumer.wait_event(done)  # GPU-side wait; the host does not block
        for tensor in iter_tensors(batch):
            if tensor.device == self._device:
                tensor.record_stream(consumer)
        self._fill()  # start the next copies now so they overlap this step's compute
        return batch


# A stateful loader's state runs `depth` batches ahead of what the loop consumed, so resuming from it
# would skip batches; without these, Lightning treats the wrapper as a plain (non-resumable) iterable.
_NOT_FORWARDED = frozenset({"state_dict", "load_state_dict"})


class PrefetchLoader:
    """Wrap any iterable of batches so they arrive on ``device``, copied ``depth`` batches ahead.

    On a CUDA device, batches (any nesting of tuples, lists, dicts, namedtuples, dataclasses) are
    copied from pinned host memory on a side stream; tensors keep their dtype, so uint8 images stay
    uint8 (4x fewer bytes than float32) for an on-device conversion. On any other device it is a
    pass-through: iteration yields the wrapped loader's batches unchanged.

    ``len()`` and every attribute the wrapper does not define (``dataset``, ``sampler``,
    ``batch_size``, ...) come from the wrapped loader.

    Raises:
        ValueError: ``depth`` is not an int >= 1.
    """

    def __init__(
        self, loader: Iterable[Any], device: torch.device | str, depth: int = 2, pin_memory: bool = True
    ) -> None:
        _check_depth(depth)
        self.loader = loader
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.depth = depth
        self.pin_memory = pin_memory
        self._warned_unpinned = False

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        if self.device.type != "cuda":
            return iterator
        return _CUDAPrefetchIterator(iterator, self)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found on the wrapper; guard against recursion while unpickling.
        if name == "loader" or name in _NOT_FORWARDED:
            raise AttributeError(name)
        return getattr(self.loader, name)

    @property
    def worker_init_fn(self) -> Any:
        return getattr(self.loader, "worker_init_fn", None)

    @worker_init_fn.setter
    def worker_init_fn(self, fn: Any) -> None:
        # Lightning's seed_everything(workers=True) sets this attribute on the loader it holds (the
        # wrapper); it has to reach the DataLoader that starts the workers.
        self.loader.worker_init_fn = fn  # type: ignore[attr-defined]

    def _warn_unpinned(self) -> None:
        if not self._warned_unpinned:
            self._warned_unpinned = True
            warnings.warn(
                "PrefetchLoader: batches arrive in pageable memory, so they are pinned on the training "
                "thread before each copy. Set DataLoader(pin_memory=True) to pin them on the loader's "
                "pin-memory thread instead.",
                stacklevel=3,
            )

    def __repr__(self) -> str:
        return f"PrefetchLoader({self.loader!r}, device={self.device}, depth={self.depth})"


def _check_depth(depth: object) -> None:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(
            f"depth must be an int >= 1 (the number of batches copied ahead); got {depth!r}. "
            "depth=2 hides one copy behind each step with one spare."
        )


# ----------------------------------------------------------------------------------------------------
# Lightning adapter
# ----------------------------------------------------------------------------------------------------


def _install_dataloader_wrapper(strategy: Strategy, wrap: Callable[[object], object]) -> Callable[[], None]:
    """Make ``strategy.process_dataloader`` also apply ``wrap``; return a function that undoes it.

    The only place this package reaches past Lightning's callback API; checked against Lightning 2.6.6.
    Lightning calls the public ``Strategy.process_dataloader`` on every train/val/test/predict loader
    after it has injected the ``DistributedSampler`` and before it creates the iterator
    (``trainer/connectors/data_connector.py::_process_dataloader``); it is where Lightning's own
    ``XLAStrategy`` wraps loaders in torch_xla's device-prefetching ``MpDeviceLoader``. Wrapping any
    earlier (the user's ``train_dataloader``) would hide the DataLoader from the sampler injection and
    break DDP; wrapping later (``on_train_epoch_start``) is too late, because ``FitLoop.setup_data``
    already created the first epoch's iterator. A callback cannot subclass the user's strategy, so the
    bound method of this strategy instance is chained, not replaced, and restored in ``teardown``.
    """
    original = strategy.process_dataloader
    had_instance_attr = "process_dataloader" in vars(strategy)

    def process_dataloader(dataloader: object) -> object:
        return wrap(original(dataloader))

    strategy.process_dataloader = process_dataloader  # type: ignore[method-assign]

    def uninstall() -> None:
        if vars(strategy).get("process_dataloader") is not process_dataloader:
            return  # someone chained on top of us; leave their wrapper (it still calls ours)
        if had_instance_attr:
            strategy.process_dataloader = original  # type: ignore[method-assign]
        else:
            del strategy.process_dataloader

    return uninstall


class GPUPrefetcher(Callback):
    """Deliver every batch already on the GPU, copied ``depth`` batches ahead on a side CUDA stream.

    Example::

        trainer = L.Trainer(accelerator="gpu", callbacks=[ls.GPUPrefetcher(depth=2)])

    Works with the user's unchanged DataLoader (pass ``pin_memory=True`` to it), for training,
    validation, test and predict loaders, with any nested collate output, and under DDP (each rank
    copies to its own device on its own stream). Tensors keep their dtype: feed uint8 images and
    convert them on the GPU with :class:`~lightning_speedup.data.gpu_augment.GPUAugment`.
    On a non-CUDA accelerator it does nothing and logs that once.

    Notes:
        ``LightningModule.on_before_batch_transfer`` receives batches already on the device, and
        ``trainer.train_dataloader`` returns the :class:`PrefetchLoader` wrapper (which forwards
        ``dataset``, ``sampler``, ``len()`` and other attributes to the DataLoader). Each of the
        ``depth`` batches in flight takes device memory.

    Args:
        depth: batches copied ahead of the one being used (>= 1).
        pin_memory: pin batches that arrive in pageable memory before copying (warns once).

    Raises:
        ValueError: ``depth`` is not an int >= 1.
    """

    def __init__(self, depth: int = 2, pin_memory: bool = True) -> None:
        _check_depth(depth)
        self.depth = depth
        self.pin_memory = pin_memory
        self._uninstall: Callable[[], None] | None = None
        self._device: torch.device | None = None

    @property
    def active(self) -> bool:
        """Whether loaders of the current run are being wrapped (False on a non-CUDA accelerator)."""
        return self._uninstall is not None

    def _wrap(self, dataloader: object) -> object:
        if isinstance(dataloader, PrefetchLoader) or self._device is None:
            return dataloader
        return PrefetchLoader(dataloader, self._device, self.depth, self.pin_memory)  # type: ignore[arg-type]

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        if device.type != "cuda":
            if trainer.is_global_zero:
                log.info(
                    "GPUPrefetcher: the accelerator is %s, not CUDA; batches pass through unchanged.",
                    device.type,
                )
            return
        if self._uninstall is None:
            self._device = device
            self._uninstall = _install_dataloader_wrapper(trainer.strategy, self._wrap)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None
            self._device = None
