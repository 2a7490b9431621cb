"""Communication graphs for gossip (decentralized) SGD: who mixes with whom at each step.

Gossip SGD (D-PSGD, Lian et al., NeurIPS 2017) replaces the global all-reduce with averaging over
a sparse graph: node ``i`` sets ``x_i <- sum_j W_ij x_j`` for a doubly stochastic mixing matrix
``W``, so the mean over nodes is preserved while disagreement shrinks by the graph's spectral gap.

- ``ring``: each node mixes with its two neighbours, weights 1/3 (1/2 for two nodes).
- ``torus``: a ``k x k`` grid with wrap-around, four neighbours, uniform weights; needs a square
  world size.
- ``exponential``: the one-peer exponential graph (Ying et al., "Exponential Graph is Provably
  Efficient for Decentralized Deep Training", NeurIPS 2021; used by SGP, Assran et al. 2019):
  at step ``t`` node ``i`` sends to ``i + 2^(t mod log2 n)`` and receives from ``i - 2^(...)``,
  weights 1/2. One message per step, and for a power-of-two ``n`` exact consensus after
  ``log2 n`` steps.

All weights are uniform over a node's distinct closed neighbourhood of a regular graph, so every
``W`` is doubly stochastic; :func:`mixing_matrix` builds the dense matrix for tests and analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

TopologyName = Literal["ring", "torus", "exponential"]
TOPOLOGIES: tuple[str, ...] = ("ring", "torus", "exponential")


@dataclass(frozen=True)
class Mixing:
    """One node's part of one mixing step.

    ``send_to``: ranks this node sends its tensors to. ``recv_from``: (rank, weight) pairs it receives
    from. ``self_weight``: its own weight; ``self_weight + sum(weights) == 1``.
    """

    send_to: tuple[int, ...]
    recv_from: tuple[tuple[int, float], ...]
    self_weight: float


@dataclass(frozen=True)
class Topology:
    """A (possibly time-varying) communication graph over ``world_size`` nodes.

    Raises:
        ValueError: for an unknown name, a world size < 1, or a torus on a non-square world size.
    """

    name: str
    world_size: int

    def __post_init__(self) -> None:
        if self.name not in TOPOLOGIES:
            raise ValueError(f"Unknown topology {self.name!r}; choose one of {list(TOPOLOGIES)}.")
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}.")
        if self.name == "torus":
            k = math.isqrt(self.world_size)
            if k * k != self.world_size:
                lower, upper = k * k, (k + 1) * (k + 1)
                raise ValueError(
                    f"topology='torus' needs a square number of nodes (k x k grid), got {self.world_size}. "
                    f"Use {lower} or {upper} nodes, or topology='ring' / 'exponential', which fit any count."
                )

    @property
    def period(self) -> int:
        """Number of distinct mixing steps before the schedule repeats."""
        if self.name == "exponential":
            return max(1, math.ceil(math.log2(self.world_size))) if self.world_size > 1 else 1
        return 1

    def degree(self, step: int = 0) -> int:
        """Messages each node sends at ``step`` (the same for every node)."""
        return len(self.mixing(0, step).send_to)

    def mixing(self, rank: int, step: int) -> Mixing:
        """Node ``rank``'s senders, receivers and weights at optimizer step ``step``."""
        n = self.world_size
        if not 0 <= rank < n:
            raise ValueError(f"rank must be in [0, {n}), got {rank}.")
        if n == 1:
            return Mixing((), (), 1.0)
        if self.name == "exponential":
            hop = 2 ** (step % self.period)
            dst, src = (rank + hop) % n, (rank - hop) % n
            return Mixing((dst,), ((src, 0.5),), 0.5)
        neighbours = self._undirected_neighbours(rank)
        w = 1.0 / (len(neighbours) + 1)
        return Mixing(tuple(neighbours), tuple((j, w) for j in neighbours), w)

    def _undirected_neighbours(self, rank: int) -> list[int]:
        n = self.world_size
        if self.name == "ring":
            candidates = [(rank - 1) % n, (rank + 1) % n]
        else:  # torus
            k = math.isqrt(n)
            r, c = divmod(rank, k)
            candidates = [
                ((r - 1) % k) * k + c,
                ((r + 1) % k) * k + c,
                r * k + (c - 1) % k,
                r * k + (c + 1) % k,
            ]
        out: list[int] = []
        for j in candidates:  # small graphs fold neighbours together (ring of 2, 2x2 torus)
            if j != rank and j not in out:
                out.append(j)
        return out


def mixing_matrix(topology: Topology, step: int = 0) -> torch.Tensor:
    """The dense ``(n, n)`` float64 mixing matrix ``W`` with ``x_new = W @ x`` at ``step``."""
    n = topology.world_size
    w = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        m = topology.mixing(i, step)
        w[i, i] += m.self_weight
        for j, wij in m.recv_from:
            w[i, j] += wij
    return w
