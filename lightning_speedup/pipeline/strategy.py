"""``PipelineStrategy``: ``torch.distributed.pipelining`` schedules driven by Lightning's fit loop.

The model is cut into stages (contiguous runs of the layers the module declares, see
:mod:`lightning_speedup.pipeline.contract`); each process holds only its own stages, and a schedule
(GPipe, 1F1B, interleaved 1F1B, interleaved zero-bubble; Huang et al. 2019, Narayanan et al. 2021, Qi et
al. 2023) streams micro-batches through them. The schedule runs forward *and* backward inside
``step()``, so this strategy runs it from ``training_step`` and turns Lightning's backward into a no-op,
while everything else a Lightning user relies on keeps working: the optimizer, LR schedulers and the
schedule callbacks step every stage, gradient clipping by norm uses the norm over all stages, gradient
accumulation and bf16-mixed work, the loss (which exists on the last stage only) is averaged over the replicas,
given to every process and logged as ``train_loss``, and validation/prediction run a micro-batched forward-only
pipeline.

``pipeline_size`` smaller than the world size gives pipeline x data parallelism: ``world // pipeline_size``
replicas of the pipeline, each stage's gradients averaged over its replicas before the optimizer step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_speedup._chain import chain_method
from lightning_speedup._compat import (
    StrategyRegistryType,
    ddp_layer_sync,
    launch_with_main_process_hook,
    optimizer_to_device,
    set_module_device,
)
from lightning_speedup._process_group import CleanExitDDPStrategy
from lightning_speedup._registry import registered_strategy
from lightning_speedup._validation import check_int
from lightning_speedup.metrics import log_number
from lightning_speedup.pipeline.contract import (
    PipelineLayers,
    batch_inputs,
    collect_layers,
    holds_meta,
    retie_,
    split_batch,
)
from lightning_speedup.pipeline.p2p import forward_only
from lightning_speedup.pipeline.partition import (
    StagePlan,
    layer_param_counts,
    layer_times,
    plan_stages,
    theoretical_bubble,
)

log = logging.getLogger(__name__)

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv", "dualpipev")
_LOOPED = ("interleaved_1f1b", "zero_bubble")
# Two stages per process placed in a V: process r holds stage r and stage 2p-1-r, so the last stage (and the
# loss) sits on process 0 beside the first.
_V_SHAPED = ("zbv", "dualpipev")
_MULTI_STAGE = _LOOPED + _V_SHAPED
_TORCH_CLASS = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved_1f1b": "ScheduleInterleaved1F1B",
    "zero_bubble": "ScheduleInterleavedZeroBubble",
    "zbv": "ScheduleZBVZeroBubble",
    "dualpipev": "ScheduleDualPipeV",
}


# The oldest torch seen passing activations between two adjacent stages held by one process: 2.11 (looped
# schedules in one process, NCCL on one H200; 2.13 and 2.14 on gloo). 2.8 and 2.10 send them over the process
# group, which gloo refuses ("Pair is not connected").
_LOCAL_STAGES_TORCH = (2, 11)


def adjacent_local_stages_problem(
    schedule: str, pipeline_size: int, stages_per_rank: int, torch_version: str
) -> str | None:
    """Why ``schedule`` cannot run on ``torch_version``, or ``None``: a schedule that gives one process two
    adjacent stages (the V-shaped ones always; a looped one when a single process holds every stage) needs a
    torch that passes between local stages without sending to itself."""
    adjacent = schedule in _V_SHAPED or (schedule in _LOOPED and pipeline_size == 1 and stages_per_rank > 1)
    major_minor = tuple(int(x) for x in torch_version.split("+")[0].split(".")[:2])
    if not adjacent or major_minor >= _LOCAL_STAGES_TORCH:
        return None
    need = ".".join(map(str, _LOCAL_STAGES_TORCH))
    return (
        f"The {schedule!r} schedule here puts two adjacent stages in one process, and torch {torch_version} "
        f"sends between them over the process group, which fails ('Pair is not connected' on gloo). Use torch "
        f"{need} or newer, or a schedule that gives each process non-adjacent stages (gpipe, 1f1b, or a looped "
        f"schedule over several processes)."
    )


def _materialize_on_cpu(module: LightningModule, ties: list[list[str]] | None = None) -> None:
    """Give each declared layer still on the meta device CPU storage, initialised as the stages initialise
    theirs (``pipeline_init_weights`` or ``reset_parameters``), so that loading the full model's weights into
    it fills it; non-persistent buffers, which no state dict carries, keep their initial values.

    Allocating one layer at a time gives each name of a tied parameter its own copy: the names in ``ties``
    (default: the module's ties as they are now) share one parameter again afterwards."""
    layers = collect_layers(module)
    ties = layers.ties if ties is None else ties
    for layer in layers.modules:
        if holds_meta(layer):
            layers.materialize_(layer, torch.device("cpu"))
    retie_(module, ties)


# The subgroups this process created, by their ranks, with the default group they were made in. Every setup (each
# fit, validate, test and predict) reuses them: new ones each time piled up in a long-lived process (a notebook,
# rank 0 under popen), each holding its own communicators once used. They end with the default group.
_subgroups: dict[tuple[int, ...], Any] = {}
_subgroups_world: list[Any] = [None]


def _subgroup(ranks: list[int]) -> Any:
    """The process group of ``ranks``, made on first use and reused while the default group lives.

    ``new_group`` must be called by every process in the same order: every process sets up the same runs, so
    every process finds the same groups here and makes the same new ones."""
    world = dist.group.WORLD
    if _subgroups_world[0] is not world:  # a new default group: the old subgroups went with the old one
        _subgroups.clear()
        _subgroups_world[0] = world
    key = tuple(ranks)
    if key not in _subgroups:
        _subgroups[key] = dist.new_group(ranks)
    return _subgroups[key]


@registered_strategy
class PipelineStrategy(CleanExitDDPStrategy):
    """Pipeline parallelism (optionally x data parallelism) for a LightningModule that declares its layers.

    Args:
        schedule: one of ``"gpipe"``, ``"1f1b"``, ``"interleaved_1f1b"``, ``"zero_bubble"`` (interleaved
            zero-bubble), ``"zbv"`` (zero-bubble V) or ``"dualpipev"`` (DualPipe-V); the last two place two
            stages per process in a V.
        pipeline_size: processes per pipeline; ``None`` = the world size. The world size must be a
            multiple of it; the quotient is the number of data-parallel replicas.
        n_microbatches: micro-batches per training batch; ``None`` = ``2 * pipeline_size`` (GPipe/1F1B need
            at least ``pipeline_size`` to fill the pipeline, and the batch size must divide evenly).
        stages_per_rank: model chunks per process (``v``); 1 for GPipe/1F1B, >= 2 for the interleaved
            schedules (default 2 there), exactly 2 for the V-shaped ones.
        balance: ``"params"`` (split by parameter count) or ``"time"`` (by each layer's measured
            forward+backward time on this device; needs ``module.example_input_array`` of one micro-batch).
        metrics_every: every this many optimizer steps, synchronise once and log ``pipeline/step_time_s``,
            ``pipeline/busy_s``, ``pipeline/bubble`` (measured, this rank), ``pipeline/bubble_theory``,
            ``pipeline/samples_per_s`` and ``pipeline/peak_mem_gib``; 0 turns it off.
        start_method, process_group_backend, timeout, accelerator, ...: as in ``DDPStrategy``.

    Raises:
        ValueError: for an unknown schedule (the valid ones are listed), non-positive sizes, a GPipe/1F1B
            run with ``stages_per_rank != 1``, an interleaved run with ``stages_per_rank < 2``, or too few
            micro-batches for the schedule. Checks that need the model or the world size run in ``setup``:
            more stages than layers, a world size not divisible by ``pipeline_size``, a module without
            ``pipeline_layers()``, parameters shared between stages, parameters outside the declared layers, a
            module with manual optimization, fp16 training with a loss scaler (``precision="16-mixed"``; use
            ``"bf16-mixed"``); at the start of training, a DataLoader whose last batch is short.
    """

    strategy_name = "pipeline"

    def __init__(
        self,
        schedule: str = "1f1b",
        pipeline_size: int | None = None,
        n_microbatches: int | None = None,
        stages_per_rank: int | None = None,
        balance: Literal["params", "time"] = "params",
        metrics_every: int = 50,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"Unknown pipeline schedule {schedule!r}; choose one of {list(SCHEDULES)}.")
        if pipeline_size is not None:
            check_int("pipeline_size", pipeline_size, 1, "processes per pipeline")
        if n_microbatches is not None:
            check_int("n_microbatches", n_microbatches, 1, "micro-batches per training batch")
        if stages_per_rank is None:
            stages_per_rank = 2 if schedule in _MULTI_STAGE else 1
        check_int("stages_per_rank", stages_per_rank, 1, "model chunks per process")
        if schedule in _V_SHAPED and stages_per_rank != 2:
            raise ValueError(
                f"schedule={schedule!r} places exactly two stages per process in a V: stages_per_rank "
                f"must be 2, got {stages_per_rank}. Use 'interleaved_1f1b' for more chunks."
            )
        if schedule in _LOOPED and stages_per_rank < 2:
            raise ValueError(
                f"schedule={schedule!r} interleaves model chunks: stages_per_rank must be >= 2, "
                f"got {stages_per_rank}. Use schedule='1f1b' for one stage per process."
            )
        if schedule not in _MULTI_STAGE and stages_per_rank != 1:
            raise ValueError(
                f"schedule={schedule!r} runs one stage per process: stages_per_rank must be 1, got "
                f"{stages_per_rank}. Use 'interleaved_1f1b' or 'zero_bubble' for several."
            )
        if balance not in ("params", "time"):
            raise ValueError(f"balance must be 'params' or 'time', got {balance!r}.")
        check_int("metrics_every", metrics_every, 0, "0 = off")
        if n_microbatches is not None and pipeline_size is not None:
            self._check_microbatches(schedule, n_microbatches, pipeline_size)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.schedule_name = schedule
        self.pipeline_size_arg = pipeline_size
        self.n_microbatches_arg = n_microbatches
        self.stages_per_rank = stages_per_rank
        self.balance = balance
        self.metrics_every = metrics_every
        self.plan: StagePlan | None = None
        self._layers: list[nn.Module] = []
        self._stage_modules: dict[int, nn.Module] = {}
        self._schedule: Any = None
        self._pp_group: dist.ProcessGroup | None = None
        self._dp_group: dist.ProcessGroup | None = None
        self._pp_ranks: list[int] = []
        self._dp_ranks: list[int] = []
        self._ties: list[list[str]] = []
        self._owned_params: list[nn.Parameter] = []
        self._owned_names: set[str] = set()
        self._batch_shapes: tuple[Any, ...] | None = None
        self._undo: list[Callable[[], None]] = []
        self._optimizer_steps = 0
        self._microbatch_compute_s: float | None = None
        self._completed = False
        self._pending_grads: list[Tensor | None] = []
        self._output_checks: list[Any] = []

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def _check_microbatches(schedule: str, m: int, p: int) -> None:
        if schedule in ("1f1b", "interleaved_1f1b", "zero_bubble", "zbv") and m < p:
            raise ValueError(
                f"schedule={schedule!r} needs at least as many micro-batches as pipeline processes "
                f"(n_microbatches >= pipeline_size = {p}), got n_microbatches={m}."
            )
        if schedule == "dualpipev" and m < 2 * p:
            raise ValueError(
                f"schedule='dualpipev' needs at least as many micro-batches as stages "
                f"(n_microbatches >= 2 * pipeline_size = {2 * p}), got n_microbatches={m}."
            )
        if schedule in _LOOPED and m % p != 0:
            raise ValueError(
                f"schedule={schedule!r} needs n_microbatches to be a multiple of pipeline_size "
                f"({p}), got {m}."
            )

    @property
    def pipeline_size(self) -> int:
        return self.pipeline_size_arg or self.world_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.pipeline_size

    @property
    def pp_rank(self) -> int:
        return self.global_rank % self.pipeline_size

    @property
    def dp_rank(self) -> int:
        return self.global_rank // self.pipeline_size

    @property
    def n_microbatches(self) -> int:
        return self.n_microbatches_arg or 2 * self.pipeline_size

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # The stages of one pipeline must see the same batch; replicas see different ones.
        return {"num_replicas": self.dp_size, "rank": self.dp_rank}

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        self._completed = False
        module = self.lightning_module
        assert module is not None
        if self.world_size % self.pipeline_size != 0:
            raise ValueError(
                f"The world size ({self.world_size} processes) must be a multiple of pipeline_size "
                f"({self.pipeline_size}); set pipeline_size to a divisor or change devices/num_nodes."
            )
        self._check_microbatches(self.schedule_name, self.n_microbatches, self.pipeline_size)
        if ddp_layer_sync(self) is not None:
            raise ValueError(
                "PipelineStrategy does not support Trainer(sync_batchnorm=True): it would be ignored, since each "
                "stage runs its layers one micro-batch at a time and replicas share no batch statistics. Remove "
                "sync_batchnorm=True; a BatchNorm then normalises each micro-batch alone, as with gradient "
                "accumulation in one process."
            )
        if trainer.state.fn == TrainerFn.FITTING and not module.automatic_optimization:
            # The strategy runs the schedule in place of training_step, so a manual training_step (which steps
            # the optimizers itself) would never run: no optimizer step, and max_steps never reached.
            raise ValueError(
                f"PipelineStrategy needs automatic optimization, but {type(module).__name__} sets "
                "`self.automatic_optimization = False`. The strategy runs the pipeline schedule in place of your "
                "training_step, so its manual optimizer steps would never run. Remove the line (return the loss "
                "and let Lightning step the optimizer) or train without the pipeline."
            )
        if (
            trainer.state.fn == TrainerFn.FITTING
            and getattr(self.precision_plugin, "scaler", None) is not None
        ):
            # The schedule runs backward inside training_step, from the unscaled loss: the scaler would divide the
            # true gradients by its scale (SGD barely moves, clipping never triggers), and each stage's scaler
            # would skip steps on its own overflows only, so the stages would drift apart.
            raise ValueError(
                "PipelineStrategy does not support fp16 mixed precision with a loss scaler (precision='16-mixed' "
                f"gives {type(self.precision_plugin).__name__} a GradScaler): the pipeline schedule runs backward "
                "itself, from the unscaled loss, so the scaler would shrink every gradient by its scale. Use "
                "precision='bf16-mixed' (bfloat16 needs no loss scaling) or '32-true'."
            )
        self._batch_shapes = None  # a new fit may bring batches of another size
        self._microbatch_compute_s = None
        self._make_groups()
        # Before the layers are collected: a precision plugin that swaps modules (QAT's fake-quantized layers)
        # must swap them in the model the stages are cut from, or a stage would hold the replaced layer.
        self.precision_plugin.convert_module(module)
        layers = collect_layers(module)
        self._layers = layers.modules
        self._ties = layers.ties  # found before any layer moves; moving one at a time unties them
        self.plan = self._plan(layers)
        rank_zero_info(
            f"PipelineStrategy ({self.schedule_name}, {self.pipeline_size} process(es) per pipeline x "
            f"{self.dp_size} replica(s), {self.n_microbatches} micro-batches):\n"
            + self.plan.describe(layers.names)
        )
        layers.check_stages(self.plan)
        self._materialize(layers)
        if trainer.state.fn == TrainerFn.FITTING:  # validation and predict pass between stages themselves
            problem = adjacent_local_stages_problem(
                self.schedule_name, self.pipeline_size, self.stages_per_rank, torch.__version__
            )
            if problem:
                raise RuntimeError(problem)
        self._build_schedule()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
            self._drop_foreign_optimizer_state()
            self._undo.append(
                chain_method(self.precision_plugin, "clip_grad_by_norm", self._clip_by_global_norm)
            )
        self.setup_precision_plugin()

    def _make_groups(self) -> None:
        p, world = self.pipeline_size, self.world_size
        # Every process asks for every group, in the same order (a collective requirement of new_group).
        for d in range(world // p):
            ranks = list(range(d * p, (d + 1) * p))
            group = _subgroup(ranks)
            if self.global_rank in ranks:
                self._pp_group, self._pp_ranks = group, ranks
        for i in range(p):
            ranks = list(range(i, world, p))
            group = _subgroup(ranks)
            if self.global_rank in ranks:
                self._dp_group = group if len(ranks) > 1 else None
                self._dp_ranks = ranks

    def _plan(self, layers: PipelineLayers) -> StagePlan:
        num_stages = self.pipeline_size * self.stages_per_rank
        params = layer_param_counts(layers.modules)
        costs: list[float]
        if self.balance == "params":
            costs = [float(n) for n in params]
        else:
            example = getattr(self.lightning_module, "example_input_array", None)
            if not isinstance(example, Tensor):
                raise ValueError(
                    "balance='time' measures each layer on an example input: set "
                    "`self.example_input_array` in your LightningModule to one micro-batch of "
                    "inputs (a Tensor), or use balance='params'."
                )
            costs = layer_times(
                layers.modules, example, self.root_device, materialize=layers.materialized_copy
            )
            # Every process must cut the model the same way: take rank 0's measurement.
            box = [costs]
            dist.broadcast_object_list(box, src=0)
            costs = box[0]
        placement = "v" if self.schedule_name in _V_SHAPED else "loop"
        return plan_stages(costs, params, num_stages, self.pipeline_size, self.balance, placement=placement)

    def _materialize(self, layers: PipelineLayers) -> None:
        """Keep this process's stages on its device; every other layer goes to the meta device (no memory)."""
        assert self.plan is not None
        mine = set(self.plan.stages_of(self.pp_rank))
        owned_layers: set[int] = set()
        for s in mine:
            a, b = self.plan.bounds[s]
            owned_layers.update(range(a, b))
        for i, layer in enumerate(layers.modules):
            if i in owned_layers:
                layers.materialize_(layer, self.root_device)
            else:
                layer.to("meta")
        module = self.lightning_module
        assert module is not None
        # Moving layers one at a time to or from the meta device gave each name of a tied parameter its own copy
        # (ties lie within one stage: all on this device, or all on the meta device).
        retie_(module, self._ties)
        self._stage_modules = {
            s: nn.Sequential(*layers.modules[self.plan.bounds[s][0] : self.plan.bounds[s][1]])
            for s in sorted(mine)
        }
        owned_ids = {id(p) for s in mine for p in self._stage_modules[s].parameters()}
        self._owned_params = [p for p in module.parameters() if id(p) in owned_ids]
        self._owned_names = _owned_state_names(module, layers.modules, self._stage_modules.values())
        # A layer must map one tensor to one tensor; a tuple output would otherwise fail deep inside the stage
        # or its send. Checked until the first training step has passed every layer.
        self._output_checks = [
            layers.modules[i].register_forward_hook(_one_tensor_out(i)) for i in sorted(owned_layers)
        ]
        set_module_device(module, self.root_device)
        self._broadcast_from_first_replica(module)

    def _broadcast_from_first_replica(self, module: LightningModule) -> None:
        """Give every replica of this process's stages the parameters and buffers of the first replica, as DDP does
        when it wraps a model: each process builds (or initialises from the meta device) its own model, and
        replicas that start apart never meet, since they only average gradients."""
        if self._dp_group is None:
            return
        tensors = [t for t in (*module.parameters(), *module.buffers()) if t.device.type != "meta"]
        with torch.no_grad():
            sent = [t.data if t.is_contiguous() else t.data.contiguous() for t in tensors]
            works = [
                dist.broadcast(b, src=self._dp_ranks[0], group=self._dp_group, async_op=True) for b in sent
            ]
            for work in works:
                work.wait()
            for t, b in zip(tensors, sent):
                if b is not t.data:
                    t.data.copy_(b)

    def _build_schedule(self) -> None:
        from torch.distributed import pipelining

        assert self.plan is not None
        cls = getattr(pipelining, _TORCH_CLASS[self.schedule_name], None)
        if cls is None:
            raise RuntimeError(
                f"torch {torch.__version__} has no pipelining.{_TORCH_CLASS[self.schedule_name]}; "
                f"choose another schedule or upgrade torch."
            )
        stages = [
            pipelining.PipelineStage(
                _Stage(self._stage_modules[s], first=s == 0, device=self.root_device),
                s,
                self.plan.num_stages,
                self.root_device,
                group=self._pp_group,
            )
            for s in sorted(self._stage_modules)
        ]
        module = self.lightning_module
        assert module is not None

        def loss_fn(output: Tensor, target: Tensor) -> Tensor:
            # Gradients accumulate over micro-batches and over Lightning's accumulated batches in .grad, so the
            # loss carries both means itself (the schedule's own scale_grads would also rescale what earlier
            # batches accumulated).
            accumulate = self._trainer_accumulation()
            return module.pipeline_loss(output, target) / (self.n_microbatches * accumulate)  # type: ignore[operator]

        first = stages[0] if self.schedule_name not in _MULTI_STAGE else stages
        self._schedule = cls(first, n_microbatches=self.n_microbatches, loss_fn=loss_fn, scale_grads=False)

    def _trainer_accumulation(self) -> int:
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        return int(getattr(trainer, "accumulate_grad_batches", 1) or 1)

    def _drop_foreign_optimizer_state(self) -> None:
        owned = {id(p) for p in self._owned_params}
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) not in owned:
                        opt.state.pop(p, None)

    @override
    def model_to_device(self) -> None:
        pass  # _materialize placed this process's layers; the others live on the meta device

    @override
    def configure_ddp(self) -> None:
        pass  # stages are never wrapped in DistributedDataParallel; replicas average gradients themselves

    # ------------------------------------------------------------------ training
    @property
    def _holds_first(self) -> bool:
        return 0 in self._stage_modules

    @property
    def _holds_last(self) -> bool:
        assert self.plan is not None
        return self.plan.num_stages - 1 in self._stage_modules

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        m = self.n_microbatches
        if x.shape[0] % m != 0:
            raise ValueError(
                f"The batch size ({x.shape[0]}) must be divisible by n_microbatches ({m}): change the "
                "DataLoader's batch_size or the strategy's n_microbatches."
            )
        shapes = (tuple(x.shape), x.dtype, tuple(y.shape), y.dtype)
        if self._batch_shapes is None:
            self._batch_shapes = shapes
        elif shapes != self._batch_shapes:
            raise ValueError(
                f"This training batch has shapes {shapes[0]} / {shapes[2]}, but the pipeline was built for "
                f"{self._batch_shapes[0]} / {self._batch_shapes[2]} on its first step (pipeline stages exchange "
                "fixed-shape activations). Use DataLoader(..., drop_last=True) so every training batch has the "
                "same size."
            )

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        module = self.lightning_module
        assert module is not None and self.plan is not None
        x, y = split_batch(module, args[0])
        self._check_batch(x, y)
        y = self._first_stage_targets(y)
        timed = self.metrics_every > 0 and self._optimizer_steps % self.metrics_every == 0
        if timed:
            self._sync()
            t0 = time.perf_counter()
        losses: list[Tensor] = []
        step_args = (x,) if self._holds_first else ()
        # Lightning zeroes gradients *after* training_step and before backward (at the start of an accumulation
        # window), but the schedule computes them inside training_step: it writes into empty .grad fields, and
        # backward() adds its result to whatever Lightning left there.
        earlier = [p.grad for p in self._owned_params]
        for p in self._owned_params:
            p.grad = None
        with self.precision_plugin.train_step_context():
            self._schedule.step(*step_args, target=y if self._holds_last else None, losses=losses)
        self._pending_grads = [p.grad for p in self._owned_params]
        for handle in self._output_checks:
            handle.remove()
        self._output_checks = []
        for p, g in zip(self._owned_params, earlier):
            p.grad = g
        if self._holds_last:
            # losses hold loss / (m * accumulate) per micro-batch: undo the scaling for the logged mean
            loss = torch.stack([t.detach().float() for t in losses]).sum() * self._trainer_accumulation()
        else:
            loss = torch.zeros((), device=self.root_device)
        # One collective gives every process the mean over the replicas, which is the global batch's loss: each
        # pipeline's last stage brings its loss and every other process zero, so the sum over all processes is
        # the sum over replicas. With one replica this is the broadcast from the last stage (adding zeros is exact).
        dist.all_reduce(loss)
        if self.dp_size > 1:
            loss.div_(self.dp_size)
        if timed:
            self._sync()
            self._log_pipeline_metrics(time.perf_counter() - t0, x)
        module.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        return loss

    @override
    def backward(
        self, closure_loss: Tensor, optimizer: Optimizer | None, *args: Any, **kwargs: Any
    ) -> Tensor:
        # The schedule already ran backward inside training_step; its gradients land here, then the hooks run.
        assert self.lightning_module is not None
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, self.lightning_module)
        for p, g in zip(self._owned_params, self._pending_grads):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        self._pending_grads = []
        closure_loss = self.precision_plugin.post_backward(closure_loss, self.lightning_module)
        self.post_backward(closure_loss)
        return closure_loss

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any
    ) -> Any:
        def closure_then_average() -> Any:
            # The closure runs the last accumulated batch's training_step and backward; the gradients of the
            # whole accumulation window are in .grad now, so the replicas average them once per optimizer
            # step, before clipping and the step.
            result = closure()
            self._average_replica_grads()
            return result

        out = super().optimizer_step(optimizer, closure_then_average, model, **kwargs)
        self._optimizer_steps += 1
        return out

    def _average_replica_grads(self) -> None:
        if self._dp_group is None:
            return
        grads = [p.grad for p in self._owned_params if p.grad is not None]
        works = [dist.all_reduce(g, group=self._dp_group, async_op=True) for g in grads]
        for w in works:
            w.wait()
        for g in grads:
            g.div_(self.dp_size)

    def _clip_by_global_norm(self, original: Callable[..., None]) -> Callable[..., None]:
        def clip(optimizer: Optimizer, clip_val: float) -> None:
            # torch.nn.utils.clip_grad_norm_'s arithmetic, with the norm taken over every stage of the pipeline.
            grads = [p.grad for p in self._owned_params if p.grad is not None]
            local = (
                torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()
                if grads
                else torch.zeros((), device=self.root_device)
            )
            dist.all_reduce(local, group=self._pp_group)
            total = local.sqrt()
            coef = torch.clamp(float(clip_val) / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))

        return clip

    # ------------------------------------------------------------------ metrics
    def _sync(self) -> None:
        if self.root_device.type == "cuda":
            torch.cuda.synchronize(self.root_device)

    def _log_pipeline_metrics(self, step_s: float, x: Tensor) -> None:
        module = self.lightning_module
        assert module is not None
        if self._microbatch_compute_s is None:
            self._microbatch_compute_s = self._measure_microbatch(x)
        busy = self._microbatch_compute_s * self.n_microbatches
        theory = theoretical_bubble(
            self.schedule_name, self.pipeline_size, self.n_microbatches, self.stages_per_rank
        )
        log_number(module, "pipeline/step_time_s", step_s)
        log_number(module, "pipeline/busy_s", busy)
        log_number(module, "pipeline/bubble", max(0.0, 1.0 - busy / step_s))
        log_number(module, "pipeline/bubble_theory", theory)
        log_number(module, "pipeline/samples_per_s", x.shape[0] * self.dp_size / step_s)
        if self.root_device.type == "cuda":
            log_number(
                module, "pipeline/peak_mem_gib", torch.cuda.max_memory_allocated(self.root_device) / 2**30
            )

    def _measure_microbatch(self, x: Tensor) -> float:
        """Seconds this process's stages take for one micro-batch's forward+backward, alone (no waiting).

        Busy time is this times the number of micro-batches; the measured bubble is 1 - busy / step time.
        The stage inputs are rebuilt by a forward-only pass of the earlier stages, so no peer is needed.
        """
        assert self.plan is not None
        mb = x.tensor_split(self.n_microbatches)[0]
        total = 0.0
        # Measuring must not train: the stages' buffers (BatchNorm's running statistics) and the random number
        # generators (dropout, the random probe inputs) are as before afterwards.
        with _side_effect_free(self._stage_modules.values(), self.root_device):
            for s in sorted(self._stage_modules):
                stage = self._stage_modules[s]
                inp = self._stage_input_shape_probe(s, mb)
                params = [p for p in stage.parameters() if p.requires_grad]
                for rep in range(2):  # the first call warms up
                    probe = inp.detach().requires_grad_(inp.is_floating_point())
                    self._sync()
                    t0 = time.perf_counter()
                    with self.precision_plugin.train_step_context():
                        out = stage(probe)
                    targets = [t for t in (*params, probe) if t.requires_grad]
                    torch.autograd.grad(out.float().sum(), targets, allow_unused=True)
                    self._sync()
                    if rep:
                        total += time.perf_counter() - t0
        return total

    def _stage_input_shape_probe(self, s: int, mb: Tensor) -> Tensor:
        # The activation entering stage s has the shape the stage's PipelineStage recorded on the first step;
        # random values of that shape and dtype time the same arithmetic.
        if s == 0:
            return mb.to(self.root_device)
        stage = self._schedule_stage(s)
        meta = _recorded_input(stage)
        if meta is None:
            raise RuntimeError("pipeline stage input shape unknown before the first step")
        shape, dtype = meta
        return torch.randn(shape, device=self.root_device).to(dtype)

    def _schedule_stage(self, s: int) -> Any:
        stages = getattr(self._schedule, "_stages", None) or [self._schedule._stage]
        return next(st for st in stages if st.stage_index == s)

    def _first_stage_targets(self, y: Tensor) -> Tensor:
        """The targets of the batch the first stage's process loaded, on every process of this pipeline.

        Each process loads its own batch, and the last stage's loss pairs its targets with the first stage's
        inputs. Whenever the processes' batches differ (a shuffled DataLoader without the distributed sampler, or
        a WeightedRandomSampler, draws from each process's own random stream, which dropout in only some stages
        moves apart; a random transform of the targets, such as mixup, differs per process), inputs would meet
        other samples' targets. So the first stage's batch decides: one broadcast of the targets per step (labels
        or token ids, typically smaller than one micro-batch's activations); the inputs, which only the first
        stage reads, are its own anyway.
        """
        assert self.plan is not None
        src = self._pp_ranks[self.plan.rank_of(0)]
        if src == self._pp_ranks[self.plan.rank_of(self.plan.num_stages - 1)]:
            return y  # first and last stage in one process (a single process, or a V): nothing to pair
        received = (
            y.contiguous()
            if self.global_rank == src
            else torch.empty_like(y, memory_format=torch.contiguous_format)
        )
        dist.broadcast(received, src=src, group=self._pp_group)
        return received

    # ------------------------------------------------------------------ evaluation
    def _forward(self, x: Tensor) -> Tensor | None:
        """The last stage's output for inputs ``x`` on the process that holds it (None elsewhere)."""
        assert self.plan is not None
        return forward_only(
            self._stage_modules,
            self.plan,
            self.pp_rank,
            self._pp_ranks,
            self._pp_group,
            x,
            self.n_microbatches,
            self.root_device,
        )

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate("val", args[0], self.precision_plugin.val_step_context)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate("test", args[0], self.precision_plugin.test_step_context)

    def _evaluate(self, stage: str, batch: Any, context: Callable[[], Any]) -> dict[str, Tensor]:
        module = self.lightning_module
        assert module is not None and self.plan is not None
        with context():
            x, y = split_batch(module, batch)
            y = self._first_stage_targets(y)
            out = self._forward(x)
            metrics: dict[str, Tensor] = {}
            if out is not None:
                metrics = {f"{stage}_loss": module.pipeline_loss(out, y)}  # type: ignore[operator]
                extra = getattr(module, "pipeline_metrics", None)
                if callable(extra):
                    metrics.update({f"{stage}_{k}": v for k, v in extra(out, y).items()})
        names = sorted(metrics)
        box: list[Any] = [names]
        src = self._pp_ranks[self.plan.rank_of(self.plan.num_stages - 1)]
        dist.broadcast_object_list(box, src=src, group=self._pp_group)
        values = (
            torch.stack([metrics[n].detach().float() for n in box[0]])
            if metrics
            else torch.zeros(len(box[0]), device=self.root_device)
        )
        dist.broadcast(values, src=src, group=self._pp_group)
        result = {n: values[i] for i, n in enumerate(box[0])}
        for n, v in result.items():
            # With replicas, each saw its own share of the data: the epoch value is the mean over all of them.
            module.log(
                n,
                v,
                prog_bar=n.endswith("loss"),
                on_epoch=True,
                batch_size=y.shape[0],
                sync_dist=self.dp_size > 1,
            )
        return result

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.plan is not None
        module = self.lightning_module
        assert module is not None
        with self.precision_plugin.predict_step_context():
            out = self._forward(batch_inputs(module, args[0]))
        box = [out.cpu() if out is not None else None]
        dist.broadcast_object_list(
            box, src=self._pp_ranks[self.plan.rank_of(self.plan.num_stages - 1)], group=self._pp_group
        )
        prediction = box[0]
        assert prediction is not None
        return prediction.to(self.root_device)  # on the device, as plain Lightning returns it

    # ------------------------------------------------------------------ checkpoints
    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the full state loads into whatever stages this process holds after setup

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full model's state (every stage), gathered on the pipeline's first process (collective)."""
        module = self.lightning_module
        assert module is not None
        mine = {k: _to_cpu(v) for k, v in module.state_dict().items() if k in self._owned_names}
        parts = self._gather(mine)
        full: dict[str, Any] = {}
        for part in parts or []:
            full.update(part)
        if parts is not None:
            missing = set(module.state_dict()) - set(full)
            if missing:
                raise RuntimeError(f"pipeline checkpoint: no stage holds {sorted(missing)[:5]}")
            full = {k: full[k] for k in module.state_dict()}  # the plain module's key order
        return full

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        """The optimizer's state for every stage's parameters, indexed as in the plain module (collective)."""
        state = super().optimizer_state(optimizer)
        owned = {id(p) for p in self._owned_params}
        opt = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
        mine = {
            index[id(p)]: state["state"][index[id(p)]]
            for p in self._owned_params
            if index[id(p)] in state["state"]
        }
        parts = self._gather(
            {i: {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in s.items()} for i, s in mine.items()}
        )
        del owned
        merged: dict[int, Any] = {}
        for part in parts or []:
            merged.update(part)
        return {"state": dict(sorted(merged.items())), "param_groups": state["param_groups"]}

    def _gather(self, obj: Any) -> list[Any] | None:
        """``obj`` of every process of this pipeline, on its first process (None elsewhere)."""
        dst = self._pp_ranks[0]
        out: list[Any] | None = [None] * self.pipeline_size if self.global_rank == dst else None
        dist.gather_object(obj, out, dst=dst, group=self._pp_group)
        return out

    @override
    def load_model_state_dict(self, checkpoint: dict[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        assert module is not None
        state = checkpoint["state_dict"]
        expected = set(module.state_dict())
        if strict and set(state) != expected:
            raise KeyError(
                f"Checkpoint keys differ from the model's: missing {sorted(expected - set(state))[:5]}, "
                f"unexpected {sorted(set(state) - expected)[:5]}."
            )
        module.load_state_dict({k: v for k, v in state.items() if k in self._owned_names}, strict=False)

    @override
    def load_optimizer_state_dict(self, checkpoint: dict[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer.load_state_dict(state)
        self._drop_foreign_optimizer_state()  # other stages' state, cast to the meta device by load_state_dict
        for optimizer in self.optimizers:
            optimizer_to_device(optimizer, self.root_device)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        self._check_last_batch()

    def _check_last_batch(self) -> None:
        """Refuse, before the first step, a training DataLoader whose last batch of each epoch would be smaller than
        the others (stages exchange fixed-shape activations); otherwise the run fails only at that batch, after
        a whole epoch of training."""
        module = self.lightning_module
        trainer = module.trainer if module is not None else None
        loaders = getattr(trainer, "train_dataloader", None)
        found: list[DataLoader] = []
        apply_to_collection(loaders, DataLoader, found.append)
        for loader in found:
            batch_sampler = loader.batch_sampler
            size = getattr(batch_sampler, "batch_size", None)
            if batch_sampler is None or getattr(batch_sampler, "drop_last", True) or not size:
                continue
            try:
                samples, batches = len(batch_sampler.sampler), len(loader)  # type: ignore[union-attr, arg-type]
            except TypeError:  # an iterable-style dataset has no length
                continue
            if samples % size == 0 or batches > trainer.num_training_batches:  # type: ignore[union-attr]
                continue  # every batch full, or limit_train_batches stops before the short one
            raise ValueError(
                f"The training DataLoader gives batches of {size} but its last batch of each epoch has "
                f"{samples % size} sample(s) ({samples} per process); pipeline stages exchange fixed-shape "
                "activations, so every training batch must have the same size. Use DataLoader(..., "
                "drop_last=True) or a dataset size divisible by the batch size."
            )

    @override
    def on_train_end(self) -> None:
        self._completed = True

    @override
    def on_validation_end(self) -> None:
        self._completed = True

    @override
    def on_test_end(self) -> None:
        self._completed = True

    @override
    def on_predict_end(self) -> None:
        self._completed = True

    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        # spawn/fork: the launching process never set up, so a model built on the meta device is still there
        launch_with_main_process_hook(self, _materialize_on_cpu)

    @override
    def teardown(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        for handle in self._output_checks:
            handle.remove()
        self._output_checks = []
        module = self.lightning_module
        if module is not None and self._layers:
            if self._completed:
                # As after plain Lightning: the whole trained model in every process (and back in the launching
                # process for spawn/fork), not a pipeline of meta-device holes.
                self._reassemble(module)
            else:  # interrupted: peers may be gone, so no collective; initialise what cannot move to the CPU
                _materialize_on_cpu(module, self._ties)
        self._layers, self._stage_modules, self._schedule = [], {}, None
        if module is not None and holds_meta(module):
            # The run failed before this process's model was placed (a worker's setup) or before the trained
            # weights came back (the launching process of spawn/fork): the model stays as built. Lightning's
            # teardown moves it to the CPU, which fails for meta tensors and would replace the run's own error.
            module.__dict__["cpu"] = lambda: module  # shadows nn.Module.cpu for this one call
            try:
                super().teardown()
            finally:
                del module.__dict__["cpu"]
            return
        super().teardown()

    def _reassemble(self, module: LightningModule) -> None:
        mine = {k: _to_cpu(v) for k, v in module.state_dict().items() if k in self._owned_names}
        parts: list[Any] = [None] * self.pipeline_size
        dist.all_gather_object(parts, mine, group=self._pp_group)
        full: dict[str, Any] = {}
        for part in parts:
            full.update(part)
        _materialize_on_cpu(module, self._ties)
        module.load_state_dict(full, strict=False)

    # ------------------------------------------------------------------ strings
    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistryType) -> None:
        for name in SCHEDULES:
            strategy_registry.register(
                f"pipeline_{name}",
                cls,
                description=f"Pipeline parallelism with the {name} schedule",
                schedule=name,
            )


def _owned_state_names(
    module: nn.Module, layers: Sequence[nn.Module], stages: Iterable[nn.Module]
) -> set[str]:
    """The keys of ``module.state_dict()`` this process holds: tensors not on the meta device, and the extra state
    (a non-tensor, such as a QAT layer's settings) of modules in its own stages or in no layer at all."""
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    in_stages = {id(m) for stage in stages for m in stage.modules()}
    owned = set()
    for name, value in module.state_dict(keep_vars=True).items():
        if isinstance(value, Tensor):
            if value.device.type != "meta":
                owned.add(name)
            continue
        owner = id(module.get_submodule(name.rpartition(".")[0]))
        if owner in in_stages or owner not in in_layers:
            owned.add(name)
    return owned


def _to_cpu(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, Tensor) else value


@contextmanager
def _side_effect_free(modules: Iterable[nn.Module], device: torch.device) -> Iterator[None]:
    """A forward run for its shapes or its time only: afterwards the modules' buffers (BatchNorm's running
    statistics and batch count) and the CPU's and ``device``'s random number generators are as before.

    The forward updates copies of the buffers, and the modules get their own tensors back untouched: writing the
    old values back in place would change tensors that the forward's autograd graph saved (torch's pipelining
    differentiates the shape-finding forward too)."""
    swapped: list[tuple[nn.Module, str, Tensor]] = []
    cuda = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else []
    )
    try:
        for module in modules:
            for owner in module.modules():
                for name, buffer in list(owner.named_buffers(recurse=False)):
                    if buffer.device.type != "meta":
                        setattr(owner, name, buffer.clone())
                        swapped.append((owner, name, buffer))
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        for owner, name, buffer in reversed(swapped):  # reversed: a module listed twice gets its own tensor
            setattr(owner, name, buffer)


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; the gradient it passes back is contiguous."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


class _Stage(nn.Module):
    """What a ``PipelineStage`` runs: the stage's layers, with two guards around them.

    * torch's ``PipelineStage`` learns its activations' shapes from one forward before the first micro-batch (on
      the real micro-batch in the first stage, on uninitialised memory in later ones, in training mode). That
      forward is side-effect free here: a BatchNorm in a later stage took running statistics from garbage (NaN
      after fit), and every BatchNorm counted one batch too many and dropout drew random numbers for it.
    * The gradient a later stage sends back is contiguous: a first layer that transposes its input (a Conv1d
      over ``(B, T, C)``) gives a strided input gradient, from which torch builds the previous stage's receive
      buffer, and gloo refuses to send a strided tensor.

    Parameter names are unchanged: the strategy keeps the unwrapped stage modules and their names.
    """

    def __init__(self, layers: nn.Module, first: bool, device: torch.device) -> None:
        super().__init__()
        self.layers, self.first, self.device = layers, first, device
        self._shapes_known = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.first and x.requires_grad:
            x = _ContiguousGrad.apply(x)
        if self._shapes_known:
            return self.layers(x)
        self._shapes_known = True
        with _side_effect_free([self.layers], self.device):
            return self.layers(x)


def _one_tensor_out(index: int) -> Callable[[nn.Module, Any, Any], None]:
    def check(layer: nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, Tensor):
            raise TypeError(
                f"pipeline_layers()[{index}] ({type(layer).__name__}) returned a {type(output).__name__}, but a "
                "pipelined layer must return one tensor, the next layer's only input. Return the tensor alone, or "
                "list a small wrapper module that calls the layer and keeps the tensor."
            )

    return check


def _recorded_input(stage: Any) -> tuple[tuple[int, ...], torch.dtype] | None:
    """Shape and dtype of a PipelineStage's first input, as recorded on its first step.

    Reads ``torch.distributed.pipelining`` internals, which changed between releases (checked against torch
    2.11 and 2.13): the receive buffers of micro-batch 0.
    """
    info = getattr(stage, "args_recv_info", {}).get(0)
    if info:
        first = info[0]
        buf = getattr(first, "buffer", None)
        if isinstance(buf, Tensor):
            return tuple(buf.shape), buf.dtype
        meta = getattr(first, "tensor_meta", None)
        if meta is not None and hasattr(meta, "shape"):
            return tuple(meta.shape), meta.dtype
    return None


__all__ = ["SCHEDULES", "PipelineStrategy"]
