"""The functional core on real gloo process groups: topologies, flat buckets, averaging, gossip, comm hooks.

Process-group tests fork 2 or 4 processes (``helpers.run_processes``) and assert inside each
process; a failure reports that process's traceback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_speedup.distributed.collectives import (
    CommGroup,
    NeighborExchange,
    average_,
    consensus_distance,
    mean_,
)
from lightning_speedup.distributed.compression import (
    INT8_BLOCK,
    int8_decode,
    int8_encode,
    roundtrip,
    wire_bytes,
)
from lightning_speedup.distributed.flat import FlatBuckets
from lightning_speedup.distributed.hooks import (
    LowPrecisionState,
    PowerSGDState,
    low_precision_hook,
    powersgd_hook,
)
from lightning_speedup.distributed.topology import Topology, mixing_matrix
from tests.distributed.helpers import run_processes

# ---------------------------------------------------------------------------------------------- topologies


@pytest.mark.parametrize(
    ("name", "n"),
    [
        ("ring", 2),
        ("ring", 3),
        ("ring", 8),
        ("torus", 4),
        ("torus", 9),
        ("exponential", 2),
        ("exponential", 6),
        ("exponential", 8),
    ],
)
def test_mixing_matrices_are_doubly_stochastic(name: str, n: int) -> None:
    topo = Topology(name, n)
    for step in range(topo.period):
        w = mixing_matrix(topo, step)
        torch.testing.assert_close(w.sum(0), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-15)
        torch.testing.assert_close(w.sum(1), torch.ones(n, dtype=torch.float64), rtol=0, atol=1e-15)
        assert (w >= 0).all()
        # every node sends exactly to the nodes that expect it
        for i in range(n):
            for j in topo.mixing(i, step).send_to:
                assert i in [src for src, _ in topo.mixing(j, step).recv_from]


def test_exponential_graph_reaches_exact_consensus_in_log2_steps() -> None:
    n = 16
    topo = Topology("exponential", n)
    product = torch.eye(n, dtype=torch.float64)
    for step in range(topo.period):
        product = mixing_matrix(topo, step) @ product
    torch.testing.assert_close(product, torch.full((n, n), 1.0 / n, dtype=torch.float64), rtol=0, atol=1e-15)
    assert topo.degree() == 1 and Topology("ring", n).degree() == 2 and Topology("torus", 16).degree() == 4


def test_topology_rejects_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match=r"square number of nodes.*got 8.*Use 4 or 9"):
        Topology("torus", 8)
    with pytest.raises(ValueError, match="Unknown topology 'star'"):
        Topology("star", 4)


# ---------------------------------------------------------------------------------------------- flat buckets


def test_flat_buckets_roundtrip_layout_and_padding() -> None:
    torch.manual_seed(0)
    shared = torch.randn(5, 3)
    tensors = [torch.randn(100), shared, torch.randn(7, dtype=torch.float64), shared, torch.randn(300)]
    flats = FlatBuckets(tensors, bucket_cap_mb=200 * 4 / 2**20, pad_to=4)
    assert len(flats.tensors) == 4  # the tied tensor is mirrored once
    assert {b.dtype for b in flats.buckets} == {torch.float32, torch.float64}
    assert all(b.numel() % 4 == 0 for b in flats.buckets)
    assert len(flats) == 3  # float32: [100 + 15], [300] (cap 200 elements); float64: [7]
    originals = [t.clone() for t in flats.tensors]
    flats.pack()
    for t in flats.tensors:
        t.zero_()
    flats.unpack()
    for t, o in zip(flats.tensors, originals, strict=True):
        assert torch.equal(t, o)
    assert flats.numel == 100 + 15 + 7 + 300
    with pytest.raises(ValueError, match="do not match this model's layout"):
        flats.load_buckets([torch.zeros(3)])


def test_int8_blockwise_roundtrip_error_is_bounded() -> None:
    torch.manual_seed(0)
    x = torch.randn(5 * INT8_BLOCK + 17)
    codes = int8_encode(x)
    y = int8_decode(codes)
    per_block_max = (
        torch.nn.functional.pad(x.abs(), (0, codes.q.numel() - x.numel())).view(-1, INT8_BLOCK).amax(1)
    )
    bound = (per_block_max / 127 / 2).repeat_interleave(INT8_BLOCK)[: x.numel()] + 1e-7
    assert ((y - x).abs() <= bound).all()
    assert wire_bytes(x.numel(), "int8") < x.numel() * 4 / 3.9
    assert torch.equal(roundtrip(x, "none"), x)
    assert (roundtrip(x, "bf16") - x).abs().max() < 0.02


# ---------------------------------------------------------------------------------------------- collectives


def _gather(x: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return torch.stack(out)


def _collectives_checks(rank: int, n: int) -> None:
    comm = CommGroup.world()
    g = torch.Generator().manual_seed(100 + rank)

    # mean_: exact in float64, all ranks bitwise identical, lossy encodings within their error
    for compress, tol in (("none", 1e-15), ("bf16", 2e-2), ("fp16", 2e-3), ("int8", 2.5 / 127)):
        x = torch.randn(3 * INT8_BLOCK + 5, generator=g, dtype=torch.float64)
        truth = _gather(x).mean(0)
        sent = mean_(x, comm, compress)
        everyone = _gather(x)
        assert all(torch.equal(everyone[0], everyone[r]) for r in range(n)), compress
        assert (x - truth).abs().max() <= tol * truth.abs().max(), compress
        assert sent > 0

    # average_ with a shared reference averages the differences
    ref = torch.ones(50, dtype=torch.float64)
    x = ref + 0.01 * torch.randn(50, generator=g, dtype=torch.float64)
    truth = _gather(x).mean(0)
    average_([x], comm, "bf16", reference=[ref])
    assert (x - truth).abs().max() < 1e-4  # bf16 error on 0.01-sized deltas, not on the 1.0 values

    # consensus distance against a direct computation
    x = torch.randn(40, generator=g, dtype=torch.float64)
    allx = _gather(x)
    direct = math.sqrt(((allx - allx.mean(0)) ** 2).sum(1).mean().item())
    assert abs(consensus_distance([x], comm) - direct) < 1e-12

    # gossip: the mean is preserved and the disagreement vanishes without any gradient
    for name, rounds, compress in (
        ("ring", 40, "none"),
        ("torus", 40, "none"),
        ("exponential", 2, "none"),
        ("ring", 40, "int8"),
    ):
        x = torch.randn(2 * INT8_BLOCK + 3, generator=g, dtype=torch.float64)
        y = torch.randn(7, generator=g, dtype=torch.float64)
        mean0 = _gather(x).mean(0)
        exchange = NeighborExchange(Topology(name, n), comm, compress)
        d0 = consensus_distance([x, y], comm)
        for step in range(rounds):
            exchange.start([x, y], step)
            exchange.apply_([x, y])
        torch.testing.assert_close(_gather(x).mean(0), mean0, rtol=0, atol=1e-13)
        d = consensus_distance([x, y], comm)
        limit = 1e-12 if compress == "none" else 0.02 * d0  # int8 levels off at its quantization error
        assert d < limit, (name, compress, d0, d)

    # overlap: the mix computed from the snapshot is applied to the moved parameters
    x = torch.randn(10, generator=g, dtype=torch.float64)
    update = torch.randn(10, generator=g, dtype=torch.float64)
    expected_mean = _gather(x).mean(0) + _gather(update).mean(0)
    exchange = NeighborExchange(Topology("ring", n), comm)
    exchange.start([x], 0)
    x.add_(update)  # a local step while the exchange is in flight
    exchange.apply_([x])
    torch.testing.assert_close(_gather(x).mean(0), expected_mean, rtol=0, atol=1e-13)

    # hierarchical: blocks of 2 hold identical copies; the average runs across blocks on shards
    hier = CommGroup.hierarchical(2)
    assert (hier.size, hier.rank, hier.num_shards, hier.shard_rank) == (n // 2, rank // 2, 2, rank % 2)
    block_gen = torch.Generator().manual_seed(7 + rank // 2)
    x = torch.randn(2 * 33, generator=block_gen, dtype=torch.float64)  # padded length: a multiple of 2
    truth = _gather(x).mean(0)
    traffic = average_([x], hier)
    everyone = _gather(x)
    assert all(torch.equal(everyone[0], everyone[r]) for r in range(n))
    torch.testing.assert_close(x, truth, rtol=0, atol=1e-15)
    assert traffic.inter == 2 * (hier.size - 1) * 33 * 8 // hier.size and traffic.intra == 33 * 8


def test_collectives_on_four_processes() -> None:
    run_processes(_collectives_checks, 4)


# ---------------------------------------------------------------------------------------------- comm hooks


def _ddp_pair(
    hook_state: object, hook: object, bucket_cap_mb: float = 25.0, device: str = "cpu"
) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dev = torch.device(device)
    ids = [dev.index] if dev.type == "cuda" else None
    base = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6), nn.Linear(6, 3)).to(dev)
    plain = DistributedDataParallel(base, device_ids=ids)
    hooked_module = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6), nn.Linear(6, 3)).to(dev)
    hooked_module.load_state_dict(base.state_dict())
    hooked = DistributedDataParallel(hooked_module, device_ids=ids, bucket_cap_mb=bucket_cap_mb)
    hooked.register_comm_hook(hook_state, hook)
    return plain, hooked


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    model(x).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def _hook_checks(rank: int, n: int, device: str = "cpu") -> None:
    g = torch.Generator().manual_seed(rank)
    inputs = [torch.randn(8, 12, generator=g).to(device) for _ in range(6)]

    # bf16 / fp16 hooks: the average gradient within 16-bit rounding (PyTorch's own bf16 hook refuses gloo)
    for compression, tol in (("bf16", 1e-2), ("fp16", 2e-3)):
        plain, hooked = _ddp_pair(LowPrecisionState(compression), low_precision_hook, device=device)
        for x in inputs[:2]:
            for a, b in zip(_grads(plain, x), _grads(hooked, x), strict=True):
                assert (a - b).abs().max() <= tol * a.abs().max() + 1e-6, compression

    # PowerSGD at full rank (rank >= the smaller side of every matrix) is exact: the same average as DDP
    state = PowerSGDState(params=[], rank=16, start_iter=1, min_compression_rate=0.0)
    plain, hooked = _ddp_pair(state, powersgd_hook, device=device)
    state.params = list(hooked.module.parameters())
    state.__post_init__()
    for x in inputs[:4]:
        for a, b in zip(_grads(plain, x), _grads(hooked, x), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert state.iteration == 4 and state.numel_after > 0

    if device != "cpu":  # CUDA graphs, captured at the second compressed step: the eager path's numbers
        steps: dict[bool, list[list[torch.Tensor]]] = {}
        for graphs in (False, True):
            state = PowerSGDState(
                params=[], rank=2, start_iter=1, min_compression_rate=0.0, cuda_graphs=graphs
            )
            _, hooked = _ddp_pair(state, powersgd_hook, device=device)
            state.params = list(hooked.module.parameters())
            state.__post_init__()
            steps[graphs] = [_grads(hooked, x) for x in inputs]
            assert (state.graphed is not None) == graphs and state.collectives == 1 + 3 * 5
        for eager, graphed in zip(steps[False], steps[True], strict=True):
            for a, b in zip(eager, graphed, strict=True):
                torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        assert not torch.equal(steps[True][-1][0], steps[True][-2][0])  # the replays are live, not stale

    # low rank: fewer bytes, error feedback per parameter, and resumable in a different bucket layout
    state = PowerSGDState(params=[], rank=1, start_iter=1, min_compression_rate=0.0)
    _, hooked = _ddp_pair(state, powersgd_hook, device=device)
    state.params = list(hooked.module.parameters())
    state.__post_init__()
    for x in inputs[:3]:
        _grads(hooked, x)
    assert state.numel_after < state.numel_before and set(state.errors) == {
        0,
        2,
        4,
    }  # the three weight matrices
    saved = state.state_dict()
    expected = [_grads(hooked, x) for x in inputs[3:]]
    resumed_state = PowerSGDState(params=[], rank=1, start_iter=1, min_compression_rate=0.0)
    hook_calls: list[int] = []

    def counting_hook(st, bucket):  # type: ignore[no-untyped-def]  # DDP rejects string annotations
        hook_calls.append(bucket.index())
        return powersgd_hook(st, bucket)

    _, resumed = _ddp_pair(
        resumed_state, counting_hook, bucket_cap_mb=1e-6, device=device
    )  # one bucket per parameter
    resumed_state.params = list(resumed.module.parameters())
    resumed_state.__post_init__()
    resumed_state.load_state_dict(saved)
    before = resumed_state.collectives
    for x, exp in zip(inputs[3:], expected, strict=True):
        for a, b in zip(exp, _grads(resumed, x), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # several buckets per step, yet three collectives per step: every bucket is compressed at the last
    assert len(hook_calls) // 3 > 1 and resumed_state.collectives - before == 3 * 3, hook_calls
    assert resumed_state.pending == []


def test_comm_hooks_on_two_processes() -> None:
    run_processes(_hook_checks, 2)


def test_orthonormal_spans_the_same_columns_as_qr() -> None:
    from lightning_speedup.distributed.hooks import _orthonormal

    x = torch.randn(3, 50, 4, generator=torch.Generator().manual_seed(0))
    x[1, :, 2] = 0.0  # a matrix of lower rank: its zero column stays zero
    q = _orthonormal(x)
    assert q.dtype == x.dtype and q.shape == x.shape
    for b in (0, 2):  # full rank: orthonormal columns, and the same projection as QR's
        torch.testing.assert_close(q[b].T @ q[b], torch.eye(4), atol=1e-6, rtol=0)
        ref = torch.linalg.qr(x[b].double()).Q
        torch.testing.assert_close((q[b].double() @ q[b].double().T), ref @ ref.T, atol=1e-6, rtol=0)
    assert torch.equal(q[1, :, 2], torch.zeros(50))
    torch.testing.assert_close(q[1, :, [0, 1, 3]].T @ q[1, :, [0, 1, 3]], torch.eye(3), atol=1e-6, rtol=0)


def test_powersgd_state_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank must be >= 1"):
        PowerSGDState(params=[], rank=0)
    with pytest.raises(ValueError, match="compression must be one of"):
        LowPrecisionState("int4")


# ---------------------------------------------------------------------------------------------- cost model


def test_cost_model_formulas() -> None:
    from lightning_speedup.distributed import costmodel as cm

    link = cm.Link(bandwidth_gbps=8.0, latency_s=1e-5)  # 1 GB/s
    assert cm.allreduce_time(1e9, 1, link) == 0.0
    assert cm.allreduce_time(1e9, 4, link) == pytest.approx(2 * 3 * 1e-5 + 1.5)
    w = cm.Workload(num_params=250_000_000, compute_s=0.1, num_buckets=1)  # 1 GB of fp32
    t_ar = cm.allreduce_time(1e9, 8, link)
    assert cm.step_time(cm.Method("local_sgd", sync_every=10), w, 8, link) == pytest.approx(0.1 + t_ar / 10)
    ddp = cm.step_time(cm.Method("ddp"), w, 8, link, cm.Calibration(ddp_overlap=0.5))
    assert ddp == pytest.approx(0.1 + t_ar - 0.05)
    # gossip costs the same per step at 8 and at 512 nodes; the all-reduce does not
    gossip = cm.Method("gossip", degree=1, overlap=False)
    assert (
        cm.step_time(gossip, w, 8, link)
        == cm.step_time(gossip, w, 512, link)
        == pytest.approx(0.1 + 1e-5 + 1.0)
    )
    assert cm.step_time(cm.Method("ddp"), w, 512, link) > cm.step_time(cm.Method("ddp"), w, 8, link)
    assert cm.throughput_speedup(cm.Method("ddp"), w, 1, link) == 1.0
    assert (
        cm.time_to_target_speedup(cm.Method("local_sgd", sync_every=10), cm.Method("ddp"), w, 8, link, 1.0)
        > 1
    )
    with pytest.raises(ValueError, match="Unknown method kind"):
        cm.Method("allgather")


def test_cost_model_gossip_uses_the_measured_point_to_point_rate(tmp_path: Path) -> None:
    """Gossip is priced at the link's point-to-point rate when one was measured; all-reduce at the bus rate."""
    from lightning_speedup.distributed import costmodel as cm

    both = cm.Link.from_bus_bandwidth(2.0, latency_s=0.0, p2p_gbytes_per_s=1.0)  # 16 Gb/s bus, 8 Gb/s p2p
    bus_only = cm.Link.from_bus_bandwidth(2.0, latency_s=0.0)
    assert cm.p2p_time(1e9, 1, both) == pytest.approx(1.0) and cm.p2p_time(1e9, 1, bus_only) == pytest.approx(
        0.5
    )
    assert cm.allreduce_time(1e9, 2, both) == cm.allreduce_time(1e9, 2, bus_only) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="p2p_gbps"):
        cm.Link(10.0, p2p_gbps=0.0)
    results = {
        "model": {"num_params": 250_000_000, "num_buckets": 1},
        "compute_s": 0.1,
        "world_size": 4,
        "networks": {"sockets": {"busbw_gbytes_per_s": 2.0, "p2p_gbytes_per_s": 1.0}},
        "throughput": [
            {
                "strategy": s,
                "network": "sockets",
                "step_time_s": t,
                "cost_model": {"kind": k, "label": s, "degree": 1},
            }
            for s, k, t in (("ddp", "ddp", 0.85), ("gossip_exponential", "gossip", 1.1))
        ],
    }
    _, parsed, _ = cm.measurements_from_results(results)
    assert {(m.link.bandwidth_gbps, m.link.p2p_gbps) for m in parsed} == {(16.0, 8.0)}
    # the CLI: fit on one file, the other is an out-of-sample check; --fit-on must name given files
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "fit.json"
    cm.main(
        [
            "--results",
            str(path),
            "--fit-on",
            str(path),
            "--out",
            str(tmp_path / "s.png"),
            "--json-out",
            str(out),
        ]
    )
    payload = json.loads(out.read_text())
    assert payload["fit_on"] == ["r.json"] and all(r["in_sample"] for r in payload["validation"])
    with pytest.raises(SystemExit):
        cm.main(["--results", str(path), "--fit-on", "other.json", "--out", str(tmp_path / "s.png")])


def test_cost_model_calibration_recovers_known_constants_and_plots(tmp_path: Path) -> None:
    from lightning_speedup.distributed import costmodel as cm

    truth = cm.Calibration(
        bandwidth_efficiency=0.6, ddp_overlap=0.35, gossip_overlap=0.8, sync_overhead_s=1e-3,
        powersgd_s_per_mparam=7e-4,  # about what PowerSGD rank 4 cost on an H200 (2026-11-27)
    )  # fmt: skip
    w = cm.Workload(num_params=85_000_000, compute_s=0.03)
    measurements = [
        cm.Measurement(m, w, 2, link, cm.step_time(m, w, 2, link, truth))
        for link in (cm.Link.from_bus_bandwidth(3.0), cm.Link.from_bus_bandwidth(300.0))
        for m in cm.default_methods()
    ]
    cal = cm.calibrate(measurements)
    assert all(abs(r["ratio"] - 1) < 0.05 for r in cm.validate(measurements, cal)), cm.validate(
        measurements, cal
    )
    assert cal.bandwidth_efficiency == pytest.approx(0.6, rel=0.1)
    assert cal.powersgd_s_per_mparam == pytest.approx(7e-4, rel=0.1)
    # the compressor's compute is paid on a fast link too, where the wire saving buys nothing
    psgd = next(m for m in cm.default_methods() if m.compressor == "powersgd")
    fast = cm.Link.from_bus_bandwidth(300.0)
    assert cm.step_time(psgd, w, 2, fast, cal) > cm.step_time(cm.Method("ddp"), w, 2, fast, cal)
    with pytest.raises(ValueError, match="Unknown compressor"):
        cm.Method("ddp", compressor="topk")
    # a result file in the benchmark's schema goes through the same path
    results = {
        "model": {"num_params": w.num_params, "num_buckets": 8},
        "compute_s": w.compute_s,
        "world_size": 2,
        "networks": {"sockets": {"busbw_gbytes_per_s": 3.0}},
        "throughput": [
            {
                "strategy": "ddp",
                "network": "sockets",
                "step_time_s": 0.2,
                "cost_model": {"kind": "ddp", "label": "ddp"},
            },
            {"strategy": "compute_only", "network": "sockets", "step_time_s": 0.03, "cost_model": None},
        ],
    }
    workload, parsed, _ = cm.measurements_from_results(results)
    assert workload.num_params == w.num_params and len(parsed) == 1 and parsed[0].link.bandwidth_gbps == 24.0
    png = tmp_path / "scaling.png"
    curves = cm.plot_scaling(w, png, cal=cal, nodes=(1, 2, 512))
    assert png.stat().st_size > 10_000
    assert curves[10.0]["ddp"][0] == 1.0 and curves[100.0]["diloco (H=100)"][-1] > curves[100.0]["ddp"][-1]
