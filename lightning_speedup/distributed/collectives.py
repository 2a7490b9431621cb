"""Averaging collectives over flat buckets: global mean, neighbour (gossip) mixing, consensus distance.

Every function works on the buckets of a :class:`~lightning_speedup.distributed.flat.FlatBuckets`
(one collective per bucket) and on a :class:`CommGroup` that says where the algorithm runs:

- flat: all processes form one group (``CommGroup.world()``);
- hierarchical (``CommGroup.hierarchical(g)``): consecutive blocks of ``g`` ranks (a node) keep
  identical parameters by all-reducing gradients every step (intra-node DDP); the algorithm runs
  across blocks. Every bucket is split into ``g`` shards and rank ``r`` of a block runs the
  algorithm on shard ``r`` with rank ``r`` of the other blocks, then the block all-gathers the
  shards (the two-level scheme of hierarchical all-reduce, e.g. Jia et al. 2018, "Highly Scalable
  Deep Learning Training System with Mixed-Precision"). Cross-node bytes per process are ``1/g``
  of the flat scheme's.

Traffic is counted analytically per process (payload bytes sent): ring all-reduce of ``S`` bytes
over ``n`` members sends ``2 (n-1)/n * S``; an all-gather ``(n-1)/n * S``; a point-to-point send
``S`` per peer.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_speedup.distributed.compression import (
    INT8_BLOCK,
    check_compression,
    int8_encode,
    padded_numel,
)
from lightning_speedup.distributed.topology import Topology


@dataclass
class Traffic:
    """Payload bytes this process sent: across the algorithm group (``inter``) and inside its block (``intra``)."""

    inter: int = 0
    intra: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.inter + other.inter, self.intra + other.intra)

    @property
    def total(self) -> int:
        return self.inter + self.intra


@dataclass(frozen=True)
class CommGroup:
    """Where an averaging algorithm communicates.

    Attributes:
        size: members of the algorithm group (nodes, in hierarchical mode).
        rank: this process's index in the algorithm group.
        group: the algorithm's process group (``None``: the default group).
        peer_ranks: global rank of each algorithm index (for point-to-point sends).
        num_shards: processes per block (1 when flat); every bucket splits into this many shards.
        shard_rank: the shard this process owns.
        shard_group: the block's process group, used to all-gather the shards.
    """

    size: int
    rank: int
    group: dist.ProcessGroup | None = None
    peer_ranks: tuple[int, ...] = (0,)
    num_shards: int = 1
    shard_rank: int = 0
    shard_group: dist.ProcessGroup | None = field(default=None, compare=False)

    @staticmethod
    def world() -> CommGroup:
        """All processes of the default group (or a single process when torch.distributed is not initialized)."""
        if not (dist.is_available() and dist.is_initialized()):
            return CommGroup(1, 0)
        n = dist.get_world_size()
        return CommGroup(n, dist.get_rank(), None, tuple(range(n)))

    @staticmethod
    def hierarchical(block_size: int) -> CommGroup:
        """Blocks of ``block_size`` consecutive ranks; the algorithm runs across blocks on shards.

        Collective: every rank must call it with the same ``block_size``.

        Raises:
            ValueError: if ``block_size`` < 1 or does not divide the world size.
        """
        n = dist.get_world_size() if dist.is_initialized() else 1
        if block_size < 1 or n % block_size != 0:
            raise ValueError(
                f"hierarchical block size {block_size} must be >= 1 and divide the world size {n}; "
                "pass hierarchical=True (devices per node) or a divisor of the number of processes."
            )
        if block_size == 1:
            return CommGroup.world()
        rank = dist.get_rank()
        blocks = [list(range(b * block_size, (b + 1) * block_size)) for b in range(n // block_size)]
        across = [list(range(r, n, block_size)) for r in range(block_size)]
        # new_subgroups_by_enumeration creates every group on every rank (a collective requirement).
        block_group, _ = dist.new_subgroups_by_enumeration(blocks)
        across_group, _ = dist.new_subgroups_by_enumeration(across)
        shard_rank = rank % block_size
        return CommGroup(
            size=n // block_size,
            rank=rank // block_size,
            group=across_group,
            peer_ranks=tuple(across[shard_rank]),
            num_shards=block_size,
            shard_rank=shard_rank,
            shard_group=block_group,
        )

    @property
    def is_hierarchical(self) -> bool:
        return self.num_shards > 1


def shard_of(flat: Tensor, comm: CommGroup) -> Tensor:
    """This process's shard of a bucket (a view); the whole bucket when not hierarchical."""
    if comm.num_shards == 1:
        return flat
    return flat.view(comm.num_shards, -1)[comm.shard_rank]


def gather_shards_(flat: Tensor, comm: CommGroup) -> Traffic:
    """Reassemble a bucket inside the block after each process updated its own shard."""
    if comm.num_shards == 1:
        return Traffic()
    parts = list(flat.view(comm.num_shards, -1).unbind(0))
    mine = parts[comm.shard_rank].clone()  # the input must not alias an output on every backend
    dist.all_gather(parts, mine, group=comm.shard_group)
    g = comm.num_shards
    return Traffic(intra=(g - 1) * mine.numel() * mine.element_size())


def _ring_bytes(nbytes: int, n: int) -> int:
    return 2 * (n - 1) * nbytes // n


@torch.no_grad()
def _mean_int8_(x: Tensor, comm: CommGroup) -> int:
    """Average flat float ``x`` over ``comm`` with int8 on the wire: all-to-all of chunks, fp32 sum, all-gather."""
    n, numel = comm.size, x.numel()
    chunk = padded_numel(-(-numel // n), INT8_BLOCK)
    padded = torch.zeros(n * chunk, device=x.device, dtype=torch.float32)
    padded[:numel] = x
    codes = int8_encode(padded)
    nblk = chunk // INT8_BLOCK
    seg = chunk + 4 * nblk
    send = torch.cat(
        [codes.q.view(torch.uint8).view(n, chunk), codes.scales.view(n, nblk).contiguous().view(torch.uint8)],
        dim=1,
    )  # (n, seg): row j is my encoding of chunk j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv.view(-1), send.view(-1), group=comm.group)
    q = recv[:, :chunk].view(torch.int8).float().view(n, nblk, INT8_BLOCK)
    s = recv[:, chunk:].contiguous().view(torch.float32).view(n, nblk, 1)
    mean_chunk = (q * s).sum(dim=0).view(-1) / n  # (chunk,) the mean of my chunk
    mine = int8_encode(mean_chunk)
    row = torch.cat([mine.q.view(torch.uint8), mine.scales.view(torch.uint8)])
    rows = list(torch.empty(n, seg, device=x.device, dtype=torch.uint8).unbind(0))
    dist.all_gather(rows, row, group=comm.group)
    allrows = torch.stack(rows)
    q = allrows[:, :chunk].view(torch.int8).float().view(n, nblk, INT8_BLOCK)
    s = allrows[:, chunk:].contiguous().view(torch.float32).view(n, nblk, 1)
    x.copy_((q * s).view(-1)[:numel].to(x.dtype))
    return 2 * (n - 1) * seg


@torch.no_grad()
def mean_(x: Tensor, comm: CommGroup, compress: str = "none") -> int:
    """Replace flat ``x`` with its mean over ``comm`` (in place; identical on every member). Returns bytes sent.

    ``compress``: "none" (all-reduce in x's dtype), "bf16"/"fp16" (all-reduce of ``x / n`` cast to 16 bits),
    "int8" (blockwise int8 all-to-all + all-gather, see :mod:`~lightning_speedup.distributed.compression`).
    """
    check_compression(compress)
    n = comm.size
    if n == 1:
        return 0
    if not x.is_floating_point():
        raise TypeError(f"mean_ averages floating-point tensors, got {x.dtype}.")
    if compress == "none":
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=comm.group)
        x.div_(n)
        return _ring_bytes(x.numel() * x.element_size(), n)
    if compress == "int8":
        return _mean_int8_(x, comm)
    wire = (x / n).to(torch.bfloat16 if compress == "bf16" else torch.float16)  # pre-divide: no fp16 overflow
    dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=comm.group)
    x.copy_(wire)
    return _ring_bytes(wire.numel() * 2, n)


@torch.no_grad()
def average_(
    flats: Sequence[Tensor],
    comm: CommGroup,
    compress: str = "none",
    reference: Sequence[Tensor] | None = None,
) -> Traffic:
    """Average every bucket over ``comm`` in place, one collective per bucket (per shard when hierarchical).

    With ``reference`` (buckets every member holds identically, e.g. the last synchronized
    parameters) the *differences* ``x - reference`` are averaged and added back: what crosses the
    wire is small and centred, which is what lossy ``compress`` needs.
    """
    traffic = Traffic()
    if comm.size == 1:  # a single block already agrees (intra-block DDP keeps it identical)
        return traffic
    for i, flat in enumerate(flats):
        x = shard_of(flat, comm)
        if reference is None:
            traffic.inter += mean_(x, comm, compress)
        else:
            ref = shard_of(reference[i], comm)
            delta = x - ref
            traffic.inter += mean_(delta, comm, compress)
            torch.add(ref, delta, out=x)
        traffic += gather_shards_(flat, comm)
    return traffic


@torch.no_grad()
def block_mean_(flats: Sequence[Tensor], comm: CommGroup) -> Traffic:
    """Replace every bucket with its mean over this process's block (in place); nothing when not hierarchical.

    Buffers that each process updates from its own batches (BatchNorm's running statistics) differ inside a
    block, unlike the parameters that the block's DDP keeps identical. Averaging them over the block first makes
    a following :func:`average_` (which takes each shard from one process per block) the mean over all processes.
    """
    if comm.num_shards == 1:
        return Traffic()
    nbytes = 0
    for flat in flats:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=comm.shard_group)
        flat.div_(comm.num_shards)
        nbytes += flat.numel() * flat.element_size()
    return Traffic(intra=_ring_bytes(nbytes, comm.num_shards))


@torch.no_grad()
def broadcast_(flats: Sequence[Tensor], src: int = 0) -> Traffic:
    """Copy global rank ``src``'s buckets to every process (one broadcast per bucket)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return Traffic()
    nbytes = 0
    for flat in flats:
        dist.broadcast(flat, src=src)
        nbytes += flat.numel() * flat.element_size()
    return Traffic(inter=nbytes if dist.get_rank() == src else 0)


@torch.no_grad()
def consensus_distance(flats: Sequence[Tensor], comm: CommGroup) -> float:
    """``sqrt(mean_i ||x_i - mean_j x_j||^2)`` over the algorithm group: 0 when every member agrees.

    Costs one all-reduce of the model (plus scalars); sample it, do not call it every step.
    """
    if comm.size == 1:
        return 0.0
    sq = torch.zeros((), dtype=torch.float64, device=flats[0].device if flats else "cpu")
    for flat in flats:
        if not flat.is_floating_point():
            continue
        x = shard_of(flat, comm)
        mean = x.to(torch.float64, copy=True)  # never alias x: the all-reduce works in place
        dist.all_reduce(mean, op=dist.ReduceOp.SUM, group=comm.group)
        mean.div_(comm.size)
        sq += (x.double() - mean).square().sum()
    dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=comm.group)
    if comm.num_shards > 1:
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=comm.shard_group)
    return float((sq / comm.size).sqrt())


class NeighborExchange:
    """One round of gossip over a :class:`Topology`: send my buckets to my out-peers, mix in my in-peers'.

    ``start`` snapshots (and encodes) this process's shard of every bucket and launches all sends and
    receives with ``batch_isend_irecv`` (one message per peer per bucket, asynchronous). ``wait``
    completes them. ``apply_`` then updates the *current* buckets::

        x_i <- x_i + sum_j w_ij (y_j - y_i)

    where ``y`` are the decoded snapshots. Without overlap (``apply_`` right after ``start``) and
    without compression this is exactly ``x_i <- sum_j W_ij x_j``; with overlap, ``x_i`` has moved by
    one local step since the snapshot and the mix is applied one step late (D-PSGD's gradient at the
    unmixed point, Lian et al. 2017). Either way the mean over processes is preserved, compression
    included, because the same decoded ``y_i`` enters with both signs.
    """

    def __init__(self, topology: Topology, comm: CommGroup, compress: str = "none") -> None:
        check_compression(compress)
        if topology.world_size != comm.size:
            raise ValueError(
                f"The topology has {topology.world_size} nodes but the gossip group has {comm.size} members."
            )
        self.topology, self.comm, self.compress = topology, comm, compress
        self._works: list[dist.Work] = []
        self._sent: list[Tensor] = []  # my encoded snapshot per bucket
        self._recv: list[list[tuple[float, Tensor]]] = []  # per bucket: (weight, encoded buffer) per in-peer
        self._numels: list[int] = []
        self._dtypes: list[torch.dtype] = []
        self._started = False

    @property
    def pending(self) -> bool:
        """True between ``start`` and ``apply_`` (or ``discard``)."""
        return self._started

    def _encode(self, x: Tensor) -> Tensor:
        if self.compress == "none":
            return x.clone()
        if self.compress in ("bf16", "fp16"):
            return x.to(torch.bfloat16 if self.compress == "bf16" else torch.float16)
        codes = int8_encode(x)
        return torch.cat([codes.q.view(torch.uint8), codes.scales.view(torch.uint8)])

    def _decode(self, wire: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
        if self.compress == "none":
            return wire
        if self.compress in ("bf16", "fp16"):
            return wire.to(dtype)
        padded = padded_numel(numel)
        q = wire[:padded].view(torch.int8).float().view(-1, INT8_BLOCK)
        s = wire[padded:].contiguous().view(torch.float32)
        return (q * s[:, None]).view(-1)[:numel].to(dtype)

    @torch.no_grad()
    def start(self, flats: Sequence[Tensor], step: int) -> Traffic:
        """Snapshot this process's shards and launch the round of ``step`` (asynchronous). Returns bytes sent."""
        if self._started:
            raise RuntimeError("NeighborExchange.start called twice without apply_/discard in between.")
        self._started = True
        mixing = self.topology.mixing(self.comm.rank, step)
        self._sent, self._recv, self._numels, self._dtypes = [], [], [], []
        ops: list[dist.P2POp] = []
        traffic = Traffic()
        for i, flat in enumerate(flats):
            x = shard_of(flat, self.comm)
            wire = self._encode(x)
            self._sent.append(wire)
            self._numels.append(x.numel())
            self._dtypes.append(x.dtype)
            recvs: list[tuple[float, Tensor]] = []
            for peer in mixing.send_to:
                # a tag per bucket, so that backends matching by (peer, tag) cannot pair up two buckets
                ops.append(dist.P2POp(dist.isend, wire, self.comm.peer_ranks[peer], tag=i))
                traffic.inter += wire.numel() * wire.element_size()
            for peer, weight in mixing.recv_from:
                buf = torch.empty_like(wire)
                ops.append(dist.P2POp(dist.irecv, buf, self.comm.peer_ranks[peer], tag=i))
                recvs.append((weight, buf))
            self._recv.append(recvs)
        self._works = dist.batch_isend_irecv(ops) if ops else []
        return traffic

    def wait(self) -> None:
        """Block until every send and receive of the current round completed."""
        for w in self._works:
            w.wait()
        self._works = []

    @torch.no_grad()
    def apply_(self, flats: Sequence[Tensor]) -> Traffic:
        """Mix the received snapshots into the current buckets (waits first), then reassemble shards."""
        if not self._started:
            raise RuntimeError("NeighborExchange.apply_ called without a started round.")
        self.wait()
        traffic = Traffic()
        for i, flat in enumerate(flats):
            x = shard_of(flat, self.comm)
            mine = self._decode(self._sent[i], self._numels[i], self._dtypes[i])
            for weight, buf in self._recv[i]:
                x.add_(self._decode(buf, self._numels[i], self._dtypes[i]) - mine, alpha=weight)
            traffic += gather_shards_(flat, self.comm)
        self.discard()
        return traffic

    def discard(self) -> None:
        """Complete the round (if any) and drop it without applying it."""
        self.wait()
        self._sent, self._recv, self._started = [], [], False


class CommTimer:
    """Accumulates the time spent in communication sections.

    On CUDA the sections are timed with events on the current stream (what the training stream
    actually waited for, resolved lazily so no host synchronization is added); on CPU with the
    wall clock, which there includes the blocking collectives.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0

    @contextmanager
    def measure(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - t0

    def pop_seconds(self, wait: bool = False) -> float:
        """Seconds measured since the last call.

        On CUDA only sections whose end event has completed are counted (the rest carry over to a
        later call), so logging every step adds no host synchronization; ``wait=True`` waits for all.
        """
        total = self._seconds
        pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        for start, end in self._events:
            if wait:
                end.synchronize()
            elif not end.query():
                pending.append((start, end))
                continue
            total += start.elapsed_time(end) / 1000.0
        self._events, self._seconds = pending, 0.0
        return total
