"""A forward-only micro-batched pipeline pass for validation and prediction.

``torch.distributed.pipelining`` fixes tensor shapes on a schedule's first step, so its ``eval()`` cannot
take a validation batch of another size (a larger one aborts, a smaller one returns wrong outputs in
torch 2.13), and the V-shaped schedules' ``eval()`` fails outright there. This pass sends a small shape
header before every activation, so any batch size works, and sends asynchronously, so a stage computes
micro-batch ``i + 1`` while the next stage works on micro-batch ``i``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_speedup.pipeline.partition import StagePlan

__all__ = ["forward_only"]

_DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]
_HEADER = 8  # ndim, dtype code, up to 6 dimensions


def _isend(t: Tensor, dst: int, group: dist.ProcessGroup | None, device: torch.device) -> list[dist.Work]:
    if t.ndim > _HEADER - 2:
        raise ValueError(
            f"Pipeline activations may have at most {_HEADER - 2} dimensions, got {tuple(t.shape)}."
        )
    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    header[0], header[1] = t.ndim, _DTYPES.index(t.dtype)
    header[2 : 2 + t.ndim] = torch.tensor(t.shape, dtype=torch.int64)
    payload = t.contiguous()
    return [dist.isend(header, dst, group=group), dist.isend(payload, dst, group=group)]


def _recv(src: int, group: dist.ProcessGroup | None, device: torch.device) -> Tensor:
    header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    ndim, code = int(header[0]), int(header[1])
    out = torch.empty([int(d) for d in header[2 : 2 + ndim]], dtype=_DTYPES[code], device=device)
    dist.recv(out, src, group=group)
    return out


def forward_only(
    stages: Mapping[int, nn.Module],
    plan: StagePlan,
    pp_rank: int,
    group_ranks: list[int],
    group: dist.ProcessGroup | None,
    x: Tensor,
    n_microbatches: int,
    device: torch.device,
) -> Tensor | None:
    """Run the full model's forward over micro-batches of ``x``; returns the output on the last stage's rank.

    Every rank of the pipeline passes the same batch ``x`` (only stage 0 reads its values; the others
    derive the same micro-batch count from its length). ``stages`` maps the stage indices this rank owns
    to their modules; peers are addressed by global rank (``group_ranks[pipeline_rank]``).
    """
    S = plan.num_stages
    chunks = list(x.tensor_split(min(n_microbatches, x.shape[0])))  # a short last batch: fewer micro-batches
    pending: list[dist.Work] = []
    outs: list[Tensor] = []
    with torch.no_grad():
        for (
            chunk
        ) in chunks:  # every rank walks the same (micro-batch, stage) order, so sends and receives pair up
            act: Tensor | None = chunk
            for s in range(S):
                if plan.rank_of(s) != pp_rank:
                    continue
                if s > 0 and plan.rank_of(s - 1) != pp_rank:
                    act = _recv(group_ranks[plan.rank_of(s - 1)], group, device)
                assert act is not None
                act = stages[s](act)
                if s < S - 1 and plan.rank_of(s + 1) != pp_rank:
                    pending += _isend(act, group_ranks[plan.rank_of(s + 1)], group, device)
                    act = None
            if plan.rank_of(S - 1) == pp_rank:
                assert act is not None
                outs.append(act)
    for work in pending:
        work.wait()
    return torch.cat(outs) if outs else None
