"""DDP with compressed gradient all-reduce, chosen by string: bf16, fp16 or PowerSGD.

The model is wrapped in ``DistributedDataParallel`` as usual (bucketing, overlap with the
backward pass) and a comm hook from :mod:`~lightning_speedup.distributed.hooks` replaces the
fp32 all-reduce: ``"bf16"``/``"fp16"`` halve the bytes; ``"powersgd"`` sends two thin rank-``r``
factors per weight matrix (Vogels et al., NeurIPS 2019). Lightning's ``DDPStrategy`` takes comm
hooks only as hand-built objects and registers them only on CUDA; these hooks register on any
device and run on gloo as well as NCCL.

PowerSGD's error feedback and warm-start memory differ per process and go into the checkpoint
(gathered on rank 0 under ``"lightning_speedup.distributed"``), so resume is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_speedup._compat import StrategyRegistryType
from lightning_speedup._process_group import CleanExitDDPStrategy
from lightning_speedup._registry import registered_strategy
from lightning_speedup._validation import check_bool, check_float, check_int
from lightning_speedup.distributed.averaging import (
    CHECKPOINT_KEY,
    _log_metric,
    check_ddp_kwargs,
    put_rank_states,
    run_total_steps,
)
from lightning_speedup.distributed.hooks import (
    LowPrecisionState,
    PowerSGDState,
    low_precision_hook,
    powersgd_hook,
)

COMPRESSIONS = ("bf16", "fp16", "powersgd")


def _check_backend_sums_bf16() -> None:
    """Raise a clear error if this backend cannot all-reduce bfloat16 (old gloo builds)."""
    try:
        dist.all_reduce(torch.zeros(1, dtype=torch.bfloat16))
    except RuntimeError as err:
        raise ValueError(
            f"The {dist.get_backend()} backend of this PyTorch build cannot all-reduce bfloat16 ({err}); "
            "use CompressedDDPStrategy(compression='fp16') on this backend, or NCCL."
        ) from err


@registered_strategy
class CompressedDDPStrategy(CleanExitDDPStrategy):
    """DDP whose gradient all-reduce goes through a compression comm hook.

    The PowerSGD arguments (``rank`` to ``cuda_graphs``) default to ``None``, which means PowerSGD's default
    (given in brackets); with ``compression="bf16"`` or ``"fp16"`` they must be left unset.

    Args:
        compression: "bf16", "fp16" (16-bit all-reduce) or "powersgd".
        rank: PowerSGD approximation rank per matrix (4).
        start_iter: PowerSGD: plain fp32 all-reduce for the first ``start_iter`` iterations (100).
        min_compression_rate: PowerSGD: compress an ``n x m`` matrix only if ``n m / (rank (n + m))`` reaches
            this (2.0).
        error_feedback: PowerSGD: add each process's last compression error to its next gradient (True).
        warm_start: PowerSGD: reuse the previous ``Q`` as the start of the power iteration (True).
        seed: PowerSGD: seed of the random initial ``Q`` (0).
        cuda_graphs: PowerSGD on CUDA: replay the compression as CUDA graphs once DDP's buckets are
            stable (``PowerSGDState.cuda_graphs``); ``False`` runs it eagerly every step (True).
        log_metrics: log ``dist/bytes_sent`` (gradient bytes this process sent) per optimizer step.
        gradient_as_bucket_view: ``True`` here (DDP's default is ``False``): parameters' ``.grad`` are views of
            the communication buckets, which saves a copy of every gradient into the buckets and back each step,
            and one gradient-sized buffer.
        **kwargs: everything ``DDPStrategy`` takes (``start_method``, ``find_unused_parameters``, ...),
            except its own comm-hook arguments; those left at their defaults (as LightningCLI passes them) are
            ignored.

    Raises:
        ValueError: an unknown ``compression``, a PowerSGD argument given with ``compression`` "bf16" or "fp16"
            (it would do nothing), ``rank`` < 1, ``start_iter`` < 0, ``min_compression_rate`` < 0, a non-int ``seed``,
            a keyword that neither ``DDPStrategy`` nor ``DistributedDataParallel`` takes, DDP comm-hook arguments
            (``ddp_comm_hook``, ``ddp_comm_state``, ``ddp_comm_wrapper``, ``model_averaging_period``) that would
            conflict with the chosen hook; in ``setup``: bf16 on a backend that cannot sum bfloat16.

    Example::

        trainer = L.Trainer(devices=8, strategy="ddp_powersgd")
        trainer = L.Trainer(strategy=CompressedDDPStrategy(compression="powersgd", rank=8, start_iter=500))
    """

    def __init__(
        self,
        compression: str = "bf16",
        rank: int | None = None,
        start_iter: int | None = None,
        min_compression_rate: float | None = None,
        error_feedback: bool | None = None,
        warm_start: bool | None = None,
        seed: int | None = None,
        cuda_graphs: bool | None = None,
        log_metrics: bool = True,
        gradient_as_bucket_view: bool = True,
        **kwargs: Any,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"Unknown compression {compression!r}; choose one of {list(COMPRESSIONS)}.")
        # PowerSGD's arguments default to None ("not given"), so that one given with another compression is refused
        # even at PowerSGD's default value (LightningCLI passes them all, at None).
        powersgd_only = (("rank", rank), ("start_iter", start_iter), ("min_compression_rate", min_compression_rate),
                         ("error_feedback", error_feedback), ("warm_start", warm_start), ("seed", seed),
                         ("cuda_graphs", cuda_graphs))  # fmt: skip
        given = [name for name, value in powersgd_only if value is not None]
        if given and compression != "powersgd":
            raise ValueError(
                f"CompressedDDPStrategy(compression={compression!r}): {given} configure PowerSGD only and would "
                "do nothing. Drop them or pass compression='powersgd'."
            )
        # None is PowerSGDState's default for the field of the same name.
        default = {f.name: f.default for f in dataclasses.fields(PowerSGDState)}
        rank = check_int("rank (PowerSGD approximation rank)", default["rank"] if rank is None else rank, 1)
        start_iter = check_int("start_iter", default["start_iter"] if start_iter is None else start_iter, 0)
        min_compression_rate = check_float(
            "min_compression_rate (compress a matrix only if it shrinks by this factor; 0 = all)",
            default["min_compression_rate"] if min_compression_rate is None else min_compression_rate, 0,
            above=False,
        )  # fmt: skip
        error_feedback = check_bool(
            "error_feedback", default["error_feedback"] if error_feedback is None else error_feedback
        )
        warm_start = check_bool("warm_start", default["warm_start"] if warm_start is None else warm_start)
        cuda_graphs = check_bool(
            "cuda_graphs", default["cuda_graphs"] if cuda_graphs is None else cuda_graphs
        )
        seed = check_int(
            "seed",
            default["seed"] if seed is None else seed,
            minimum=None,
            meaning="of PowerSGD's random initial Q",
        )
        check_bool("log_metrics", log_metrics)
        check_bool("gradient_as_bucket_view", gradient_as_bucket_view)
        kwargs = check_ddp_kwargs(type(self), kwargs)
        clashing = sorted(
            k
            for k in ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper", "model_averaging_period")
            if k in kwargs
        )
        if clashing:
            raise ValueError(
                f"CompressedDDPStrategy installs its own comm hook; {clashing} would conflict. Use DDPStrategy "
                "for a hand-built hook."
            )
        # Gradients as views of DDP's buckets: the hook then writes the averaged gradient where the optimizer
        # reads it, instead of DDP copying every gradient into its bucket and back (two passes over the model).
        super().__init__(gradient_as_bucket_view=gradient_as_bucket_view, **kwargs)
        self.compression = compression
        self.powersgd_rank = rank
        self.start_iter = start_iter
        self.min_compression_rate = min_compression_rate
        self.error_feedback = error_feedback
        self.warm_start = warm_start
        self.seed = seed
        self.cuda_graphs = cuda_graphs
        self.log_metrics = log_metrics
        self._hook_state: LowPrecisionState | PowerSGDState | None = None
        # rank 0's comm_stats, in a launching process that did not train (start_method spawn or fork)
        self._worker_comm_stats: dict[str, float] | None = None
        self._resume: dict[str, Any] | None = None
        self._bytes_reported = 0
        self._hook_state_loaded = False

    @override
    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        if self.world_size == 1:
            rank_zero_warn(
                f"CompressedDDPStrategy(compression={self.compression!r}) is running on a single process (world "
                "size 1): there is no all-reduce to compress; this is plain single-device training."
            )
        if self.compression == "bf16" and dist.get_backend() != "nccl":
            _check_backend_sums_bf16()
        if self.compression == "powersgd":
            self._hook_state = PowerSGDState(
                params=list(self.model.module.parameters()),
                rank=self.powersgd_rank,
                start_iter=self.start_iter,
                min_compression_rate=self.min_compression_rate,
                error_feedback=self.error_feedback,
                warm_start=self.warm_start,
                seed=self.seed,
                cuda_graphs=self.cuda_graphs,
            )
            self.model.register_comm_hook(self._hook_state, powersgd_hook)
        else:
            self._hook_state = LowPrecisionState(self.compression)
            self.model.register_comm_hook(self._hook_state, low_precision_hook)
        self._bytes_reported = 0
        self._hook_state_loaded = False
        self._worker_comm_stats = None

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        if self.compression != "powersgd":
            return
        trainer = self.lightning_module.trainer
        if isinstance(self._hook_state, PowerSGDState) and not self._hook_state_loaded:
            # start_iter counts the trainer's optimizer steps (one hook call each): a second fit on the same
            # Trainer, or a resume from a checkpoint without PowerSGD state (a DDP run's), goes on from there
            # instead of running start_iter more fp32 steps. (A PowerSGD checkpoint sets it when loaded.)
            self._hook_state.iteration = trainer.global_step
        total = run_total_steps(trainer)
        if total is not None and total <= self.start_iter:
            rank_zero_warn(
                f"CompressedDDPStrategy(compression='powersgd') will not act in this run: it all-reduces in fp32 "
                f"for the first start_iter={self.start_iter} iterations and the run has {total} optimizer steps, "
                "so this is plain DDP. Lower start_iter or train longer."
            )

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Any,
        model: LightningModule | Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.log_metrics and self._hook_state is not None:
            sent = self._hook_state.bytes_sent - self._bytes_reported
            self._bytes_reported = self._hook_state.bytes_sent
            _log_metric(self.lightning_module, "dist/bytes_sent", float(sent))
        return output

    @property
    def comm_stats(self) -> dict[str, float]:
        """Totals of the current (or last) fit: gradient bytes sent by this process (and PowerSGD's compression
        ratio). Each ``fit`` starts them from zero (``setup`` registers a fresh hook state). After a
        ``start_method="spawn"`` (or ``"fork"``) fit, the launching process holds rank 0's."""
        if self._worker_comm_stats is not None:
            return dict(self._worker_comm_stats)
        state = self._hook_state
        stats = {"bytes_sent": float(state.bytes_sent) if state is not None else 0.0}
        if isinstance(state, PowerSGDState) and state.numel_after:
            stats["compression_ratio"] = state.numel_before / state.numel_after
        return stats

    # ------------------------------------------------------------------ checkpoint: PowerSGD state per process
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if isinstance(self._hook_state, PowerSGDState) and "optimizer_states" in checkpoint:
            put_rank_states(checkpoint, self, self._hook_state.state_dict())
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        super().load_model_state_dict(checkpoint, strict=strict)
        self._resume = checkpoint.get(CHECKPOINT_KEY)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        super().load_optimizer_state_dict(checkpoint)
        resume, self._resume = self._resume, None
        if resume is None or not isinstance(self._hook_state, PowerSGDState):
            return
        if resume.get("strategy") != type(self).__name__ or resume["world_size"] != self.world_size:
            rank_zero_warn(
                "The checkpoint's PowerSGD state does not fit this run (another strategy or world size): "
                "error feedback and warm start begin empty."
            )
            return
        self._hook_state.load_state_dict(resume["ranks"][self.global_rank])
        self._hook_state_loaded = True

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistryType) -> None:
        strategy_registry.register(
            "ddp_bf16_compress",
            cls,
            description="DDP with gradients all-reduced in bfloat16 (half the bytes)",
            compression="bf16",
        )
        strategy_registry.register(
            "ddp_powersgd",
            cls,
            description="DDP with PowerSGD gradient compression (rank 4, error feedback, fp32 for the first 100 steps)",
            compression="powersgd",
            rank=4,
        )
