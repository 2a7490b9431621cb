"""Local SGD as a Lightning strategy: local optimizer steps, parameters averaged every ``sync_every`` steps.

Each process runs the user's optimizer on its own data shard with no gradient all-reduce; every
``sync_every`` optimizer steps all processes replace their parameters (and floating-point buffers,
e.g. BatchNorm statistics) with the global average. Communication drops by a factor of
``sync_every`` against DDP. ``warmup_steps`` averages every step first, which is post-local SGD
(Lin, Stich, Patel and Jaggi, "Don't Use Large Mini-Batches, Use Local SGD", ICLR 2020); the
algorithm itself goes back to Zinkevich et al. 2010 and Stich, "Local SGD Converges Fast and
Communicates Little", ICLR 2019.

With ``compress`` the *change since the last sync* is averaged in bf16/fp16/int8 (what is sent is
small and centred); the last synchronized parameters are kept as the reference for that.

``sync_every=1`` with a linear optimizer (SGD, with or without momentum and weight decay) gives the
same parameters as DDP up to floating-point rounding, since averaging commutes with a linear
update; with Adam the per-process second moments make it a different algorithm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_speedup._compat import StrategyRegistryType
from lightning_speedup._registry import registered_strategy
from lightning_speedup._validation import check_int
from lightning_speedup.distributed.averaging import ParameterAveragingStrategy
from lightning_speedup.distributed.collectives import Traffic
from lightning_speedup.distributed.compression import check_compression


@registered_strategy
class LocalSGDStrategy(ParameterAveragingStrategy):
    """Local SGD / post-local SGD: average parameters and buffers every ``sync_every`` optimizer steps.

    Args:
        sync_every: optimizer steps between averagings (``H``). 1 averages every step.
        warmup_steps: average after every one of the first ``warmup_steps`` steps (post-local SGD).
        compress: "none", "bf16", "fp16" or "int8": encoding of the averaged parameter change.
        **kwargs: ``hierarchical``, ``bucket_cap_mb``, ``consensus_every``, ``log_metrics`` and the
            ``DDPStrategy`` launch arguments, see :class:`ParameterAveragingStrategy`.

    Raises:
        ValueError: ``sync_every`` < 1, ``warmup_steps`` < 0, an unknown ``compress``; in ``setup``: more
            than one optimizer, ``sync_batchnorm=True``, or a hierarchical block that does not divide the
            world size.

    Example::

        trainer = L.Trainer(accelerator="gpu", devices=8, num_nodes=4, strategy="local_sgd")
        trainer = L.Trainer(strategy=LocalSGDStrategy(sync_every=32, warmup_steps=500, hierarchical=True))
    """

    def __init__(
        self, sync_every: int = 16, warmup_steps: int = 0, compress: str = "none", **kwargs: Any
    ) -> None:
        check_int("sync_every", sync_every, 1, "optimizer steps between averagings")
        check_int("warmup_steps", warmup_steps, 0)
        check_compression(compress)
        super().__init__(**kwargs)
        self.sync_every = sync_every
        self.warmup_steps = warmup_steps
        self.compress = compress
        self._reference: list[Tensor] | None = None

    @override
    def _on_setup(self) -> None:
        assert self._params is not None
        if self.compress != "none":
            self._params.pack()
            self._reference = self._params.clone_buckets()

    @override
    def _inactive_reason(self, total_steps: int, start_step: int) -> str | None:
        if start_step < min(self.warmup_steps, total_steps):
            return None
        first_sync = (start_step // self.sync_every + 1) * self.sync_every
        if first_sync <= total_steps:
            return None
        return (
            f"the run ends at optimizer step {total_steps}, before the first averaging (step {first_sync}; "
            f"sync_every={self.sync_every}), so the processes are averaged only once, at the end of fit. Lower "
            "sync_every or train longer."
        )

    def _is_sync_step(self, step: int) -> bool:
        return step <= self.warmup_steps or step % self.sync_every == 0

    @override
    def _after_step(self) -> Traffic:
        if self.algorithm_size == 1 or not self._is_sync_step(self._step):
            return Traffic()
        return self._sync()

    @torch.no_grad()
    def _sync(self) -> Traffic:
        traffic = self._average_all(self.compress, self._reference)
        if self._reference is not None:
            assert self._params is not None
            for ref, flat in zip(self._reference, self._params.buckets, strict=True):
                ref.copy_(flat)
        return traffic

    @override
    def _final_sync(self) -> Traffic:
        return self._sync()

    @override
    def _shared_state(self) -> dict[str, Any]:
        return {"reference": self._reference}

    @override
    def _load_shared_state(self, state: dict[str, Any]) -> None:
        ref = state.get("reference")
        if self._reference is not None and ref is not None:
            for dst, src in zip(self._reference, ref, strict=True):
                dst.copy_(src)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistryType) -> None:
        strategy_registry.register(
            "local_sgd",
            cls,
            description="Local SGD: no per-step all-reduce; parameters and buffers averaged every 16 optimizer steps",
            sync_every=16,
        )
