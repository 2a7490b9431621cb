"""DDP communication hooks: 16-bit gradient all-reduce and PowerSGD, on NCCL and on gloo.

DDP calls a comm hook once per gradient bucket instead of its own all-reduce
(``DistributedDataParallel.register_comm_hook``). PyTorch ships such hooks, but its bf16 hook
refuses any backend but NCCL, and its PowerSGD keeps error feedback and warm-start memory per
*bucket index*; DDP rebuilds its buckets after the first iteration, so state saved from one run
does not line up with the buckets of a resumed one. The hooks here:

- :func:`low_precision_hook`: all-reduce ``grad / n`` cast to bf16 or fp16, then cast back
  (as ``torch.distributed.algorithms.ddp_comm_hooks.default_hooks``); works wherever the backend
  can sum 16-bit tensors (NCCL, and gloo in current PyTorch).
- :func:`powersgd_hook`: PowerSGD (Vogels, Karimireddy and Jaggi, "PowerSGD: Practical Low-Rank
  Gradient Compression for Distributed Optimization", NeurIPS 2019): one power-iteration step per
  matrix, rank-``r`` factors ``P`` and ``Q`` all-reduced instead of the matrix, warm-started ``Q``
  and local error feedback (``e_i = M_i - P Q_i^T``, Algorithm 2 of the paper). State is keyed by
  *parameter index*, so it checkpoints and resumes exactly whatever DDP's bucket layout is.
  The hook only records buckets until the last one of the step arrives, then compresses every
  matrix of the model at once: same-shape matrices batched across all buckets (``bmm``, batched
  Gram-Schmidt, multi-tensor copies), and three collectives per step (uncompressed tensors, ``P``,
  ``Q``) whatever the number of buckets. The per-bucket version this replaces issued three
  collectives and a batch of small kernels per bucket from the backward pass's thread, and ran about
  half as fast (``docs/methods/distributed.md``; the compression cannot hide behind the backward pass,
  as DDP's all-reduce does). The collectives
  are issued in order on the calling thread (see the comment in ``_powersgd_step``), so they cannot
  deadlock on gloo.
"""

# No `from __future__ import annotations` here: DDP checks a hook's annotations against the real
# `dist.GradBucket` and `Future[Tensor]` objects and rejects their string forms.
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future

from lightning_speedup._validation import check_float

_WIRE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def _ring_bytes(nbytes: int, n: int) -> int:
    return 2 * (n - 1) * nbytes // n


@dataclass
class LowPrecisionState:
    """State of :func:`low_precision_hook`: the wire dtype and a traffic counter."""

    compression: str = "bf16"
    process_group: dist.ProcessGroup | None = None
    bytes_sent: int = 0

    def __post_init__(self) -> None:
        if self.compression not in _WIRE_DTYPES:
            raise ValueError(f"compression must be one of {sorted(_WIRE_DTYPES)}, got {self.compression!r}.")


def low_precision_hook(state: LowPrecisionState, bucket: dist.GradBucket) -> Future[Tensor]:
    """DDP comm hook: all-reduce the bucket in bf16/fp16 (pre-divided by n, so fp16 does not overflow)."""
    buf = bucket.buffer()
    n = _group_size(state.process_group)
    wire = (buf / n).to(_WIRE_DTYPES[state.compression])
    state.bytes_sent += _ring_bytes(wire.numel() * wire.element_size(), n)
    fut = dist.all_reduce(wire, group=state.process_group, async_op=True).get_future()

    def decompress(f: Future[list[Tensor]]) -> Tensor:
        buf.copy_(f.value()[0])
        return buf

    return fut.then(decompress)


@dataclass
class PowerSGDState:
    """State of :func:`powersgd_hook`.

    Args:
        params: the model's parameters in a fixed order; state is keyed by the index in this list.
        rank: rank ``r`` of the approximation (per matrix, capped at its smaller side).
        start_iter: plain all-reduce for the first ``start_iter`` iterations (PowerSGD's warm-up).
        min_compression_rate: compress a ``n x m`` matrix only if ``n m / (r (n + m))`` is at least this.
        error_feedback: keep each process's compression error and add it to the next gradient.
        warm_start: start each power iteration from the previous ``Q`` instead of a random one.
        seed: seed of the random initial ``Q`` (identical on all processes).
        process_group: the group to all-reduce over (``None``: the default group).
        cuda_graphs: on CUDA, with ``warm_start``, capture the compression's kernels in three CUDA graphs
            once DDP's buckets have kept their place for two compressed steps, and replay them (the three
            collectives stay outside the graphs); the hook then costs a few launches on the host instead of
            hundreds. Same arithmetic as the eager path; the graphs keep their intermediates (about one
            float32 copy of the compressed matrices) between steps.

    Raises:
        ValueError: for ``rank`` < 1, ``start_iter`` < 0 or ``min_compression_rate`` < 0.
    """

    params: list[Tensor]
    rank: int = 4
    start_iter: int = 100
    min_compression_rate: float = 2.0
    error_feedback: bool = True
    warm_start: bool = True
    seed: int = 0
    process_group: dist.ProcessGroup | None = None
    cuda_graphs: bool = True
    iteration: int = 0
    errors: dict[int, Tensor] = field(default_factory=dict)
    q_memory: dict[int, Tensor] = field(default_factory=dict)
    bytes_sent: int = 0
    numel_before: int = 0
    numel_after: int = 0
    collectives: int = 0
    pending: list[tuple[dist.GradBucket, Future[Tensor]]] = field(default_factory=list, repr=False)
    # The captured step (CUDA graphs) and the bucket layout of the last compressed step.
    graphed: "_Step | None" = field(default=None, repr=False)
    last_layout: tuple[tuple[int, int], ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"PowerSGD rank must be >= 1, got {self.rank}.")
        if self.start_iter < 0:
            raise ValueError(f"start_iter must be >= 0, got {self.start_iter}.")
        check_float("min_compression_rate", self.min_compression_rate, 0, above=False)
        self._index = {id(p): i for i, p in enumerate(self.params)}

    def index_of(self, param: Tensor) -> int:
        try:
            return self._index[id(param)]
        except KeyError:
            raise RuntimeError(
                "PowerSGD hook got a parameter that was not in PowerSGDState.params; build the state from "
                "the same module that DDP wraps."
            ) from None

    def state_dict(self) -> dict[str, Any]:
        """Iteration, error feedback and warm-start memory (CPU copies), keyed by parameter index."""
        return {
            "iteration": self.iteration,
            "errors": {k: v.detach().cpu().clone() for k, v in self.errors.items()},
            "q_memory": {k: v.detach().cpu().clone() for k, v in self.q_memory.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.params[0].device if self.params else torch.device("cpu")
        self.iteration = int(state["iteration"])
        self.errors = {int(k): v.to(device) for k, v in state["errors"].items()}
        self.q_memory = {int(k): v.to(device) for k, v in state["q_memory"].items()}
        self.graphed = None  # its buffers held the replaced state: capture again from the loaded one

    def _initial_q(self, index: int, m: int, r: int, device: torch.device) -> Tensor:
        # A CPU generator seeded from (seed, parameter, iteration): the same Q on every process, no RNG state.
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + index * 7919 + self.iteration) % (2**63))
        return torch.randn(m, r, generator=g).to(device)


def _orthonormal(x: Tensor) -> Tensor:
    """Orthonormal columns spanning ``x``'s (batched, ``(b, n, r)``): modified Gram-Schmidt in float64.

    ``torch.linalg.qr`` on CUDA factors a batch one matrix at a time through cuSOLVER (two calls per
    matrix); for the 72 matrices of a 12-layer GPT that cost more than the step saved. Gram-Schmidt
    over the ``r`` columns is ``3 r`` batched kernels, and float64 keeps it as accurate as QR for the
    small ``r`` PowerSGD uses. A zero column (a matrix of lower rank) stays zero.
    """
    q = x.double()
    for i in range(q.shape[-1]):
        col = q[..., i : i + 1]
        col.div_(torch.linalg.vector_norm(col, dim=-2, keepdim=True).clamp_min_(1e-300))
        rest = q[..., i + 1 :]
        if rest.shape[-1]:
            rest.sub_(col @ (col.transpose(-1, -2) @ rest))
    return q.to(x.dtype)


def powersgd_hook(state: PowerSGDState, bucket: dist.GradBucket) -> Future[Tensor]:
    """DDP comm hook: rank-``r`` PowerSGD with error feedback; vectors and small matrices all-reduced as is.

    In the compressed phase the hook returns an unfinished future for every bucket but the last of
    the step, and compresses all of them when the last arrives (DDP calls the hook in bucket order and
    waits for the futures only after the backward pass).
    """
    buf = bucket.buffer()
    group = state.process_group
    n = _group_size(group)

    if state.iteration < state.start_iter:
        if bucket.is_last():
            state.iteration += 1
        buf.div_(n)
        state.bytes_sent += _ring_bytes(buf.numel() * buf.element_size(), n)
        state.collectives += 1
        return dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda f: f.value()[0])

    fut: Future[Tensor] = Future(devices=[buf.device]) if buf.is_cuda else Future()
    state.pending.append((bucket, fut))
    if bucket.is_last():
        pending, state.pending = state.pending, []
        _powersgd_step(state, [b for b, _ in pending], n)
        state.iteration += 1
        for b, f in pending:
            f.set_result(b.buffer())
    return fut


def _powersgd_step(state: PowerSGDState, buckets: list[dist.GradBucket], n: int) -> None:
    """Compress and average the gradients of ``buckets`` in place (their buffers), in three collectives.

    On CUDA (``state.cuda_graphs`` and ``warm_start``) the step is captured into CUDA graphs the second
    time in a row that DDP hands over the same bucket buffers, and replayed from then on; any other
    layout runs eagerly (and drops the graphs, whose buffers would no longer be the state's).
    """
    layout = tuple((b.buffer().data_ptr(), b.buffer().numel()) for b in buckets)
    device = buckets[0].buffer().device
    graphs = state.cuda_graphs and state.warm_start and device.type == "cuda"
    step = state.graphed if graphs and state.graphed is not None and state.graphed.layout == layout else None
    if step is None:
        capture = graphs and state.last_layout == layout
        step = _Step(state, buckets, n, layout, capture=capture)
        state.graphed = step if capture and step.graphs else None
    state.last_layout = layout
    step.run(state)


@dataclass
class _Group:
    """The matrices of one shape: their parameter indices, gradient views, ``M`` (b, rows, cols) and ``Q``."""

    idx: list[int]
    views: list[Tensor]
    mats: Tensor  # the error feedback between steps, the error-fed gradient M during one
    q: Tensor  # (b, cols, r): the warm-start Q between steps


class _Step:
    """One PowerSGD step over a fixed bucket layout: three phases around three collectives.

    ``_compress`` (M = grad + error, P = M Q, and the uncompressed tensors flattened), all-reduce of
    the flat ``P`` (and of the uncompressed tensors, in flight until ``_decompress``), ``_project``
    (orthonormal P, this process's ``Q_i = M^T P``), all-reduce of the flat ``Q``, ``_decompress`` (the
    averaged approximation ``P Q^T / n`` into the gradients, the new error ``M - P Q_i^T`` and ``Q`` into
    the state). Eagerly, the phases run once in :meth:`run`; with ``capture=True`` each is captured into a
    CUDA graph (capturing executes nothing) and :meth:`run` replays them.
    """

    def __init__(
        self,
        state: PowerSGDState,
        buckets: list[dist.GradBucket],
        n: int,
        layout: tuple[tuple[int, int], ...],
        capture: bool,
    ) -> None:
        self.layout = layout
        self.n = n
        self.group = state.process_group
        self.error_feedback = state.error_feedback
        device = buckets[0].buffer().device
        # Split the gradients: matrices worth compressing vs. the rest (biases, norms, thin matrices).
        shapes: dict[tuple[int, int, int], list[tuple[int, Tensor]]] = {}
        self.plain: list[Tensor] = []
        self.numel_before = sum(b.buffer().numel() for b in buckets)
        for bucket in buckets:
            for p, g in zip(bucket.parameters(), bucket.gradients(), strict=True):
                if g.dim() >= 2:
                    mat = g.view(g.shape[0], -1)
                    rows, cols = mat.shape
                    r = min(state.rank, rows, cols)
                    if rows * cols >= state.min_compression_rate * r * (rows + cols):
                        shapes.setdefault((rows, cols, r), []).append((state.index_of(p), mat))
                        continue
                self.plain.append(g)
        # The arithmetic runs in float32, or in float64 when the model trains in float64 (precision="64-true");
        # bf16/fp16 gradients (precision="bf16-true") are widened to float32 and narrowed again on the way out.
        wide = any(g.dtype == torch.float64 for b in buckets for g in b.gradients())
        self.dtype = torch.float64 if wide else torch.float32
        self.groups: list[_Group] = []
        for (rows, cols, r), members in shapes.items():
            idx = [k for k, _ in members]
            fed = [(j, state.errors[k]) for j, k in enumerate(idx) if k in state.errors]
            new = torch.empty if len(fed) == len(idx) else torch.zeros  # no error yet: zero
            mats = new((len(idx), rows, cols), dtype=self.dtype, device=device)
            if state.error_feedback and fed:
                torch._foreach_copy_([mats[j] for j, _ in fed], [e for _, e in fed])
            stale = [k for k in idx if k in state.q_memory and tuple(state.q_memory[k].shape) != (cols, r)]
            if stale and state.warm_start:
                warnings.warn(
                    f"PowerSGD: the warm-start matrices of {len(stale)} parameter(s) were saved with rank "
                    f"{state.q_memory[stale[0]].shape[1]}, but this run uses rank {r} for them: they start from a "
                    "fresh random Q (the error feedback is kept).",
                    stacklevel=2,
                )
                for k in stale:
                    del state.q_memory[k]
            q = torch.stack(
                [
                    (
                        state.q_memory[k]
                        if state.warm_start and k in state.q_memory
                        else state._initial_q(k, cols, r, device)
                    ).to(self.dtype)
                    for k in idx
                ]
            )
            # Q is not orthonormalized (Algorithm 1 of the paper): P = M Q is, and everything after depends
            # only on the span of P, which an invertible mix of Q's columns does not change.
            self.groups.append(_Group(idx, [m for _, m in members], mats, q))
        numel_p = sum(g.mats.shape[0] * g.mats.shape[1] * g.q.shape[2] for g in self.groups)
        numel_q = sum(g.q.numel() for g in self.groups)
        self.numel_after = sum(g.numel() for g in self.plain) + numel_p + numel_q
        self.collectives = bool(self.plain) + 2 * bool(self.groups)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.bound = False
        # Graphs bake in addresses: capture only if every gradient is a view of its bucket's buffer.
        capture = capture and all(
            v.untyped_storage().data_ptr() == b.buffer().untyped_storage().data_ptr()
            for b in buckets
            for v in b.gradients()
        )
        if capture and self.groups:
            # One memory pool for the three graphs: they replay in the order captured, never concurrently,
            # and every tensor one phase hands to the next is held by this object. "thread_local": DDP
            # calls the hook on the autograd thread while other threads (pin-memory) may use CUDA.
            pool = torch.cuda.graph_pool_handle()
            for phase in (self._compress, self._project, self._decompress):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    phase()
                self.graphs.append(graph)

    def _compress(self) -> None:
        for g in self.groups:
            mats = list(g.mats.unbind(0))
            if not self.error_feedback:
                torch._foreach_copy_(mats, g.views)
            elif all(v.dtype == self.dtype for v in g.views):
                torch._foreach_add_(mats, g.views)  # multi-tensor kernels: one launch per group
            else:
                torch._foreach_add_(mats, [v.to(self.dtype) for v in g.views])
        self.ps = [torch.bmm(g.mats, g.q) for g in self.groups]  # (b, rows, r) each
        self.p_flat = torch.cat([p.reshape(-1) for p in self.ps]) if self.ps else None
        self.plain_flat = (
            torch.cat([g.reshape(-1) for g in self.plain]).to(self.dtype).div_(self.n) if self.plain else None
        )

    def _project(self) -> None:
        assert self.p_flat is not None
        offset = 0
        self.local_qs: list[Tensor] = []
        for j, g in enumerate(self.groups):
            self.ps[j] = _orthonormal(self.p_flat[offset : offset + self.ps[j].numel()].view_as(self.ps[j]))
            offset += self.ps[j].numel()
            self.local_qs.append(torch.bmm(g.mats.transpose(1, 2), self.ps[j]))  # (b, cols, r): this Q_i
        self.q_sum = torch.cat([q.reshape(-1) for q in self.local_qs])

    def _decompress(self) -> None:
        offset = 0
        for j, g in enumerate(self.groups):
            q = self.q_sum[offset : offset + self.local_qs[j].numel()].view_as(self.local_qs[j])
            offset += self.local_qs[j].numel()
            p_avg = self.ps[j].div(self.n)
            for t, view in enumerate(g.views):
                if view.dtype == p_avg.dtype:  # P Q^T / n straight into the gradient: no (rows, cols) copy
                    torch.mm(p_avg[t], q[t].T, out=view)
                else:  # a bf16/fp16 gradient: out= needs the product's dtype
                    view.copy_(torch.mm(p_avg[t], q[t].T))
            if self.error_feedback:  # e_i = M_i - P Q_i^T, for the whole group in one in-place baddbmm
                g.mats.baddbmm_(self.ps[j], self.local_qs[j].transpose(1, 2), alpha=-1)
            g.q.copy_(q)
        if self.plain_flat is not None:
            parts = self.plain_flat.split([g.numel() for g in self.plain])
            torch._foreach_copy_(
                self.plain, [part.view_as(g) for part, g in zip(parts, self.plain, strict=True)]
            )

    def run(self, state: PowerSGDState) -> None:
        """One step: the phases (replayed graphs or eager) and, between them, the collectives."""
        # Collectives are issued here, on the calling thread, in a fixed order. Chaining them through
        # `Future.then` (as PyTorch's PowerSGD does) issues the second and third from whichever gloo
        # thread completes the first, so two processes can interleave them differently and deadlock.
        # On NCCL, `wait()` only makes the current stream wait: the host does not block.
        phases = [g.replay for g in self.graphs] or [self._compress, self._project, self._decompress]
        phases[0]()
        plain_work = None
        if self.plain_flat is not None:
            plain_work = dist.all_reduce(self.plain_flat, group=self.group, async_op=True)
        if self.groups:
            assert self.p_flat is not None
            dist.all_reduce(self.p_flat, group=self.group)
            phases[1]()
            dist.all_reduce(self.q_sum, group=self.group)
        if plain_work is not None:
            plain_work.wait()
        phases[2]()
        if not self.bound:  # the state's tensors: views of this step's buffers (once, when they are static)
            for g in self.groups:
                for t, k in enumerate(g.idx):
                    if self.error_feedback:
                        state.errors[k] = g.mats[t]
                    if state.warm_start:
                        state.q_memory[k] = g.q[t]
            self.bound = bool(self.graphs)
        state.numel_before += self.numel_before
        state.numel_after += self.numel_after
        state.bytes_sent += _ring_bytes(self.dtype.itemsize * self.numel_after, self.n)
        state.collectives += self.collectives
