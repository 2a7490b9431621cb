"""Split an ordered list of layers into contiguous pipeline stages, and place the stages on ranks.

The functional core of pipeline parallelism: no Lightning, no process groups. A stage is a contiguous
run of layers; the split minimises the largest stage cost (the classic linear-partition problem, solved
exactly by dynamic programming), where a layer's cost is its parameter count (``balance="params"``) or
its measured forward+backward time (``balance="time"``). Stages are placed on ranks loop-style, as
``torch.distributed.pipelining``'s looped schedules expect: stage ``s`` lives on pipeline rank ``s % p``;
the V-shaped schedules place two stages per rank in a V (rank ``r`` holds stages ``r`` and ``2p - 1 - r``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "StagePlan",
    "layer_param_counts",
    "layer_times",
    "partition_costs",
    "plan_stages",
    "theoretical_bubble",
]


@dataclass(frozen=True)
class StagePlan:
    """Which layers each stage holds and which pipeline rank runs it."""

    bounds: tuple[tuple[int, int], ...]  # per stage: [start, stop) layer indices
    pipeline_size: int
    costs: tuple[float, ...]  # per stage, in the unit of ``balance``
    params: tuple[int, ...]  # parameters per stage
    balance: str
    # "loop": stage s on rank s % p (GPipe, 1F1B, the interleaved schedules); "v": two stages per rank,
    # stage s on rank s for s < p, else 2p - 1 - s (the V-shaped schedules).
    placement: str = "loop"

    @property
    def num_stages(self) -> int:
        return len(self.bounds)

    def rank_of(self, stage: int) -> int:
        p = self.pipeline_size
        if self.placement == "v":
            return stage if stage < p else 2 * p - 1 - stage
        return stage % p

    def stages_of(self, rank: int) -> list[int]:
        return [s for s in range(self.num_stages) if self.rank_of(s) == rank]

    def describe(self, names: Sequence[str] | None = None) -> str:
        """One line per stage: rank, layers, parameters, cost."""
        unit = "s fwd+bwd" if self.balance == "time" else "params"
        lines = []
        for s, (a, b) in enumerate(self.bounds):
            which = f"{names[a]} .. {names[b - 1]}" if names else f"layers {a}..{b - 1}"
            cost = f"{self.costs[s] * 1e3:.2f} ms" if self.balance == "time" else f"{int(self.costs[s]):,}"
            lines.append(
                f"stage {s} on pipeline rank {self.rank_of(s)}: {b - a} layer(s) ({which}), "
                f"{self.params[s]:,} parameters, cost {cost} ({unit})"
            )
        return "\n".join(lines)


def partition_costs(costs: Sequence[float], num_parts: int) -> list[tuple[int, int]]:
    """Contiguous split of ``costs`` into ``num_parts`` non-empty parts minimising the largest part's sum.

    Exact dynamic programme, O(n^2 k); ties go to the earliest split, so the result is deterministic.

    Raises:
        ValueError: if there are fewer items than parts, or ``num_parts < 1``.
    """
    n = len(costs)
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}.")
    if n < num_parts:
        raise ValueError(
            f"Cannot split {n} layer(s) into {num_parts} pipeline stages: every stage needs at least one "
            "layer. Use fewer stages (pipeline_size x stages_per_rank) or declare finer layers."
        )
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: smallest max-part cost splitting the first i items into k parts
    best = [[inf] * (n + 1) for _ in range(num_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(num_parts + 1)]
    best[0][0] = 0.0
    for k in range(1, num_parts + 1):
        for i in range(k, n - (num_parts - k) + 1):
            for j in range(k - 1, i):
                cand = max(best[k - 1][j], prefix[i] - prefix[j])
                if cand < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = cand, j
    bounds: list[tuple[int, int]] = []
    i = n
    for k in range(num_parts, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    return bounds[::-1]


def layer_param_counts(layers: Sequence[nn.Module]) -> list[int]:
    """Parameters per layer, each shared parameter counted once (at its first layer)."""
    seen: set[int] = set()
    counts = []
    for layer in layers:
        n = 0
        for p in layer.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        counts.append(n)
    return counts


def layer_times(
    layers: Sequence[nn.Module],
    example: Tensor,
    device: torch.device,
    repeats: int = 3,
    materialize: Callable[[nn.Module, torch.device], nn.Module] | None = None,
) -> list[float]:
    """Median forward+backward seconds of each layer on ``device``, fed the previous layer's output.

    Layers are measured one at a time: ``materialize(layer, device)`` gives a copy of the layer on ``device``
    (allocating one that lives on the meta device), so a model too large for one device, or still on the CPU
    or the meta device, can be measured. Without it the layers are used as they are and must be on ``device``
    already. Gradients go to ``torch.autograd.grad``, never into ``.grad``, so measuring leaves the model
    untouched.
    """
    times: list[float] = []
    x = example.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for layer in layers:
        owned = materialize(layer, device) if materialize is not None else layer
        params = [p for p in owned.parameters() if p.requires_grad]
        samples = []
        out = x
        for _ in range(repeats + 1):  # the first call warms up (allocations, cuDNN choices)
            inp = x.detach().requires_grad_(x.is_floating_point())
            sync()
            t0 = time.perf_counter()
            out = owned(inp)
            targets = [t for t in (*params, inp) if t.requires_grad]
            if out.requires_grad and targets:
                torch.autograd.grad(out.float().sum(), targets, allow_unused=True)
            sync()
            samples.append(time.perf_counter() - t0)
        times.append(sorted(samples[1:])[len(samples[1:]) // 2])
        x = out.detach()
        if owned is not layer:
            del owned
    return times


def plan_stages(
    costs: Sequence[float],
    params: Sequence[int],
    num_stages: int,
    pipeline_size: int,
    balance: str,
    placement: str = "loop",
) -> StagePlan:
    """The stage plan for per-layer ``costs`` (and parameter counts, for the log)."""
    if placement not in ("loop", "v"):
        raise ValueError(f"placement must be 'loop' or 'v', got {placement!r}.")
    if placement == "v" and num_stages != 2 * pipeline_size:
        raise ValueError(
            f"placement='v' puts two stages on each process: num_stages must be 2 * pipeline_size "
            f"({2 * pipeline_size}), got {num_stages}."
        )
    bounds = partition_costs(costs, num_stages)
    return StagePlan(
        bounds=tuple(bounds),
        pipeline_size=pipeline_size,
        costs=tuple(float(sum(costs[a:b])) for a, b in bounds),
        params=tuple(int(sum(params[a:b])) for a, b in bounds),
        balance=balance,
        placement=placement,
    )


def theoretical_bubble(
    schedule: str, pipeline_size: int, n_microbatches: int, stages_per_rank: int = 1
) -> float:
    """The idle fraction of an ideal schedule: (p-1)/(m+p-1) for GPipe and 1F1B, divided by v when interleaved.

    Zero-bubble schedules fill most of that bubble with deferred weight-gradient work; the value given for
    them is the interleaved bound, an upper limit.
    """
    p, m, v = pipeline_size, n_microbatches, stages_per_rank
    bubble = (p - 1) / (m + p - 1)
    return bubble / v if schedule in ("interleaved_1f1b", "zero_bubble", "zbv", "dualpipev") else bubble
