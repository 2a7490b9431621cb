"""Lightning adapters: :class:`Compile` (regional or whole-model ``torch.compile``, a cross-process
artifact cache, ``auto`` by measurement), :class:`EagerCUDAGraphs` (CUDA graphs without Inductor) and
:class:`SDPABackends` (which attention kernels ``scaled_dot_product_attention`` may use)."""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_speedup._compat import batches_stepped
from lightning_speedup._validation import check_int
from lightning_speedup.compile.core import (
    MODES,
    SDPA_BACKENDS,
    ArtifactCache,
    CompileDecision,
    CompileRecord,
    already_compiled,
    cache_key,
    compile_model,
    compiled_calls,
    decide_compile,
    device_name,
    expected_costs,
    find_regions,
    median,
    sdpa_backend_enums,
    uncompile,
)

log = logging.getLogger(__name__)

_SCOPES = ("regional", "full")
_BACKENDS_OFF_CUDA = ("eager", "aot_eager")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_left(trainer: L.Trainer) -> float | None:
    """Seconds of training the Trainer's ``Timer`` (``Trainer(max_time=...)``) has left, or None without one."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, Timer):
            left = cb.time_remaining("train")
            if left is not None:
                return max(left, 0.0)
    return None


def _batches_left(
    trainer: L.Trainer,
    batch_idx: int,
    steps_per_batch: float | None = None,
    eager_batch_s: float | None = None,
) -> float:
    """Training batches the run has left after batch ``batch_idx`` of this epoch, whichever of ``max_steps``,
    ``max_epochs`` and ``max_time`` ends it first; ``inf`` when none bounds it.

    ``max_steps`` counts optimizer steps (``global_step``): under automatic optimization one per
    ``accumulate_grad_batches`` batches; under manual optimization ``steps_per_batch``, the optimizer steps
    per batch measured so far (each of several optimizers counts). ``max_time`` leaves the remaining time
    over ``eager_batch_s``, the measured eager batch."""
    accumulate = trainer.accumulate_grad_batches
    done = batch_idx + 1  # batches of this epoch run so far
    left = math.inf
    if trainer.max_steps != -1:
        steps_left = trainer.max_steps - trainer.global_step
        if steps_per_batch is None:
            # the current optimizer step has `done % accumulate` of its batches behind it
            left = steps_left * accumulate - done % accumulate
        elif steps_per_batch > 0:
            left = math.ceil(steps_left / steps_per_batch)
    per_epoch = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs != -1 and math.isfinite(per_epoch):
        left = min(left, per_epoch * (trainer.max_epochs - trainer.current_epoch) - done)
    time_left = _time_left(trainer)
    if time_left is not None and eager_batch_s is not None and eager_batch_s > 0:
        left = min(left, math.floor(time_left / eager_batch_s))
    return max(float(left), 0.0)


def _check_backend(backend: Any) -> None:
    """A ``ValueError`` for a backend name Dynamo does not know, with the closest names."""
    if not isinstance(backend, str):
        if callable(backend):
            return  # a custom backend (a compiler function)
        raise ValueError(f"Compile(backend={backend!r}) must be a backend name or a compiler function.")
    known = sorted(set(torch._dynamo.list_backends(exclude_tags=())) | {"inductor", *_BACKENDS_OFF_CUDA})
    if backend not in known:
        close = difflib.get_close_matches(backend, known, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Compile(backend={backend!r}) is not a torch.compile backend.{hint} Known backends: {known}."
        )


class Compile(Callback):
    """Compile the LightningModule's repeated blocks (``scope="regional"``) or its ``forward``
    (``scope="full"``) before training, or with ``auto=True`` only when the measured eager step time and
    the steps the run has left say compiling repays its cost.

    Args:
        scope: ``"regional"`` compiles each instance of the repeated block class in place (compiled once per
            class); ``"full"`` compiles the module's ``forward`` (``training_step`` must call ``self(...)``).
        auto: measure ``measure_steps`` eager steps, then compile only if
            ``remaining_batches * eager_batch * (1 - 1/speedup) > compile_seconds`` (training batches, so
            gradient accumulation counts each of its batches), with compile seconds and
            speed-up from the cache's record of an earlier run with the same key, else conservative priors
            (``lightning_speedup.compile.core.PRIOR_*``). The reason is logged at INFO in one line.
        regions: class names of the blocks to compile (``["Block"]``); default: found automatically. A name
            that is not a submodule class of the LightningModule fails at the start of ``fit``.
        mode: ``torch.compile`` mode (``None``, ``"default"``, ``"reduce-overhead"``, ``"max-autotune"``, ...).
        backend: ``"inductor"`` (CUDA only here; elsewhere the callback warns once and does nothing) or
            ``"eager"`` / ``"aot_eager"`` (anywhere; for tests and debugging); another Dynamo backend name
            (``torch._dynamo.list_backends(exclude_tags=())``) runs on CUDA only. An unknown name fails here,
            and so does a ``mode`` with a backend other than Inductor (which alone reads it).
        cache: keep compiled artifacts across processes (``torch.compiler.save_cache_artifacts``).
        cache_dir: where; default ``$LIGHTNING_SPEEDUP_COMPILE_CACHE`` or ``~/.cache/lightning_speedup/compile``.
        measure_steps: eager steps timed by ``auto`` (after one unmeasured warm-up step) and compiled steps
            timed afterwards for the cache's record; each step is one training batch.

    One callback may serve several fits (of a new Trainer or the same): each fit starts afresh, with its own
    key, decision and timings. The compilation lasts for the fit: at its end (``teardown``, or when it raises)
    the modules it compiled are uncompiled, so copies, ``torch.save(model)`` and later fits or evaluations
    use the plain model (a later fit compiles again, from torch's caches). A model already compiled by the
    user is trained as it is, with a warning, without measuring, deciding or a cache record.
    """

    def __init__(
        self,
        scope: str = "regional",
        auto: bool = False,
        regions: Sequence[str] | None = None,
        mode: str | None = None,
        backend: str = "inductor",
        cache: bool = True,
        cache_dir: str | None = None,
        measure_steps: int = 5,
    ) -> None:
        if scope not in _SCOPES:
            raise ValueError(
                f"Compile(scope={scope!r}): choose 'regional' (repeated blocks) or 'full' (forward)."
            )
        if mode not in MODES:
            raise ValueError(f"Compile(mode={mode!r}): torch.compile's modes are {list(MODES)}.")
        _check_backend(backend)
        if mode is not None and backend != "inductor":
            raise ValueError(
                f"Compile(mode={mode!r}, backend={backend!r}): mode is an Inductor setting, which backend "
                f"{backend!r} ignores; pass mode=None, or backend='inductor'."
            )
        if cache_dir is not None and not cache:
            rank_zero_warn(
                f"Compile(cache_dir={cache_dir!r}, cache=False): cache_dir does nothing without the cache; "
                "pass cache=True to use it, or leave cache_dir out."
            )
        check_int("measure_steps", measure_steps, 1, "steps timed per variant", prefix="Compile: ")
        if regions is not None and (isinstance(regions, str) or not all(isinstance(r, str) for r in regions)):
            raise ValueError(f"Compile(regions={regions!r}) must be a list of class names, e.g. ['Block'].")
        if regions is not None and scope != "regional":
            raise ValueError("Compile(regions=...) only applies to scope='regional'.")
        self.scope = scope
        self.auto = auto
        self.regions = list(regions) if regions is not None else None
        self.mode = mode
        self.backend = backend
        self.cache = ArtifactCache(cache_dir) if cache else None
        self.measure_steps = measure_steps
        self._active = False
        self._reset()

    def _reset(self) -> None:
        """The state of one fit: a callback reused for a second fit measures, decides and compiles anew."""
        self.decision: CompileDecision | None = None
        self.compiled = False
        self._key: str | None = None
        self._steps = 0
        self._t0 = 0.0
        self._eager: list[float] = []
        self._compiled_times: list[float] = []
        self._compile_step_s: float | None = None
        self._artifacts_hit = False
        # What this fit compiled (undone at teardown), and the counters at its first batch.
        self._modules: list[nn.Module] = []
        self._global_step0 = 0
        self._batches0 = 0
        self._calls0 = 0

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._reset()
        device = trainer.strategy.root_device
        self._active = device.type == "cuda" or self.backend in _BACKENDS_OFF_CUDA
        if not self._active and self.backend == "inductor":
            rank_zero_warn(
                f"Compile: Inductor on {device.type} is not where compiling pays for itself here; training "
                "uncompiled. (backend='eager' or 'aot_eager' runs anywhere, for tests.)"
            )
        elif not self._active:
            rank_zero_warn(
                f"Compile(backend={self.backend!r}) runs on CUDA only here; on {device.type} training "
                "uncompiled. (backend='eager' or 'aot_eager' runs anywhere, for tests.)"
            )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Named regions are checked before any batch runs (here rather than in setup: a LightningModule may
        # build its blocks in configure_model, which runs after the callbacks' setup).
        if self.regions is not None:
            find_regions(pl_module, self.regions)  # raises ValueError listing the classes present

    def _compile(self, pl_module: L.LightningModule) -> None:
        self._modules = compile_model(
            pl_module, self.scope, self.regions, mode=self.mode, backend=self.backend
        )
        self.compiled = True

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._active:
            return
        if self._key is None:
            compiled = already_compiled(pl_module)
            if compiled:
                # Its "eager" steps would be compiled ones: measuring, deciding or recording would be wrong.
                self._active = False
                rank_zero_warn(
                    f"Compile: {type(pl_module).__name__} is already compiled ({', '.join(compiled[:5])}), "
                    "by torch.compile or nn.Module.compile outside this callback; training it as it is, "
                    "without measuring, deciding or writing a cache record. Remove that compile call to "
                    "let Compile do it, or remove the callback."
                )
                return
            self._global_step0 = trainer.global_step
            self._batches0 = batches_stepped(trainer)
            # The key needs the input shapes, first known here; compilation is lazy, so artifacts loaded now
            # are found by the first compiled call.
            self._key = cache_key(
                pl_module,
                batch,
                self.mode,
                self.scope,
                device_name(pl_module.device),
                backend=self.backend,
                regions=self.regions,
                precision=str(trainer.precision),
            )
            hit = self.cache is not None and self.cache.load_artifacts(self._key)
            self._artifacts_hit = bool(hit)
            if not self.auto:
                self._compile(pl_module)
                rank_zero_info(
                    f"Compile: compiled ({self.scope}, mode={self.mode}); artifact cache {'hit' if hit else 'miss'}."
                )
        # Calls of the compiled modules so far (validation may have run some), to see this step's.
        self._calls0 = compiled_calls(self._modules)
        _sync(pl_module.device)
        self._t0 = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or self._done_measuring():
            return
        _sync(pl_module.device)
        elapsed = time.perf_counter() - self._t0
        self._steps += 1
        if self.compiled:
            if self._compile_step_s is None:
                if compiled_calls(self._modules) == self._calls0:
                    self._warn_nothing_compiled(pl_module)
                    return
                self._compile_step_s = elapsed
                self._save_artifacts(trainer)
            else:
                self._compiled_times.append(elapsed)
                if len(self._compiled_times) == self.measure_steps:
                    self._write_record(trainer)
            return
        if self._steps == 1:
            return  # the first eager step pays one-off costs (allocator, cuDNN autotuning)
        self._eager.append(elapsed)
        if self.auto and len(self._eager) == self.measure_steps and self.decision is None:
            self._decide(trainer, pl_module, batch_idx)

    def _warn_nothing_compiled(self, pl_module: L.LightningModule) -> None:
        """The first compiled step never called a compiled module: stop measuring, record nothing."""
        self._active = False
        if self.scope == "full":
            how = (
                f"training_step never calls the LightningModule itself: scope='full' compiles "
                f"{type(pl_module).__name__}.__call__, which runs only when training_step calls self(...), not "
                "a submodule (self.net(...)). Call self(...) in training_step, or use scope='regional'"
            )
        else:
            names = sorted({type(m).__name__ for m in self._modules})
            how = (
                f"the compiled blocks ({names}) did not run in the training step. Name the blocks the "
                "training step runs with regions=[...], or use scope='full'"
            )
        rank_zero_warn(f"Compile({self.scope}): nothing was compiled, {how}.")

    def _done_measuring(self) -> bool:
        if self.auto and self.decision is not None and not self.decision.compile:
            return True
        return len(self._compiled_times) >= self.measure_steps

    def _decide(self, trainer: L.Trainer, pl_module: L.LightningModule, batch_idx: int) -> None:
        assert self._key is not None
        # Steps are timed per training batch, so the steps left are counted in batches too (with gradient
        # accumulation an optimizer step is several of them).
        steps_per_batch = None
        if not pl_module.automatic_optimization:
            # Each optimizer's step counts in global_step; batches_stepped counts this batch after this hook.
            batches = batches_stepped(trainer) - self._batches0 + 1
            steps_per_batch = (trainer.global_step - self._global_step0) / batches
        remaining = _batches_left(trainer, batch_idx, steps_per_batch, median(self._eager))
        record = self.cache.read_record(self._key) if self.cache is not None else None
        compile_s, speedup, source = expected_costs(self.scope, record, self._artifacts_hit)
        self.decision = decide_compile(
            median(self._eager), remaining, compile_s, speedup, source, unit="batches"
        )
        verb = "compiling" if self.decision.compile else "not compiling"
        rank_zero_info(f"Compile(auto): {verb} ({self.scope}): {self.decision.reason}.")
        if self.decision.compile:
            self._compile(pl_module)

    def _save_artifacts(self, trainer: L.Trainer) -> None:
        # One writer per host (every rank compiled the same code): the others would only rewrite the file.
        if self.cache is not None and self._key is not None and trainer.local_rank == 0:
            self.cache.save_artifacts(self._key)

    def _write_record(self, trainer: L.Trainer) -> None:
        if self.cache is None or self._key is None or not self._eager or self._compile_step_s is None:
            return
        if trainer.local_rank != 0:
            return
        compiled = median(self._compiled_times)
        eager = median(self._eager)
        record = CompileRecord(compile_s=max(self._compile_step_s - compiled, 0.0), speedup=eager / compiled)
        self.cache.write_record(self._key, record)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation compiled its own (eval, no-grad) graphs after the first save: store them too.
        if self._active and self.compiled:
            self._save_artifacts(trainer)

    def _uncompile(self) -> None:
        uncompile(self._modules)
        self._modules = []

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Undo the in-place compilation: the next fit starts from an uncompiled model (and times eager steps
        # as eager), and what the user does with the trained model (copy, quantize, torch.save, evaluate) runs
        # the plain module. Compiling it again in a later fit reuses torch's caches.
        self._uncompile()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._uncompile()


class EagerCUDAGraphs(Callback):
    """CUDA graphs without Inductor: ``torch.cuda.make_graphed_callables`` on the training forward and
    backward of ``pl_module.<module_attr>``, for host-bound small-model steps where launch overhead dominates.

    The graph replays fixed shapes: the training DataLoader must drop its last incomplete batch
    (``drop_last=True``; checked at train start). Pair it with a fused optimizer (``fused=True``), which
    updates every parameter in one kernel. Evaluation runs the module uncompiled. The graphs last for the fit:
    at its end (or when it raises) the module's own ``forward`` is back, so copies of the trained model and
    later fits run plain modules (a later fit captures again). On CPU it warns once and does nothing. With
    cuDNN's benchmark mode on, the capture's warm-up iterations also autotune every convolution, which can
    cost a short run more than the graphs save (docs/methods/compile.md).
    """

    def __init__(self, module_attr: str = "net", num_warmup_iters: int = 3) -> None:
        if not module_attr.isidentifier():
            raise ValueError(
                f"EagerCUDAGraphs(module_attr={module_attr!r}) must name an attribute, e.g. 'net'."
            )
        check_int(
            "num_warmup_iters",
            num_warmup_iters,
            1,
            "eager steps before the capture",
            prefix="EagerCUDAGraphs: ",
        )
        self.module_attr = module_attr
        self.num_warmup_iters = num_warmup_iters
        # Whether the last fit captured the graphs, and the seconds the capture took (warm-up iterations included).
        self.graphed = False
        self.capture_s: float | None = None
        self._hook: Any = None
        # The module whose forward is the graphed one, during a fit.
        self._graphed_module: nn.Module | None = None

    def _module(self, pl_module: L.LightningModule) -> nn.Module:
        module = getattr(pl_module, self.module_attr, None)
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"EagerCUDAGraphs(module_attr={self.module_attr!r}): {type(pl_module).__name__} has no submodule "
                f"of that name; pass the attribute that holds the network."
            )
        return module

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.strategy.root_device.type != "cuda":
            rank_zero_warn("EagerCUDAGraphs: CUDA graphs need a CUDA device; training without them.")
            return
        module = self._module(pl_module)
        loader = trainer.train_dataloader
        if getattr(loader, "drop_last", True) is False:
            raise ValueError(
                "EagerCUDAGraphs replays fixed input shapes, but the training DataLoader keeps its last "
                "incomplete batch: build it with drop_last=True."
            )
        if self._hook is None and self._graphed_module is None:
            # Each fit captures its own (a new model, or the same again).
            self.graphed, self.capture_s = False, None
            self._hook = module.register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        # The first training call runs eagerly; later calls replay the graphs captured here.
        if not module.training or not torch.is_grad_enabled() or self._graphed_module is not None:
            return
        # make_graphed_callables refuses a module with hooks: this one goes first (safe here, as the module
        # call iterates over a copy of its hooks).
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        sample = tuple(a.detach().clone() if isinstance(a, Tensor) else a for a in args)
        # It also refuses autocast's weight cache; capture under the same autocast without it.
        autocast = torch.is_autocast_enabled("cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(
            "cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=autocast, cache_enabled=False
        ):
            torch.cuda.make_graphed_callables(module, sample, num_warmup_iters=self.num_warmup_iters)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - t0
        self.graphed = True
        self._graphed_module = module

    def _ungraph(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        # make_graphed_callables sets the module's forward as an instance attribute that replays graphs bound to
        # this module's tensors; a deep copy of the model (quantize, an EMA copy) would call it and so run the
        # original's weights. Removing it restores the class's forward: after the fit the module is plain.
        if self._graphed_module is not None:
            self._graphed_module.__dict__.pop("forward", None)
            self._graphed_module = None

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._ungraph()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._ungraph()


class SDPABackends(Callback):
    """Let ``torch.nn.functional.scaled_dot_product_attention`` use only the named kernels while the Trainer
    runs; the default leaves out cuDNN's.

    Recent PyTorch releases try cuDNN's attention first on Hopper and Blackwell GPUs (sm90, sm100) with a cuDNN
    newer than 9.15 (``check_prefer_cudnn_attention`` in PyTorch's ``sdp_utils.cpp``). cuDNN builds an execution plan for every new problem (shapes, dtype, causal, dropout, training or
    evaluation) on the first call in each process, which every short run on a fresh process pays; the flash
    kernel is compiled into PyTorch and needs no such step. Whether leaving cuDNN out shortens a run to target
    is a measurement (docs/methods/compile.md); in steady state cuDNN's kernel can be the faster one.

    Args:
        backends: names from ``("cudnn", "flash", "efficient", "math")``. PyTorch tries the allowed ones in
            its own order and uses the first that supports the call; when none does, attention raises
            "No available kernel". ``flash`` and ``cudnn`` take only fp16/bf16 inputs (autocast provides
            them under ``precision="bf16-mixed"``).

    The switches are torch.backends.cuda's, process-wide (every module, and autograd's backward threads).
    They are set in ``setup`` and the previous ones restored in ``teardown``, or when the run raises.
    """

    def __init__(self, backends: Sequence[str] = ("flash", "efficient", "math")) -> None:
        if not isinstance(backends, str):
            backends = tuple(backends)  # read once: a generator would be empty the second time
        self._enums = sdpa_backend_enums(backends)
        self.backends = tuple(backends)
        self._stack: contextlib.ExitStack | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device = trainer.strategy.root_device
        chosen = set(self.backends)
        if device.type != "cuda":
            # Off CUDA, attention runs the flash (CPU) or the math kernel, whatever the other switches say.
            if not chosen & {"flash", "math"}:
                raise ValueError(
                    f"SDPABackends(backends={list(self.backends)}): on {device.type}, scaled_dot_product_attention "
                    "has only the 'flash' and 'math' kernels; allow one of them."
                )
            if {"flash", "math"} <= chosen:
                rank_zero_warn(
                    f"SDPABackends(backends={list(self.backends)}) changes nothing on {device.type}: attention "
                    "there runs 'flash' or 'math', both allowed. It chooses among CUDA's kernels."
                )
        elif len(chosen) == len(SDPA_BACKENDS):
            rank_zero_warn(
                "SDPABackends allows every backend, which changes nothing; name fewer or leave it out."
            )
        elif not chosen & {"efficient", "math"} and str(trainer.precision).startswith(("32", "64")):
            rank_zero_warn(
                f"SDPABackends(backends={list(self.backends)}): these kernels take only fp16/bf16 inputs, but the "
                f"Trainer runs precision={trainer.precision!r}; attention in fp32 will raise 'No available "
                "kernel'. Allow 'efficient' or 'math', or train with precision='bf16-mixed'."
            )
        if self._stack is None:
            from torch.nn.attention import sdpa_kernel

            self._stack = contextlib.ExitStack()
            self._stack.enter_context(sdpa_kernel(self._enums))
            log.info("SDPABackends: scaled_dot_product_attention may use %s.", ", ".join(self.backends))

    def _restore(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()


__all__ = ["Compile", "EagerCUDAGraphs", "SDPABackends"]
