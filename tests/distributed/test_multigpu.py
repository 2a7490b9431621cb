"""The NCCL paths on two GPUs: collectives, gossip, comm hooks, and two strategies under Lightning.

Run on the device machine (``pytest -m "gpu or multigpu"``); skipped elsewhere. Processes are forked, or
spawned once CUDA is initialized in the pytest process (``helpers.start_method``; importing bitsandbytes
does that on a GPU machine).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

import lightning_speedup.distributed as lsd
from lightning_speedup.distributed.collectives import (
    CommGroup,
    NeighborExchange,
    average_,
    consensus_distance,
    mean_,
)
from lightning_speedup.distributed.topology import Topology
from tests.distributed.helpers import (
    CharMLP,
    DumpState,
    load_dumps,
    loaders,
    run_processes,
    start_method,
    trainer,
)
from tests.distributed.test_core import _hook_checks

pytestmark = pytest.mark.multigpu


def _nccl_collectives(rank: int, n: int) -> None:
    device = torch.device("cuda", rank)
    comm = CommGroup.world()
    g = torch.Generator(device=device).manual_seed(rank)
    for compress, tol in (("none", 1e-6), ("bf16", 2e-2), ("int8", 2.5 / 127)):
        x = torch.randn(5000, generator=g, device=device)
        everyone = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(everyone, x)
        truth = torch.stack(everyone).mean(0)
        mean_(x, comm, compress)
        assert (x - truth).abs().max() <= tol * truth.abs().max() + 1e-6, compress
    x = torch.randn(3000, generator=g, device=device, dtype=torch.float64)
    ref = x.clone()
    dist.all_reduce(ref)
    exchange = NeighborExchange(Topology("exponential", n), comm)
    for step in range(3):
        exchange.start([x], step)
        x.add_(1.0)  # overlap: a local update while the exchange is in flight
        exchange.apply_([x])
    total = x.clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total, ref + 3.0 * n, rtol=0, atol=1e-9)
    assert consensus_distance([x], comm) < 1e-9  # two processes: one round is the exact average
    y = torch.randn(1000, generator=g, device=device)
    average_([y], comm, "bf16", reference=[torch.zeros_like(y)])


def test_nccl_collectives_and_gossip() -> None:
    run_processes(_nccl_collectives, 2, backend="nccl")


def _nccl_hooks(rank: int, n: int) -> None:
    _hook_checks(rank, n, device=f"cuda:{rank}")


def test_nccl_comm_hooks() -> None:
    run_processes(_nccl_hooks, 2, backend="nccl")


def test_local_sgd_every_step_matches_ddp_on_gpus(shakespeare_path: Path, tmp_path: Path) -> None:
    """On 2 GPUs in float32: parameters within 1e-4 of DDP's after 20 SGD-momentum steps (GPU kernels are not
    bitwise reproducible across the two different reduction orders)."""

    def fit(tag: str, strategy: object) -> list[dict]:
        L.seed_everything(0, verbose=False)
        train, _, vocab = loaders(shakespeare_path, batch_size=64)
        model = CharMLP(vocab, optimizer="sgd", lr=0.1, momentum=0.9)
        t = trainer(
            strategy, 2, tmp_path, callbacks=[DumpState(tmp_path, tag)], accelerator="gpu", max_steps=20
        )
        t.fit(model, train)
        return load_dumps(tmp_path, tag, 2)

    ddp = fit("ddp", DDPStrategy(start_method=start_method()))
    local = fit("local", lsd.LocalSGDStrategy(sync_every=1, start_method=start_method()))
    for k, v in ddp[0]["state"].items():
        if "running_" not in k and "num_batches" not in k:
            torch.testing.assert_close(local[0]["state"][k], v, rtol=0, atol=1e-4)
    gossip = fit("gossip", lsd.GossipSGDStrategy(topology="exponential", start_method=start_method()))
    assert gossip[0]["comm_stats"]["bytes_sent"] > 0
    assert all(torch.equal(gossip[0]["state"][k], gossip[1]["state"][k]) for k in gossip[0]["state"])
