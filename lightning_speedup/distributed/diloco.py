"""DiLoCo as a Lightning strategy: inner steps with the user's optimizer, an outer Nesterov step every H steps.

DiLoCo (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
2023) keeps one global copy ``theta`` of the parameters. Each process runs ``sync_every`` (H)
steps of the user's optimizer (AdamW in the paper) from ``theta``; then the *pseudo-gradient*
``theta - theta_i`` is averaged over processes and an outer optimizer (SGD, lr 0.7, Nesterov
momentum 0.9 in the paper) updates ``theta``, and every process restarts from it. The inner
optimizer state is kept across rounds. Buffers (BatchNorm statistics) are averaged at each sync.

The pseudo-gradient is small and centred, so it compresses well (``compress="bf16"`` halves the
bytes, ``"int8"`` quarters them). With outer SGD at lr 1 and no momentum, DiLoCo is local SGD.

Evaluation and checkpoints use the exact average of the processes' current parameters (at a sync
boundary that is ``theta`` itself); the final model after ``fit`` is ``theta`` after a last outer
step on whatever inner steps remain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_speedup._compat import StrategyRegistryType
from lightning_speedup._registry import registered_strategy
from lightning_speedup._validation import check_bool, check_float, check_int
from lightning_speedup.distributed.averaging import ParameterAveragingStrategy
from lightning_speedup.distributed.collectives import Traffic, average_
from lightning_speedup.distributed.compression import check_compression

OuterOptimizerFactory = Callable[[list[Tensor]], Optimizer]
PAPER_OUTER_LR, PAPER_OUTER_MOMENTUM = 0.7, 0.9


@registered_strategy
class DiLoCoStrategy(ParameterAveragingStrategy):
    """DiLoCo: ``sync_every`` inner steps, then an outer optimizer step on the averaged pseudo-gradient.

    Args:
        sync_every: inner optimizer steps per round (H).
        outer_optimizer: "sgd" (configured by ``outer_lr``, ``outer_momentum``, ``nesterov``), or a callable
            that builds any ``torch.optim.Optimizer`` over a list of tensors (float32, or float64 for 64-bit training) (then leave the three
            ``outer_*`` arguments unset).
        outer_lr: outer learning rate (default 0.7, the paper's).
        outer_momentum: outer momentum (default 0.9).
        nesterov: Nesterov momentum (default True; needs ``outer_momentum > 0``).
        compress: "none", "bf16", "fp16" or "int8": encoding of the averaged pseudo-gradient.
        warmup_steps: plain parameter averaging after each of the first ``warmup_steps`` steps (the paper
            starts from a model pre-trained with DDP; this is the in-run equivalent).
        **kwargs: ``hierarchical``, ``bucket_cap_mb``, ``consensus_every``, ``log_metrics`` and the
            ``DDPStrategy`` launch arguments, see :class:`ParameterAveragingStrategy`.

    Raises:
        ValueError: ``sync_every`` < 1, ``outer_lr`` <= 0, ``outer_momentum`` outside [0, 1), Nesterov without
            momentum, ``outer_*`` given together with a callable ``outer_optimizer``, an unknown optimizer name or
            compression; in ``setup``: more than one inner optimizer, ``sync_batchnorm=True``.

    Example::

        trainer = L.Trainer(devices=8, num_nodes=4, strategy="diloco")
        trainer = L.Trainer(strategy=DiLoCoStrategy(sync_every=100, outer_lr=0.7, outer_momentum=0.9))
    """

    def __init__(
        self,
        sync_every: int = 100,
        outer_optimizer: str | OuterOptimizerFactory = "sgd",
        outer_lr: float | None = None,
        outer_momentum: float | None = None,
        nesterov: bool | None = None,
        compress: str = "none",
        warmup_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        check_int("sync_every", sync_every, 1, "inner steps per outer step")
        check_int("warmup_steps", warmup_steps, 0)
        check_compression(compress)
        if callable(outer_optimizer):
            given = [
                k
                for k, v in (
                    ("outer_lr", outer_lr),
                    ("outer_momentum", outer_momentum),
                    ("nesterov", nesterov),
                )
                if v is not None
            ]
            if given:
                raise ValueError(
                    f"{given} configure outer_optimizer='sgd' only; a callable outer_optimizer sets its own "
                    "hyper-parameters. Drop them or pass outer_optimizer='sgd'."
                )
        elif outer_optimizer != "sgd":
            raise ValueError(
                f"outer_optimizer must be 'sgd' or a callable (list of tensors -> torch.optim.Optimizer), "
                f"got {outer_optimizer!r}."
            )
        lr = PAPER_OUTER_LR if outer_lr is None else outer_lr
        momentum = PAPER_OUTER_MOMENTUM if outer_momentum is None else outer_momentum
        momentum = check_float("outer_momentum", momentum, 0, above=False, hint="Use a value in [0, 1).")
        use_nesterov = (momentum > 0) if nesterov is None else nesterov
        lr = check_float("outer_lr", lr, 0)
        if nesterov is not None:
            check_bool("nesterov", nesterov)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"outer_momentum must be in [0, 1), got {momentum}.")
        if use_nesterov and momentum == 0:
            raise ValueError(
                "nesterov=True needs outer_momentum > 0; pass nesterov=False for plain outer SGD."
            )
        super().__init__(**kwargs)
        self.sync_every = sync_every
        self.outer_optimizer = outer_optimizer
        self.outer_lr, self.outer_momentum, self.nesterov = lr, momentum, use_nesterov
        self.compress = compress
        self.warmup_steps = warmup_steps
        self._outer: list[Tensor] | None = None
        self._outer_opt: Optimizer | None = None

    @override
    def _inactive_reason(self, total_steps: int, start_step: int) -> str | None:
        first_outer = (max(self.warmup_steps, start_step) // self.sync_every + 1) * self.sync_every
        if first_outer <= total_steps:
            return None
        return (
            f"the run ends at optimizer step {total_steps}, before the first outer step (step {first_outer}; "
            f"sync_every={self.sync_every}, warmup_steps={self.warmup_steps}), so the only outer step is the "
            "final one at the end of fit. Lower sync_every or train longer."
        )

    @override
    def _on_setup(self) -> None:
        assert self._params is not None
        self._params.pack()
        # The global model is kept in at least float32 whatever the training precision: it accumulates small
        # outer steps that bf16 would round away.
        self._outer = [
            b.detach().to(torch.promote_types(b.dtype, torch.float32), copy=True)
            for b in self._params.buckets
        ]
        if callable(self.outer_optimizer):
            self._outer_opt = self.outer_optimizer(self._outer)
        else:
            self._outer_opt = torch.optim.SGD(
                self._outer, lr=self.outer_lr, momentum=self.outer_momentum, nesterov=self.nesterov
            )

    @override
    def _after_step(self) -> Traffic:
        if self.algorithm_size == 1:
            return Traffic()
        if self._step <= self.warmup_steps:
            traffic = self._average_all()
            self._reset_outer_to_params()
            return traffic
        if self._step % self.sync_every == 0:
            return self._outer_step()
        return Traffic()

    @torch.no_grad()
    def _reset_outer_to_params(self) -> None:
        assert self._params is not None and self._outer is not None
        for theta, flat in zip(self._outer, self._params.buckets, strict=True):
            theta.copy_(flat)

    @torch.no_grad()
    def _outer_step(self) -> Traffic:
        assert self._params is not None and self._buffers is not None and self._comm is not None
        assert self._outer is not None and self._outer_opt is not None
        self._finish_comm()
        self._params.pack()
        self._buffers.pack()
        for theta, flat in zip(self._outer, self._params.buckets, strict=True):
            # pseudo-gradient: how far this process moved, with the sign of a gradient
            theta.grad = theta - flat.to(theta.dtype)
        grads = [theta.grad for theta in self._outer]
        traffic = average_(grads, self._comm, self.compress)  # type: ignore[arg-type]
        self._outer_opt.step()
        for theta, flat in zip(self._outer, self._params.buckets, strict=True):
            flat.copy_(theta)
            theta.grad = None
        traffic += self._average_buffers()
        self._params.unpack()
        self._buffers.unpack()
        self._in_consensus = True
        return traffic

    @override
    def _final_sync(self) -> Traffic:
        return self._outer_step()

    @override
    def _shared_state(self) -> dict[str, Any]:
        assert self._outer_opt is not None
        return {"outer_params": self._outer, "outer_optimizer": self._outer_opt.state_dict()}

    @override
    def _load_shared_state(self, state: dict[str, Any]) -> None:
        assert self._outer is not None and self._outer_opt is not None
        if "outer_params" not in state:
            return
        for dst, src in zip(self._outer, state["outer_params"], strict=True):
            dst.copy_(src)
        self._outer_opt.load_state_dict(state["outer_optimizer"])

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistryType) -> None:
        strategy_registry.register(
            "diloco",
            cls,
            description=(
                "DiLoCo: 100 inner steps of the module's optimizer, then outer SGD (lr 0.7, Nesterov momentum 0.9) "
                "on the averaged pseudo-gradient"
            ),
            sync_every=100,
        )
