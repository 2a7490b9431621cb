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

import contextlib
import copy
import dataclasses
import functools
import logging
import queue
import threading
import warnings
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import Strategy
from torch import Tensor
from typing_extensions import override

from lightning_speedup._chain import chain_method
from lightning_speedup._validation import check_int

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


_END = object()  # the source is exhausted


class _Failure:
    """An exception raised on the fetch thread, handed to the consumer to re-raise in order."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _fetch_ahead(
    source: Iterator[Any],
    prepare: Callable[[Any], Any],
    results: queue.SimpleQueue[Any],
    slots: threading.Semaphore,
    stop: threading.Event,
    context: Callable[[], AbstractContextManager[Any]],
) -> None:
    # Deliberately a function of the shared pieces only: the thread must not reference the consumer's
    # iterator, or dropping that iterator (a loop that stops early) could never stop the thread.
    try:
        with context():
            while True:
                slots.acquire()  # at most `depth` results ahead of the consumer
                if stop.is_set():
                    return
                try:
                    item = next(source)
                except StopIteration:
                    results.put(_END)
                    return
                results.put(prepare(item))
    except BaseException as error:  # handed over and re-raised on the consumer's thread
        results.put(_Failure(error))


class _FetchThread:
    """The fetch thread of a :class:`_BackgroundIterator` and what stops it; holds no reference to the iterator."""

    def __init__(self, thread: threading.Thread, stop: threading.Event, slots: threading.Semaphore) -> None:
        self.thread, self._stop, self._slots = thread, stop, slots

    def stop(self) -> None:
        """Ask the thread to end before its next fetch (it may be inside one now)."""
        self._stop.set()
        self._slots.release()  # wake it if it waits for a slot

    def close(self, timeout: float | None = None) -> bool:
        """Stop it and wait up to ``timeout`` s for it to end. Returns whether it has ended."""
        self.stop()
        if self.thread.ident is None:
            return True  # never started
        self.thread.join(timeout)
        return not self.thread.is_alive()


class _BackgroundIterator(Iterator[Any]):
    """``prepare(item)`` for every item of ``source``, computed on a daemon thread up to ``depth`` items ahead.

    The thread starts on the first ``next()``. Items keep their order; an exception raised by the source
    or by ``prepare`` is re-raised by the ``next()`` that reaches it. Closing (or dropping) the iterator
    stops the thread before its next fetch, which releases the source.
    """

    def __init__(
        self,
        source: Iterator[Any],
        prepare: Callable[[Any], Any],
        depth: int,
        context: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        name: str = "lightning_speedup-prefetch",
    ) -> None:
        self._results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._slots = threading.Semaphore(depth)
        stop = threading.Event()
        thread = threading.Thread(
            target=_fetch_ahead,
            args=(source, prepare, self._results, self._slots, stop, context),
            name=name,
            daemon=True,
        )
        self.fetch = _FetchThread(thread, stop, self._slots)
        self._finished = False

    @property
    def thread(self) -> threading.Thread:
        return self.fetch.thread

    @override
    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        if self.thread.ident is None:
            self.thread.start()
        item = self._results.get()
        if item is _END or isinstance(item, _Failure):
            self._finished = True
            self.thread.join()
            if item is _END:
                raise StopIteration
            raise item.error
        self._slots.release()
        return item

    def close(self, timeout: float | None = None) -> bool:
        """Stop fetching; wait up to ``timeout`` s for the thread to end. Returns whether it has ended."""
        self._finished = True
        return self.fetch.close(timeout)

    def __del__(self) -> None:
        fetch = getattr(self, "fetch", None)
        if fetch is not None:
            fetch.stop()


class _InlineAhead(Iterator[Any]):
    """The same contract as :class:`_BackgroundIterator` on the calling thread (``background=False``)."""

    def __init__(self, source: Iterator[Any], prepare: Callable[[Any], Any], depth: int) -> None:
        self._source, self._prepare, self._depth = source, prepare, depth
        self._queue: deque[Any] = deque()
        self._exhausted = False

    def _fill(self) -> None:
        while not self._exhausted and len(self._queue) < self._depth:
            try:
                self._queue.append(self._prepare(next(self._source)))
            except StopIteration:
                self._exhausted = True
            except Exception as error:  # raised when the loop reaches it, after the batches before it
                self._exhausted = True
                self._queue.append(_Failure(error))

    @override
    def __next__(self) -> Any:
        self._fill()  # lazily: the first batch is taken when the loop asks, not when it calls iter()
        if not self._queue:
            raise StopIteration
        item = self._queue.popleft()
        if isinstance(item, _Failure):
            raise item.error
        self._fill()  # start the next copies now so they overlap this step's compute
        return item


class _SideStreamCopy:
    """Copies one batch to the device on the side stream; returns it with its copy-done event."""

    def __init__(self, loader: PrefetchLoader, stream: torch.cuda.Stream) -> None:
        self._loader, self._device, self._stream = loader, loader.device, stream

    def _to_device(self, tensor: Tensor) -> Tensor:
        if tensor.device == self._device:
            return tensor
        if tensor.device.type == "cpu" and self._loader.pin_memory and not tensor.is_pinned():
            # A copy from pageable memory is staged synchronously by the driver; pinning here costs one
            # host memcpy on this thread. DataLoader(pin_memory=True) does it on its pin thread instead.
            self._loader._warn_unpinned()
            tensor = tensor.pin_memory()
        return tensor.to(self._device, non_blocking=True)

    def __call__(self, batch: Any) -> tuple[Any, torch.cuda.Event]:
        with torch.cuda.stream(self._stream):
            # Device memory is allocated on the side stream; the pinned host buffers are safe to drop
            # once the copy is enqueued because the caching host allocator records an event for them.
            moved = map_tensors(batch, self._to_device)
            done = torch.cuda.Event()
            done.record(self._stream)
        return moved, done


class _CUDAPrefetchIterator(Iterator[Any]):
    """Keeps up to ``depth`` batches copying on a side stream, ahead of the one the loop is using."""

    def __init__(self, iterator: Iterator[Any], loader: PrefetchLoader) -> None:
        self._device = loader.device
        # One side stream per iterator: on DDP every rank builds its own, on its own device.
        copy = _SideStreamCopy(loader, torch.cuda.Stream(device=self._device))
        self._ahead: _BackgroundIterator | _InlineAhead
        if loader.background:
            # The thread's current CUDA device is its own (device 0 by default): set it to the rank's.
            self._ahead = _BackgroundIterator(
                iterator, copy, loader.depth, context=functools.partial(torch.cuda.device, self._device)
            )
        else:
            self._ahead = _InlineAhead(iterator, copy, loader.depth)

    @override
    def __next__(self) -> Any:
        batch, done = next(self._ahead)
        consumer = torch.cuda.current_stream(self._device)
        consumer.wait_event(done)  # GPU-side wait; the host does not block
        for tensor in iter_tensors(batch):
            if tensor.device == self._device:
                tensor.record_stream(consumer)
        return batch

    @property
    def fetch(self) -> _FetchThread | None:
        """The fetch thread (``background=True``), or None."""
        return self._ahead.fetch if isinstance(self._ahead, _BackgroundIterator) else None


# A stateful loader's state runs `depth` batches ahead of what the loop consumed, so resuming from it
# would skip batches; without these, Lightning treats the wrapper as a plain (non-resumable) iterable.
# (A loader whose state counts the batches its consumer finished gets them in PrefetchLoader.__init__.)
_NOT_FORWARDED = frozenset({"state_dict", "load_state_dict"})


class PrefetchLoader:
    """Wrap any iterable of batches so they arrive on ``device``, copied ``depth`` batches ahead.

    On a CUDA device, batches (any nesting of tuples, lists, dicts, namedtuples, dataclasses) are
    copied from pinned host memory on a side stream; tensors keep their dtype, so uint8 images stay
    uint8 (4x fewer bytes than float32) for an on-device conversion. With ``background=True`` (the
    default) a daemon thread takes the batches from the wrapped loader and issues their copies, so the
    training thread only blocks when no batch is ready; with ``background=False`` that happens on the
    training thread when the loop asks for a batch. On any other device it is a pass-through: iteration
    yields the wrapped loader's batches unchanged.

    ``len()`` and every attribute the wrapper does not define (``dataset``, ``sampler``,
    ``batch_size``, ...) come from the wrapped loader.

    Raises:
        ValueError: ``depth`` is not an int >= 1.
        TypeError: ``background`` or ``pin_memory`` is not a bool.
    """

    #: Seconds ``iter()`` waits for the previous iterator's fetch thread to leave the wrapped loader.
    join_timeout: float = 60.0

    def __init__(
        self,
        loader: Iterable[Any],
        device: torch.device | str,
        depth: int = 2,
        pin_memory: bool = True,
        background: bool = True,
    ) -> None:
        _check_depth(depth)
        _check_flag("pin_memory", pin_memory)
        _check_flag("background", background)
        self.loader = loader
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.depth = depth
        self.pin_memory = pin_memory
        self.background = background
        self._warned_unpinned = False
        self._live: _FetchThread | None = None  # the latest iterator's fetch thread (not the iterator)
        if getattr(loader, "counts_consumed", False):
            # The loader's state counts the batches the loop finished (ResidentBatches under
            # DeviceResidentDataModule), not the ones fetched ahead, so it stays true through the wrapper and a
            # mid-epoch resume works. Instance attributes, not __getattr__: Lightning's `_Stateful` check is a
            # runtime protocol, which Python >= 3.12 matches with inspect.getattr_static.
            self.state_dict = loader.state_dict  # type: ignore[attr-defined]
            self.load_state_dict = loader.load_state_dict  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Any]:
        if self.device.type != "cuda":
            return iter(self.loader)
        previous = self._live
        self._close_live()
        _check_not_shared(self.loader, previous)
        prefetching = _CUDAPrefetchIterator(iter(self.loader), self)
        self._live = prefetching.fetch
        _claim(self.loader, prefetching.fetch)
        return prefetching

    def _close_live(self) -> None:
        # A loop that stopped early (limit_val_batches, max_steps) drops its iterator, whose fetch thread
        # may still be inside the wrapped loader's next(). A DataLoader with persistent workers hands the
        # same iterator to the next iter(), so that thread must be out of it first.
        live, self._live = self._live, None
        if live is not None and not live.close(self.join_timeout):
            warnings.warn(
                f"PrefetchLoader: the previous iterator's fetch thread is still inside the wrapped loader's "
                f"next() after {self.join_timeout:.0f} s; starting a new pass anyway. If the loader blocks "
                "for long, use GPUPrefetcher(background=False).",
                stacklevel=3,
            )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_live"] = None  # a running thread does not travel
        return state

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
        return (
            f"PrefetchLoader({self.loader!r}, device={self.device}, depth={self.depth}, "
            f"background={self.background})"
        )


# The running fetch thread of each DataLoader with persistent workers. Such a loader hands the same worker
# iterator to every pass, so two passes at once (a validation run inside a training epoch over the very
# DataLoader object the training uses) would consume it from two threads.
_PERSISTENT_FETCH: weakref.WeakKeyDictionary[Any, _FetchThread] = weakref.WeakKeyDictionary()


def _check_not_shared(loader: object, own: _FetchThread | None = None) -> None:
    """Refuse a persistent DataLoader whose fetch thread from another pass is running (``own``: this
    wrapper's previous pass, which ``_close_live`` already waited for and, if it is stuck, warned about)."""
    running = _PERSISTENT_FETCH.get(loader) if getattr(loader, "persistent_workers", False) else None
    if running is not None and running is not own and running.thread.is_alive():
        raise RuntimeError(
            "GPUPrefetcher: this DataLoader has persistent_workers=True and another pass over it is still "
            "running (its batches are being fetched on a background thread); with persistent workers every "
            "pass shares one worker iterator, so two passes at once would take each other's batches. This "
            "happens when the same DataLoader object serves training and validation: give each loop its own "
            "DataLoader (or use persistent_workers=False)."
        )


def _claim(loader: object, fetch: _FetchThread | None) -> None:
    if fetch is not None and getattr(loader, "persistent_workers", False):
        _PERSISTENT_FETCH[loader] = fetch


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__}).")


def _check_depth(depth: object) -> None:
    check_int(
        "depth", depth, 1, "the number of batches copied ahead",
        hint="depth=2 hides one copy behind each step with one spare.",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Lightning adapter
# ----------------------------------------------------------------------------------------------------


def _install_dataloader_wrapper(strategy: Strategy, wrap: Callable[[object], object]) -> Callable[[], None]:
    """Make ``strategy.process_dataloader`` also apply ``wrap``; return a function that undoes it.

    One of the two places this package hooks into Lightning beyond the callback API (the other is
    ``AsyncProgressBarMetrics`` chaining the module's ``log``); checked against Lightning 2.6.6.
    Lightning calls the public ``Strategy.process_dataloader`` on every train/val/test/predict loader
    after it has injected the ``DistributedSampler`` and before it creates the iterator
    (``trainer/connectors/data_connector.py::_process_dataloader``); it is where Lightning's own
    ``XLAStrategy`` wraps loaders in torch_xla's device-prefetching ``MpDeviceLoader``. Wrapping any
    earlier (the user's ``train_dataloader``) would hide the DataLoader from the sampler injection and
    break DDP; wrapping later (``on_train_epoch_start``) is too late, because ``FitLoop.setup_data``
    already created the first epoch's iterator. A callback cannot subclass the user's strategy, so the
    bound method of this strategy instance is chained, not replaced, and restored in ``teardown``.
    """

    def make(original: Callable[[object], object]) -> Callable[[object], object]:
        return lambda dataloader: wrap(original(dataloader))

    return chain_method(strategy, "process_dataloader", make)


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
        ``depth`` batches in flight takes device memory. With ``background=True`` one daemon thread per
        loader iterator takes the batches from the DataLoader and issues their copies; the training
        thread only waits when none is ready. Use ``background=False`` for an iterable that must be
        consumed on the thread that created it.

    Args:
        depth: batches copied ahead of the one being used (>= 1).
        pin_memory: pin batches that arrive in pageable memory before copying (warns once).
        background: fetch and copy on a background thread (default) instead of the training thread.

    Raises:
        ValueError: ``depth`` is not an int >= 1.
        TypeError: ``pin_memory`` or ``background`` is not a bool.
    """

    def __init__(self, depth: int = 2, pin_memory: bool = True, background: bool = True) -> None:
        _check_depth(depth)
        _check_flag("pin_memory", pin_memory)
        _check_flag("background", background)
        self.depth = depth
        self.pin_memory = pin_memory
        self.background = background
        self._uninstall: Callable[[], None] | None = None
        self._device: torch.device | None = None
        self._wrapped: weakref.WeakSet[PrefetchLoader] = weakref.WeakSet()
        self._warned_inactive = False

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks; the loaders of this process's run do not travel.
        state = self.__dict__.copy()
        state["_wrapped"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._wrapped = weakref.WeakSet()

    @property
    def active(self) -> bool:
        """Whether loaders of the current run are being wrapped (False on a non-CUDA accelerator)."""
        return self._uninstall is not None

    def _wrap(self, dataloader: object) -> object:
        if isinstance(dataloader, PrefetchLoader) or self._device is None:
            return dataloader
        wrapped = PrefetchLoader(dataloader, self._device, self.depth, self.pin_memory, self.background)  # type: ignore[arg-type]
        self._wrapped.add(wrapped)
        return wrapped

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        if device.type != "cuda":
            if trainer.is_global_zero and not self._warned_inactive:
                self._warned_inactive = True
                log.warning(
                    "GPUPrefetcher will not act in this run: the accelerator is %s, not CUDA; batches pass "
                    "through unchanged.",
                    device.type,
                )
            return
        if self._uninstall is None:
            self._device = device
            self._uninstall = _install_dataloader_wrapper(trainer.strategy, self._wrap)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._release()  # Lightning does not call teardown when fit raises

    def _release(self) -> None:
        for loader in list(self._wrapped):
            loader._close_live()  # a run that stopped mid-epoch leaves a fetch thread waiting
        self._wrapped.clear()
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None
            self._device = None
