"""Gossip (decentralized) SGD as a Lightning strategy: every step, mix parameters with graph neighbours only.

D-PSGD (Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms?", NeurIPS
2017): each process takes a local optimizer step and averages its parameters with its neighbours
on a sparse graph (:mod:`~lightning_speedup.distributed.topology`). The bytes each process sends
per step do not grow with the number of processes (2 messages on a ring, 1 on the one-peer
exponential graph of Ying et al. 2021 / SGP, Assran et al. 2019), against a global all-reduce
whose latency term grows with it. The parameter mean follows the averaged-gradient trajectory;
processes disagree by a *consensus distance* that the graph's spectral gap keeps bounded.

``overlap=True`` sends the parameters as they are at the start of a step and mixes what arrives
at its end, so the exchange runs during the forward and backward pass (the original D-PSGD
update ``x <- W x - lr g(x)``). ``overlap=False`` mixes after the local step, blocking.

The final model after ``fit`` is the exact global average (one all-reduce); validation and
checkpoints see the exact average too, while training continues from each process's own copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_speedup._compat import StrategyRegistryType
from lightning_speedup._registry import registered_strategy
from lightning_speedup._validation import check_bool, check_int
from lightning_speedup.distributed.averaging import ParameterAveragingStrategy
from lightning_speedup.distributed.collectives import NeighborExchange, Traffic, block_mean_
from lightning_speedup.distributed.compression import check_compression
from lightning_speedup.distributed.topology import TOPOLOGIES, Topology


@registered_strategy
class GossipSGDStrategy(ParameterAveragingStrategy):
    """Gossip SGD: after every ``gossip_every`` local steps, average parameters and buffers with neighbours.

    Args:
        topology: "ring", "torus" (square number of processes/blocks) or "exponential" (one peer per step).
        gossip_every: local optimizer steps between mixing rounds.
        overlap: run the exchange concurrently with the next step's compute (mix applied one step late).
        compress: "none", "bf16", "fp16" or "int8": encoding of the exchanged parameters. The mean over
            processes stays exact; the consensus distance levels off at the encoding's error.
        **kwargs: ``hierarchical``, ``bucket_cap_mb``, ``consensus_every``, ``log_metrics`` and the
            ``DDPStrategy`` launch arguments, see :class:`ParameterAveragingStrategy`.

    Raises:
        ValueError: unknown ``topology`` or ``compress``, ``gossip_every`` < 1; in ``setup``: a topology that does
            not fit the number of processes (torus on a non-square count), more than one optimizer,
            ``sync_batchnorm=True``.

    Example::

        trainer = L.Trainer(devices=8, num_nodes=8, strategy="gossip_exponential")
        trainer = L.Trainer(strategy=GossipSGDStrategy(topology="torus", overlap=True, hierarchical=True))
    """

    def __init__(
        self,
        topology: str = "ring",
        gossip_every: int = 1,
        overlap: bool = True,
        compress: str = "none",
        **kwargs: Any,
    ) -> None:
        if topology not in TOPOLOGIES:
            raise ValueError(f"Unknown topology {topology!r}; choose one of {list(TOPOLOGIES)}.")
        check_int("gossip_every", gossip_every, 1)
        check_bool("overlap", overlap)
        check_compression(compress)
        super().__init__(**kwargs)
        self.topology = topology
        self.gossip_every = gossip_every
        self.overlap = overlap
        self.compress = compress
        self._exchange: NeighborExchange | None = None
        self._pending_traffic = Traffic()

    @override
    def _validate(self, algorithm_size: int) -> None:
        Topology(self.topology, algorithm_size)  # raises for a torus on a non-square count

    @override
    def _on_setup(self) -> None:
        assert self._comm is not None
        self._exchange = NeighborExchange(Topology(self.topology, self._comm.size), self._comm, self.compress)

    def _flats(self) -> list[Tensor]:
        assert self._params is not None and self._buffers is not None
        return [*self._params.buckets, *self._buffers.buckets]

    def _pack(self) -> None:
        assert self._params is not None and self._buffers is not None
        self._params.pack()
        self._buffers.pack()

    def _unpack(self) -> None:
        assert self._params is not None and self._buffers is not None
        self._params.unpack()
        self._buffers.unpack()

    def _due(self, step_index: int) -> bool:
        return step_index % self.gossip_every == 0

    @torch.no_grad()
    def _start(self, step_index: int) -> Traffic:
        assert self._exchange is not None and self._buffers is not None and self._comm is not None
        self._pack()
        # hierarchical: a block gossips as one member, so its processes' own buffers (BatchNorm statistics) are
        # averaged over the block first; then every shard the block sends holds the block's mean
        traffic = block_mean_(self._buffers.buckets, self._comm)
        if traffic.total:
            self._buffers.unpack()
        return traffic + self._exchange.start(self._flats(), step_index)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        # With overlap, the round for the first step is sent before it: on resume this re-sends exactly what
        # the interrupted run had in flight (each process's current parameters).
        if self._exchange is not None and self.overlap and self.algorithm_size > 1 and self._due(self._step):
            self._pending_traffic = self._start(self._step)

    @override
    @torch.no_grad()
    def _after_step(self) -> Traffic:
        if self.algorithm_size == 1:
            return Traffic()
        assert self._exchange is not None
        step_index = self._step - 1  # the step that just finished
        traffic = Traffic()
        if not self.overlap:
            if self._due(step_index):
                traffic += self._start(step_index)
                traffic += self._exchange.apply_(self._flats())
                self._unpack()
            return traffic
        if self._exchange.pending:
            traffic += self._pending_traffic
            self._pending_traffic = Traffic()
            self._pack()
            traffic += self._exchange.apply_(self._flats())
            self._unpack()
        if self._due(self._step):
            self._pending_traffic = self._start(self._step)
        return traffic

    @override
    def _finish_comm(self) -> None:
        if self._exchange is not None:
            self._exchange.wait()

    @override
    def _final_sync(self) -> Traffic:
        if self._exchange is not None:
            self._exchange.discard()  # mixing preserves the mean: the exact average below makes it moot
        return self._average_all()

    @override
    def teardown(self) -> None:
        if self._exchange is not None:
            self._exchange.discard()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: StrategyRegistryType) -> None:
        strategy_registry.register(
            "gossip_ring",
            cls,
            description="Gossip SGD on a ring: every step, average with the two neighbours (exchange overlapped)",
            topology="ring",
        )
        strategy_registry.register(
            "gossip_exponential",
            cls,
            description="Gossip SGD on the one-peer exponential graph: one message per step (exchange overlapped)",
            topology="exponential",
        )
