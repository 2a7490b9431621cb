"""Shared Lightning machinery of the parameter-averaging strategies (local SGD, DiLoCo, gossip).

DDP all-reduces every gradient every step. The averaging strategies instead let each process take
optimizer steps on its own and communicate *parameters* on their own schedule, so the module is
never wrapped in ``DistributedDataParallel`` (no reducer, no per-step all-reduce) except for the
intra-node DDP of ``hierarchical`` mode. This base class holds everything they share:

- launch and process groups exactly like :class:`~lightning.pytorch.strategies.DDPStrategy`
  (``devices=N``, ``num_nodes``, ``start_method``), plus ``hierarchical`` blocks;
- flat bucketed copies of parameters and floating-point buffers
  (:class:`~lightning_speedup.distributed.flat.FlatBuckets`), broadcast from rank 0 at the start;
- consistency where users look: validation, ``trainer.save_checkpoint`` (``state_dict``) and the
  model after ``fit`` are the exact average over processes, while training continues from each
  process's own parameters;
- exact resume: every process's own parameters and optimizer state and the algorithm's state go into
  the checkpoint under ``"lightning_speedup.distributed"`` (the schedule's step is the trainer's
  global step, which Lightning's own checkpoint restores);
- metrics through ``LightningModule.log``: ``dist/bytes_sent`` and ``dist/comm_time_s`` per step,
  ``dist/consensus_distance`` every ``consensus_every`` steps.

Subclasses implement :meth:`_after_step` (what happens after each local optimizer step) and
:meth:`_final_sync`, and may extend the shared and per-rank checkpoint state.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from collections.abc import Callable
from contextlib import nullcontext
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_speedup._compat import current_hook, ddp_kwargs, ddp_layer_sync, has_trainer
from lightning_speedup._process_group import CleanExitDDPStrategy
from lightning_speedup._validation import check_bool, check_float, check_int
from lightning_speedup.distributed.collectives import (
    CommGroup,
    CommTimer,
    Traffic,
    average_,
    block_mean_,
    broadcast_,
    consensus_distance,
)
from lightning_speedup.distributed.flat import FlatBuckets
from lightning_speedup.metrics import log_number

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "lightning_speedup.distributed"
_LOGGABLE_HOOKS = ("optimizer_step", "training_step")


def _to_cpu(obj: Any) -> Any:
    return apply_to_collection(obj, Tensor, lambda t: t.detach().cpu().clone())


def _log_metric(module: LightningModule | None, name: str, value: float) -> None:
    """Log ``value`` through Lightning when the caller runs inside a hook that may log.

    The strategy's ``optimizer_step`` runs inside ``LightningModule.optimizer_step`` (automatic
    optimization) or ``training_step`` (manual optimization), both of which may log per step.
    """
    if module is None or not has_trainer(module) or current_hook(module) not in _LOGGABLE_HOOKS:
        return
    log_number(module, name, value, on_step=True, on_epoch=False, batch_size=1)


def put_rank_states(checkpoint: dict[str, Any], strategy: DDPStrategy, mine: Any, **shared: Any) -> None:
    """Gather every process's ``mine`` on rank 0 and store it there under :data:`CHECKPOINT_KEY`, with the
    writer's class name, the world size and ``shared`` (collective: every process calls it)."""
    n = strategy.world_size
    gathered: list[Any] | None = [None] * n if strategy.global_rank == 0 else None
    if n > 1:
        dist.gather_object(mine, gathered, dst=0)
    else:
        gathered = [mine]
    if strategy.global_rank == 0:
        checkpoint[CHECKPOINT_KEY] = {
            "version": 1,
            "strategy": type(strategy).__name__,
            "world_size": n,
            **shared,
            "ranks": gathered,
        }


def _ddp_keyword_defaults() -> dict[str, Any]:
    """Keyword arguments ``DDPStrategy`` accepts (its own, then those it forwards to ``DistributedDataParallel``)."""
    defaults: dict[str, Any] = {}
    for fn in (DistributedDataParallel.__init__, DDPStrategy.__init__):
        for name, param in inspect.signature(fn).parameters.items():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                defaults[name] = param.default
    for name in ("self", "module"):
        defaults.pop(name, None)
    return defaults


def _own_arguments(cls: type) -> list[str]:
    """Keyword arguments of ``cls.__init__`` and of its bases' up to ``DDPStrategy`` (a strategy's own settings)."""
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is DDPStrategy or not issubclass(klass, DDPStrategy):
            break
        for name, param in inspect.signature(klass.__init__).parameters.items():
            if name != "self" and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                names.append(name)
    return names


def check_ddp_kwargs(owner: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return ``kwargs`` without the DDP arguments left at their defaults; raise for names DDP does not take.

    LightningCLI (jsonargparse) passes every DDP argument it finds in the signatures, at its default; those
    mean "not set" and are dropped. DDPStrategy forwards unknown keywords to ``DistributedDataParallel``,
    which would reject them only inside a worker at ``fit``; checking here makes a typo fail at construction.
    The closest name is looked up among the arguments of ``owner`` (the strategy class) first (a
    ``compression=`` given to a strategy that takes ``compress=``), then among DDP's.
    """
    defaults = _ddp_keyword_defaults()
    own = _own_arguments(owner)
    unknown = sorted(k for k in kwargs if k not in defaults)
    if unknown:
        hints = [
            f"{k!r} (did you mean {close[0]!r}?)"
            if (
                close := difflib.get_close_matches(k, own, n=1)
                or difflib.get_close_matches(k, list(defaults), n=1)
            )
            else repr(k)
            for k in unknown
        ]
        settings = [n for n in own if n not in defaults]
        takes = f" ({', '.join(settings)})" if settings else ""
        raise ValueError(
            f"{owner.__name__} got unknown keyword arguments {', '.join(hints)}; it takes its own arguments{takes} "
            "and those of DDPStrategy / DistributedDataParallel."
        )
    return {k: v for k, v in kwargs.items() if not _is_default(v, defaults[k])}


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (
        type(value) is type(default) and not isinstance(value, torch.Tensor) and value == default
    )


def run_total_steps(trainer: Trainer) -> int | None:
    """The run's total optimizer steps when the Trainer knows them (finite), else ``None``."""
    total = trainer.estimated_stepping_batches
    return int(total) if total != float("inf") and total >= 0 else None


def check_hierarchical(hierarchical: bool | int) -> None:
    """Raise if ``hierarchical`` is neither a bool nor a block size >= 1."""
    if isinstance(hierarchical, bool):
        return
    if not isinstance(hierarchical, int) or hierarchical < 1:
        raise ValueError(
            f"hierarchical must be True/False or a block size >= 1 (processes per block), got {hierarchical!r}."
        )


class ParameterAveragingStrategy(CleanExitDDPStrategy):
    """Base of the strategies that average parameters instead of all-reducing gradients.

    Args:
        hierarchical: ``False``: the algorithm runs over all processes. ``True``: processes of a node
            all-reduce gradients every step (DDP inside the node) and the algorithm runs across nodes.
            An ``int`` ``g``: the same with blocks of ``g`` consecutive ranks instead of nodes.
        bucket_cap_mb: size of the flat buckets; one collective per bucket.
        consensus_every: measure and log the consensus distance every this many optimizer steps
            (one extra all-reduce of the model each time); 0 turns it off.
        log_metrics: log ``dist/*`` metrics through ``LightningModule.log``.
        start_method, process_group_backend, timeout, accelerator, ...: as in ``DDPStrategy``.
        **ddp_kwargs: passed to the intra-node ``DistributedDataParallel`` of hierarchical mode
            (rejected without ``hierarchical``, where there is no DDP wrapper).
    """

    def __init__(
        self,
        hierarchical: bool | int = False,
        bucket_cap_mb: float = 64.0,
        consensus_every: int = 100,
        log_metrics: bool = True,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **ddp_kwargs: Any,
    ) -> None:
        check_hierarchical(hierarchical)
        bucket_cap_mb = check_float("bucket_cap_mb", bucket_cap_mb, 0)
        check_bool("log_metrics", log_metrics)
        check_int("consensus_every", consensus_every, 0, "0 = off")
        flat = hierarchical is False or (not isinstance(hierarchical, bool) and hierarchical == 1)
        ddp_kwargs = check_ddp_kwargs(type(self), ddp_kwargs)
        if ddp_kwargs and flat:
            raise ValueError(
                f"{type(self).__name__} does not wrap the model in DistributedDataParallel, so DDP arguments "
                f"{sorted(ddp_kwargs)} have no effect; they apply only to the intra-node DDP of hierarchical=True."
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **ddp_kwargs,
        )
        self.hierarchical = hierarchical
        self.bucket_cap_mb = bucket_cap_mb
        self.consensus_every = consensus_every
        self.log_metrics = log_metrics
        self._comm: CommGroup | None = None
        self._params: FlatBuckets | None = None
        self._buffers: FlatBuckets | None = None
        self._timer: CommTimer | None = None
        # rank 0's comm_stats, in a launching process that did not train (start_method spawn or fork)
        self._worker_comm_stats: dict[str, float] | None = None
        self._step = 0
        self._fit_start_step = 0
        self._in_consensus = True
        self._stash: tuple[list[Tensor], list[Tensor]] | None = None
        self._resume: dict[str, Any] | None = None
        self._bytes_total = 0
        self._comm_seconds_total = 0.0
        self._last_consensus: float | None = None

    # ------------------------------------------------------------------ what subclasses implement
    def _validate(self, algorithm_size: int) -> None:
        """Raise for settings that do not fit ``algorithm_size`` members (called in ``setup``)."""

    def _on_setup(self) -> None:
        """Build algorithm state once the flat buffers exist and every process holds rank 0's model."""

    def _after_step(self) -> Traffic:
        """Run after each local optimizer step (``self._step`` already counts it); return the traffic."""
        raise NotImplementedError

    def _inactive_reason(self, total_steps: int, start_step: int) -> str | None:
        """Why the technique will not act in a run of ``total_steps`` resumed at ``start_step``, or ``None``."""
        return None

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        trainer = self.lightning_module.trainer
        # The schedule (sync_every, warmup_steps, gossip rounds) counts the trainer's optimizer steps. The loops are
        # restored by now, so this also covers a second trainer.fit on the same Trainer and a checkpoint of
        # another strategy (DDP) or without this strategy's state: it continues there rather than from 0.
        self._step = self._fit_start_step = trainer.global_step
        total = run_total_steps(trainer)
        reason = None if total is None else self._inactive_reason(total, trainer.global_step)
        if reason:
            rank_zero_warn(f"{type(self).__name__} will not act in this run: {reason}")

    def _final_sync(self) -> Traffic:
        """Bring every process to the exact final model at the end of ``fit``."""
        return self._average_all()

    def _finish_comm(self) -> None:
        """Complete in-flight communication before any other collective (gossip overlap)."""

    def _shared_state(self) -> dict[str, Any]:
        """Algorithm state identical on every process (saved once)."""
        return {}

    def _load_shared_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ Lightning setup
    @property
    def algorithm_size(self) -> int:
        """Members the algorithm runs over: processes, or blocks in hierarchical mode."""
        return self._comm.size if self._comm is not None else self.world_size // self._block_size()

    def _block_size(self) -> int:
        if self.hierarchical is False:
            return 1
        if self.hierarchical is True:
            return max(1, self.num_processes)
        return int(self.hierarchical)

    @override
    def setup(self, trainer: Trainer) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            super().setup(trainer)
            return
        name = type(self).__name__
        block = self._block_size()
        if self.world_size % block != 0:
            raise ValueError(
                f"{name}(hierarchical={self.hierarchical!r}): the block size {block} must divide the number of "
                f"processes {self.world_size}; pass a divisor of {self.world_size} or hierarchical=True."
            )
        if ddp_layer_sync(self) is not None:
            raise ValueError(
                f"{name} does not support Trainer(sync_batchnorm=True): it would all-reduce batch statistics every "
                "step, which is the communication this strategy avoids. BatchNorm buffers are averaged at each sync."
            )
        if self.world_size == 1:
            rank_zero_warn(
                f"{name} is running on a single process (world size 1): there is nothing to average, so this is "
                "plain single-device training. Use devices>1 or num_nodes>1 to train data-parallel."
            )
        elif block == self.world_size:
            rank_zero_warn(
                f"{name}(hierarchical={self.hierarchical!r}) puts all {self.world_size} processes in one block: "
                "gradients are all-reduced every step (DDP) and there is nothing left to average across blocks."
            )
        self._validate(self.world_size // block)
        self._comm = CommGroup.hierarchical(block) if block > 1 else CommGroup.world()

        super().setup(trainer)  # moves the model, wraps it (hierarchical only), creates the optimizers

        if len(self.optimizers) != 1:
            raise ValueError(
                f"{name} supports exactly one optimizer (it counts that optimizer's steps to decide when to "
                f"communicate); configure_optimizers returned {len(self.optimizers)}. Combine the parameter groups "
                "into one optimizer, or use DDPStrategy / CompressedDDPStrategy for several optimizers."
            )
        module = self.lightning_module
        assert module is not None
        self._params = FlatBuckets(
            list(module.parameters()), self.bucket_cap_mb, pad_to=self._comm.num_shards
        )
        self._buffers = FlatBuckets(
            [b for b in module.buffers() if b.is_floating_point()],
            self.bucket_cap_mb,
            pad_to=self._comm.num_shards,
        )
        self._timer = CommTimer(self.root_device)
        # comm_stats are the totals of one fit: a second fit on the same Trainer starts them over
        self._bytes_total, self._comm_seconds_total, self._last_consensus = 0, 0.0, None
        self._worker_comm_stats = None
        self._in_consensus = True
        self._broadcast_from_rank_zero(module)
        self._on_setup()

    @torch.no_grad()
    def _broadcast_from_rank_zero(self, module: Module) -> None:
        # DDP does this in its constructor; without the wrapper, every process must start from rank 0's model.
        assert self._params is not None and self._buffers is not None
        for flats in (self._params, self._buffers):
            flats.pack()
            broadcast_(flats.buckets)
            flats.unpack()
        if dist.is_initialized() and dist.get_world_size() > 1:
            for b in module.buffers():
                if not b.is_floating_point():
                    dist.broadcast(b, src=0)

    @override
    def _setup_model(self, model: Module) -> Module:
        if self._comm is None or not self._comm.is_hierarchical:
            return model  # no DDP wrapper: no reducer, no per-step gradient all-reduce
        device_ids = self.determine_ddp_device_ids()
        ctx = torch.cuda.stream(torch.cuda.Stream()) if device_ids is not None else nullcontext()
        # Every process keeps its own buffers (BatchNorm statistics of its own batches), as in flat mode; they are
        # averaged over all processes wherever the parameters are (_average_buffers). DDP's default would instead
        # copy the block's first process's buffers into the others before every forward. One block is plain DDP.
        kwargs = {"broadcast_buffers": self._comm.size == 1, **ddp_kwargs(self)}
        with ctx:
            return DistributedDataParallel(
                module=model, device_ids=device_ids, process_group=self._comm.shard_group, **kwargs
            )

    @override
    def _register_ddp_hooks(self) -> None:
        pass  # the intra-node DDP of hierarchical mode uses its default all-reduce

    # ------------------------------------------------------------------ training
    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: LightningModule | Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self._params is None or self._timer is None:
            return output
        self._step += 1
        if self.algorithm_size > 1:
            self._in_consensus = False
        if self.consensus_every and self._step % self.consensus_every == 0:
            self._last_consensus = self.consensus_distance()
            if self.log_metrics:
                _log_metric(self.lightning_module, "dist/consensus_distance", self._last_consensus)
        with self._timer.measure():
            traffic = self._after_step()
        traffic += self._intra_ddp_traffic()
        self._bytes_total += traffic.total
        seconds = self._timer.pop_seconds()  # on CUDA: the sections finished by now (no host sync)
        self._comm_seconds_total += seconds
        if self.log_metrics:
            _log_metric(self.lightning_module, "dist/bytes_sent", float(traffic.total))
            _log_metric(self.lightning_module, "dist/comm_time_s", seconds)
        return output

    def _intra_ddp_traffic(self) -> Traffic:
        if self._comm is None or not self._comm.is_hierarchical or self._params is None:
            return Traffic()
        g = self._comm.num_shards
        return Traffic(intra=2 * (g - 1) * self._params.nbytes // g)

    @torch.no_grad()
    def _average_all(self, compress: str = "none", reference: list[Tensor] | None = None) -> Traffic:
        """Exact global average of parameters and floating buffers, written back to the module."""
        assert self._params is not None and self._buffers is not None and self._comm is not None
        self._finish_comm()
        self._params.pack()
        self._buffers.pack()
        traffic = average_(self._params.buckets, self._comm, compress, reference)
        traffic += self._average_buffers()
        self._params.unpack()
        self._buffers.unpack()
        self._in_consensus = True
        return traffic

    def _average_buffers(self) -> Traffic:
        """Average the packed floating buffers over all processes: over the block first (hierarchical mode, where
        each process updated its own), then across blocks."""
        assert self._buffers is not None and self._comm is not None
        if self._comm.size == 1:  # one block is plain DDP: its buffers are its first process's (broadcast)
            return Traffic()
        return block_mean_(self._buffers.buckets, self._comm) + average_(self._buffers.buckets, self._comm)

    def consensus_distance(self) -> float:
        """``sqrt(mean_i ||x_i - x_mean||^2)`` of the parameters over the algorithm group (collective)."""
        if self._params is None or self._comm is None:
            return 0.0
        if self._in_consensus:
            return 0.0
        self._finish_comm()
        self._params.pack()
        return consensus_distance(self._params.buckets, self._comm)

    @property
    def comm_stats(self) -> dict[str, float]:
        """Totals of the current (or last) fit: bytes sent, seconds communicating, optimizer steps, last consensus
        distance (NaN if none was measured). Each ``fit`` starts them from zero, a resumed one too. After a
        ``start_method="spawn"`` (or ``"fork"``) fit, the launching process holds rank 0's."""
        if self._worker_comm_stats is not None:
            return dict(self._worker_comm_stats)
        if self._timer is not None:
            self._comm_seconds_total += self._timer.pop_seconds(wait=True)
        return {
            "bytes_sent": float(self._bytes_total),
            "comm_time_s": self._comm_seconds_total,
            "steps": float(self._step - self._fit_start_step),
            "consensus_distance": float("nan") if self._last_consensus is None else self._last_consensus,
        }

    @override
    def on_train_end(self) -> None:
        super().on_train_end()
        if self._params is not None and not self._in_consensus:
            assert self._timer is not None
            with self._timer.measure():
                self._bytes_total += self._final_sync().total
        self._in_consensus = True

    # ------------------------------------------------------------------ consistency: validation and state_dict
    @torch.no_grad()
    def _swap_in_average(self) -> None:
        assert self._params is not None and self._buffers is not None and self._comm is not None
        self._finish_comm()
        self._params.pack()
        self._buffers.pack()
        self._stash = (self._params.clone_buckets(), self._buffers.clone_buckets())
        average_(self._params.buckets, self._comm)
        self._average_buffers()
        self._params.unpack()
        self._buffers.unpack()

    @torch.no_grad()
    def _swap_out(self) -> None:
        if self._stash is None:
            return
        assert self._params is not None and self._buffers is not None
        params, buffers = self._stash
        self._params.load_buckets(params)
        self._buffers.load_buckets(buffers)
        self._params.unpack()
        self._buffers.unpack()
        self._stash = None

    def _needs_average(self) -> bool:
        return self._params is not None and not self._in_consensus and self._stash is None

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        if self._needs_average():
            self._swap_in_average()

    @override
    def on_validation_end(self) -> None:
        super().on_validation_end()
        self._swap_out()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._needs_average():
            return super().lightning_module_state_dict()
        self._swap_in_average()
        try:
            # Copies of the averaged tensors (they are swapped out below); extra state (a QAT layer's settings, a
            # dict) is the module's own, unchanged by averaging.
            return {
                k: v.detach().clone() if isinstance(v, Tensor) else v
                for k, v in super().lightning_module_state_dict().items()
            }
        finally:
            self._swap_out()

    # ------------------------------------------------------------------ checkpoint and exact resume
    def _rank_state(self) -> dict[str, Any]:
        """This process's own state: its parameters (when they differ from the average) and optimizer state."""
        assert self._params is not None and self._buffers is not None
        local_params: list[Tensor] | None = None
        local_buffers: list[Tensor] | None = None
        if not self._in_consensus:
            if self._stash is not None:  # saving during validation (ModelCheckpoint): own copy is stashed
                local_params, local_buffers = _to_cpu(self._stash[0]), _to_cpu(self._stash[1])
            else:
                self._params.pack()
                self._buffers.pack()
                local_params = _to_cpu(self._params.buckets)
                local_buffers = _to_cpu(self._buffers.buckets)
        return {
            "params": local_params,
            "buffers": local_buffers,
            "optimizer_states": [_to_cpu(self.optimizer_state(opt)) for opt in self.optimizers],
        }

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if self._params is not None and "optimizer_states" in checkpoint:
            self._finish_comm()
            shared = None
            if self.global_rank == 0:
                # No step counter: on_train_start takes the schedule's step from the restored global step. (Older
                # checkpoints carry a "step" here; nothing reads it.)
                shared = {"in_consensus": self._in_consensus, **_to_cpu(self._shared_state())}
            put_rank_states(checkpoint, self, self._rank_state(), shared=shared)
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)  # the averaged model: right for evaluation
        self._resume = checkpoint.get(CHECKPOINT_KEY)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        resume, self._resume = self._resume, None
        if resume is None or self._params is None or self._buffers is None:
            super().load_optimizer_state_dict(checkpoint)
            return
        name = type(self).__name__
        if resume["strategy"] != name:
            rank_zero_warn(
                f"The checkpoint was written by {resume['strategy']}, not {name}: resuming from its averaged model "
                "and rank 0's optimizer state; the algorithm state starts fresh."
            )
            super().load_optimizer_state_dict(checkpoint)
            return
        if resume["world_size"] != self.world_size:
            rank_zero_warn(
                f"The checkpoint was written by {resume['world_size']} processes, this run has {self.world_size}: "
                "every process resumes from the averaged model and rank 0's optimizer state (not an exact resume)."
            )
            super().load_optimizer_state_dict(checkpoint)
            self._load_shared_state(resume["shared"])
            self._in_consensus = True
            return
        mine = resume["ranks"][self.global_rank]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": mine["optimizer_states"]})
        self._in_consensus = bool(resume["shared"]["in_consensus"])
        self._load_shared_state(resume["shared"])
        if mine["params"] is not None:
            self._params.load_buckets(mine["params"])
            self._params.unpack()
            self._buffers.load_buckets(mine["buffers"])
            self._buffers.unpack()
        self._load_rank_state(mine)

    def _load_rank_state(self, state: dict[str, Any]) -> None:
        """Subclass hook for per-process algorithm state."""

    @override
    def teardown(self) -> None:
        self._finish_comm()
        self._swap_out()
        super().teardown()
