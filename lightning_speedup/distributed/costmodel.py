"""Cost model: predicted step time of DDP, local SGD, DiLoCo and gossip at any scale, calibrated on measurements.

This is how the project speaks about scale it cannot run. The model is the standard
alpha-beta (latency-bandwidth) model of collectives (Hockney 1994; Thakur, Rabenseifner and
Gropp, "Optimization of Collective Communication Operations in MPICH", 2005):

- ring all-reduce of ``S`` bytes over ``n`` members, ``k`` buckets:
  ``2 (n-1) k alpha + 2 (n-1)/n * S / B``;
- gossip: ``d`` point-to-point messages of ``S`` bytes per step: ``d (k alpha + S / B)``,
  independent of ``n``.

Per optimizer step, with ``C`` the compute time of one step on one device:

- DDP (and compressed DDP, with ``S`` scaled by the wire fraction): ``C + P + max(0, T_ar - w C)``,
  where ``w`` (calibrated) is the fraction of compute the bucketed all-reduce hides behind and ``P``
  the compressor's own compute (PowerSGD's low-rank products and orthogonalization: ``p`` seconds
  per million parameters, calibrated; zero for bf16 casts and for plain DDP);
- local SGD / DiLoCo every ``H`` steps: ``C + (T_ar + o) / H`` (``o``: fixed per-sync overhead);
- gossip: ``C + max(0, T_p2p - v C)`` with overlap, ``C + T_p2p`` without.

``B`` is the link's line rate times a calibrated efficiency; predictions are of *throughput*
(time per step). Time-to-target also needs the number of steps each method takes, which the
algorithmic benchmark (``benchmarks/distributed_cpu_algorithmic.py``) measures as a ratio to DDP;
:func:`time_to_target_speedup` combines the two.

``python -m lightning_speedup.distributed.costmodel --results R.json --out scaling.png``
calibrates on a ``benchmarks/distributed_charlm.py`` result file and plots the expected speed-up
out to 512 nodes on 10/25/100 Gb/s links.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

METHODS: tuple[str, ...] = ("ddp", "local_sgd", "diloco", "gossip")


@dataclass(frozen=True)
class Link:
    """A node's network link: line rate in Gb/s, per-message latency in seconds, and optionally the rate a
    single point-to-point exchange achieves (``p2p_gbps``; default: the line rate).

    Measured links have both: NCCL's ring all-reduce spreads over several channels and connections,
    while one send/receive pair to a neighbour often gets less (over NCCL's sockets transport,
    well under the all-reduce bus bandwidth), and gossip only does the latter.
    """

    bandwidth_gbps: float
    latency_s: float = 30e-6
    p2p_gbps: float | None = None

    def __post_init__(self) -> None:
        if self.bandwidth_gbps <= 0:
            raise ValueError(f"bandwidth_gbps must be > 0, got {self.bandwidth_gbps}.")
        if self.latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s}.")
        if self.p2p_gbps is not None and self.p2p_gbps <= 0:
            raise ValueError(f"p2p_gbps must be > 0 (or None for the line rate), got {self.p2p_gbps}.")

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gbps * 1e9 / 8

    @property
    def p2p_bytes_per_s(self) -> float:
        return (self.p2p_gbps if self.p2p_gbps is not None else self.bandwidth_gbps) * 1e9 / 8

    @staticmethod
    def from_bus_bandwidth(
        gbytes_per_s: float, latency_s: float = 30e-6, p2p_gbytes_per_s: float | None = None
    ) -> Link:
        """A link whose line rate equals a measured all-reduce *bus* bandwidth (nccl-tests' busbw, GB/s),
        with the measured point-to-point rate (GB/s) if there is one."""
        p2p = p2p_gbytes_per_s * 8 if p2p_gbytes_per_s is not None else None
        return Link(gbytes_per_s * 8, latency_s, p2p)


@dataclass(frozen=True)
class Workload:
    """What one data-parallel worker does per step.

    Args:
        num_params: parameters exchanged (all of the model's).
        compute_s: forward + backward + optimizer time of one step on one device, without communication.
        bytes_per_value: bytes per exchanged value at full precision (4 for fp32 gradients/parameters).
        num_buckets: collectives per exchange (each pays the latency term).
    """

    num_params: int
    compute_s: float
    bytes_per_value: int = 4
    num_buckets: int = 8

    def __post_init__(self) -> None:
        if self.num_params < 1 or self.compute_s <= 0:
            raise ValueError(
                f"num_params must be >= 1 and compute_s > 0, got {self.num_params}, {self.compute_s}."
            )

    @property
    def model_bytes(self) -> float:
        return float(self.num_params * self.bytes_per_value)


@dataclass(frozen=True)
class Method:
    """A data-parallel algorithm as the cost model sees it.

    Args:
        kind: "ddp", "local_sgd", "diloco" or "gossip".
        label: name in plots and tables.
        sync_every: optimizer steps per exchange (local SGD / DiLoCo ``H``; gossip ``gossip_every``).
        wire_fraction: bytes on the wire relative to fp32 (bf16 0.5, int8 ~0.25, PowerSGD its measured ratio).
        degree: gossip messages per step (ring 2, one-peer exponential 1).
        overlap: gossip exchange overlapped with compute.
        compressor: ``"powersgd"`` adds the compressor's compute time (``Calibration.powersgd_s_per_mparam``);
            ``"none"`` (default) for everything else, bf16 casts included (their cost is in the noise).
    """

    kind: str
    label: str = ""
    sync_every: int = 1
    wire_fraction: float = 1.0
    degree: int = 2
    overlap: bool = True
    compressor: str = "none"

    def __post_init__(self) -> None:
        if self.kind not in METHODS:
            raise ValueError(f"Unknown method kind {self.kind!r}; choose one of {list(METHODS)}.")
        if self.compressor not in ("none", "powersgd"):
            raise ValueError(f"Unknown compressor {self.compressor!r}; choose 'none' or 'powersgd'.")
        if self.sync_every < 1 or self.wire_fraction <= 0 or self.degree < 1:
            raise ValueError("sync_every and degree must be >= 1 and wire_fraction > 0.")
        if not self.label:
            object.__setattr__(self, "label", self.kind)


@dataclass(frozen=True)
class Calibration:
    """Fitted constants: achieved fraction of line rate, latency scale, overlap fractions, per-sync overhead,
    and PowerSGD's compute per million parameters per step."""

    bandwidth_efficiency: float = 1.0
    latency_scale: float = 1.0
    ddp_overlap: float = 0.5
    gossip_overlap: float = 1.0
    sync_overhead_s: float = 0.0
    powersgd_s_per_mparam: float = 0.0


def allreduce_time(
    nbytes: float, n: int, link: Link, cal: Calibration = Calibration(), buckets: int = 1
) -> float:
    """Ring all-reduce of ``nbytes`` over ``n`` members: ``2(n-1) k alpha + 2(n-1)/n S/B``."""
    if n <= 1:
        return 0.0
    bandwidth = link.bytes_per_s * cal.bandwidth_efficiency
    return 2 * (n - 1) * buckets * link.latency_s * cal.latency_scale + 2 * (n - 1) / n * nbytes / bandwidth


def p2p_time(
    nbytes: float, degree: int, link: Link, cal: Calibration = Calibration(), buckets: int = 1
) -> float:
    """``degree`` messages of ``nbytes`` through one link: ``d (k alpha + S/B_p2p)``."""
    bandwidth = link.p2p_bytes_per_s * cal.bandwidth_efficiency
    return degree * (buckets * link.latency_s * cal.latency_scale + nbytes / bandwidth)


def step_time(
    method: Method, workload: Workload, n: int, link: Link, cal: Calibration = Calibration()
) -> float:
    """Predicted seconds per optimizer step of ``method`` on ``n`` workers."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    compute = workload.compute_s
    if n == 1:
        return compute
    nbytes = workload.model_bytes * method.wire_fraction
    k = workload.num_buckets
    if method.kind == "ddp":
        compress = (
            cal.powersgd_s_per_mparam * workload.num_params / 1e6 if method.compressor == "powersgd" else 0.0
        )
        return (
            compute + compress + max(0.0, allreduce_time(nbytes, n, link, cal, k) - cal.ddp_overlap * compute)
        )
    if method.kind in ("local_sgd", "diloco"):
        return compute + (allreduce_time(nbytes, n, link, cal, k) + cal.sync_overhead_s) / method.sync_every
    degree = min(method.degree, n - 1)  # small graphs fold neighbours together (a ring of 2 has one)
    comm = p2p_time(nbytes, degree, link, cal, k) + cal.sync_overhead_s
    exposed = max(0.0, comm - cal.gossip_overlap * compute) if method.overlap else comm
    return compute + exposed / method.sync_every


def throughput_speedup(
    method: Method, workload: Workload, n: int, link: Link, cal: Calibration = Calibration()
) -> float:
    """Samples per second on ``n`` workers relative to one worker (ideal: ``n``)."""
    return n * workload.compute_s / step_time(method, workload, n, link, cal)


def time_to_target_speedup(
    method: Method,
    baseline: Method,
    workload: Workload,
    n: int,
    link: Link,
    steps_ratio: float,
    cal: Calibration = Calibration(),
) -> float:
    """Time-to-target of ``baseline`` over that of ``method``, which needs ``steps_ratio`` times its steps."""
    if steps_ratio <= 0:
        raise ValueError(f"steps_ratio must be > 0, got {steps_ratio}.")
    return step_time(baseline, workload, n, link, cal) / (
        steps_ratio * step_time(method, workload, n, link, cal)
    )


@dataclass(frozen=True)
class Measurement:
    """One measured configuration: its method, workload, world size, link, and measured seconds per step."""

    method: Method
    workload: Workload
    n: int
    link: Link
    step_time_s: float


def calibrate(
    measurements: Sequence[Measurement],
    efficiencies: Sequence[float] | None = None,
    overlaps: Sequence[float] | None = None,
    overheads: Sequence[float] | None = None,
    rounds: int = 6,
) -> Calibration:
    """Fit :class:`Calibration` to measured step times (squared log error), one grid per constant in turn.

    Coordinate descent over the bandwidth efficiency, the DDP and gossip overlap fractions, the
    per-sync overhead and PowerSGD's compute; a constant that no measurement depends on keeps its default.

    Raises:
        ValueError: if ``measurements`` is empty.
    """
    if not measurements:
        raise ValueError("calibrate needs at least one measurement.")
    grids: dict[str, Sequence[float]] = {
        "bandwidth_efficiency": efficiencies or [0.05 * 1.1**i for i in range(50)],  # 0.05 .. ~5.3
        "sync_overhead_s": overheads or [0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
    }
    if any(m.method.kind == "ddp" for m in measurements):
        grids["ddp_overlap"] = overlaps or [i / 20 for i in range(21)]
    if any(m.method.kind == "gossip" and m.method.overlap for m in measurements):
        grids["gossip_overlap"] = overlaps or [i / 20 for i in range(21)]
    if any(m.method.compressor == "powersgd" for m in measurements):
        grids["powersgd_s_per_mparam"] = [0.0] + [1e-6 * 1.15**i for i in range(80)]  # 1 us .. ~60 ms per M

    def loss(cal: Calibration) -> float:
        return sum(
            math.log(step_time(m.method, m.workload, m.n, m.link, cal) / m.step_time_s) ** 2
            for m in measurements
        )

    cal = Calibration()
    for _ in range(rounds):
        for name, grid in grids.items():
            cal = min((replace(cal, **{name: v}) for v in grid), key=loss)
    return cal


def validate(measurements: Sequence[Measurement], cal: Calibration) -> list[dict[str, Any]]:
    """Predicted vs measured step time per measurement (``ratio`` = predicted / measured)."""
    rows = []
    for m in measurements:
        pred = step_time(m.method, m.workload, m.n, m.link, cal)
        rows.append(
            {
                "method": m.method.label,
                "n": m.n,
                "link_gbps": m.link.bandwidth_gbps,
                "measured_s": m.step_time_s,
                "predicted_s": pred,
                "ratio": pred / m.step_time_s,
            }
        )
    return rows


def default_methods(powersgd_ratio: float = 0.05) -> list[Method]:
    """The project's strategy strings as cost-model methods (their documented defaults)."""
    return [
        Method("ddp", "ddp"),
        Method("ddp", "ddp_bf16_compress", wire_fraction=0.5),
        Method("ddp", "ddp_powersgd", wire_fraction=powersgd_ratio, compressor="powersgd"),
        Method("local_sgd", "local_sgd (H=16)", sync_every=16),
        Method("diloco", "diloco (H=100)", sync_every=100),
        Method("gossip", "gossip_ring", degree=2),
        Method("gossip", "gossip_exponential", degree=1),
    ]


def scaling_curves(
    workload: Workload,
    methods: Sequence[Method],
    links_gbps: Sequence[float] = (10.0, 25.0, 100.0),
    nodes: Sequence[int] = tuple(2**i for i in range(10)),
    cal: Calibration = Calibration(),
    latency_s: float = 30e-6,
) -> dict[float, dict[str, list[float]]]:
    """Throughput speed-up over one node, per link rate and method, at each node count in ``nodes``."""
    return {
        gbps: {
            m.label: [throughput_speedup(m, workload, n, Link(gbps, latency_s), cal) for n in nodes]
            for m in methods
        }
        for gbps in links_gbps
    }


def plot_scaling(
    workload: Workload,
    path: str | Path,
    methods: Sequence[Method] | None = None,
    links_gbps: Sequence[float] = (10.0, 25.0, 100.0),
    nodes: Sequence[int] = tuple(2**i for i in range(10)),
    cal: Calibration = Calibration(),
    latency_s: float = 30e-6,
    title: str = "",
) -> dict[float, dict[str, list[float]]]:
    """Write a PNG of expected throughput speed-up vs nodes (log-log, one panel per link rate); return the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(methods) if methods is not None else default_methods()
    curves = scaling_curves(workload, methods, links_gbps, nodes, cal, latency_s)
    fig, axes = plt.subplots(
        1, len(links_gbps), figsize=(5 * len(links_gbps), 4.2), sharey=True, squeeze=False
    )
    for ax, gbps in zip(axes[0], links_gbps, strict=True):
        ax.plot(nodes, nodes, "k--", lw=1, label="ideal")
        for label, ys in curves[gbps].items():
            ax.plot(nodes, ys, marker="o", ms=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("nodes (one worker each)")
        ax.set_title(f"{gbps:g} Gb/s per node")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("throughput speed-up over 1 node")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(
        title
        or (
            f"{workload.num_params / 1e6:.0f}M params, {workload.compute_s * 1e3:.0f} ms compute/step; "
            f"bandwidth efficiency {cal.bandwidth_efficiency:.2f}, DDP overlap {cal.ddp_overlap:.2f}"
        ),
        fontsize=9,
    )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return curves


def measurements_from_results(results: dict[str, Any]) -> tuple[Workload, list[Measurement], float | None]:
    """Read a ``benchmarks/distributed_charlm.py`` result file: (workload, measurements, PowerSGD wire ratio).

    Repeats of one (network, strategy) become one measurement at their median step time.
    """
    model = results["model"]
    workload = Workload(
        int(model["num_params"]), float(results["compute_s"]), num_buckets=int(model["num_buckets"])
    )
    out: list[Measurement] = []
    ratio = None
    for row in results["throughput"]:
        if row.get("cost_model") is None or not row.get("step_time_s"):
            continue
        method = Method(**row["cost_model"])
        if row["strategy"] == "ddp_powersgd":
            if "compressor" not in row["cost_model"]:  # result files of 2026-11-27 predate the field
                method = replace(method, compressor="powersgd")
            if row.get("wire_fraction"):
                ratio = float(row["wire_fraction"])
        net = results["networks"][row["network"]]
        p2p = net.get("p2p_gbytes_per_s")
        link = Link.from_bus_bandwidth(
            float(net["busbw_gbytes_per_s"]), p2p_gbytes_per_s=float(p2p) if p2p else None
        )
        out.append(Measurement(method, workload, int(results["world_size"]), link, float(row["step_time_s"])))
    groups: dict[tuple[Method, Link], list[Measurement]] = {}
    for m in out:
        groups.setdefault((m.method, m.link), []).append(m)
    medians = [
        replace(ms[0], step_time_s=statistics.median(m.step_time_s for m in ms)) for ms in groups.values()
    ]
    return workload, medians, ratio


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: calibrate on benchmark result files, print predicted vs measured, write the scaling plot.

    With several ``--results`` the constants are fitted on all of them together (each file keeps its own
    workload and measured links), or only on the files named by ``--fit-on``: the others are then an
    out-of-sample check (e.g. fit on 2 GPUs, predict 4).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--results", required=True, nargs="+", help="JSON files written by benchmarks/distributed_charlm.py"
    )
    parser.add_argument(
        "--fit-on", nargs="*", default=None, help="calibrate on these of the --results only (default: all)"
    )
    parser.add_argument("--out", default="docs/methods/distributed_scaling.png", help="PNG to write")
    parser.add_argument("--json-out", default=None, help="also write calibration + validation + curves here")
    args = parser.parse_args(argv)
    fit_on = set(args.fit_on if args.fit_on is not None else args.results)
    unknown = fit_on - set(args.results)
    if unknown or not fit_on:
        parser.error(f"--fit-on must name some of the --results files; not among them: {sorted(unknown)}")
    per_file: dict[str, list[Measurement]] = {}
    ratio = None
    workload = None
    for path in args.results:
        w, ms, r = measurements_from_results(json.loads(Path(path).read_text()))
        per_file[path] = ms
        ratio = ratio if r is None else r
        workload = workload or w
    assert workload is not None
    cal = calibrate([m for p in args.results if p in fit_on for m in per_file[p]])
    rows = []
    for path in args.results:
        for row in validate(per_file[path], cal):
            rows.append({**row, "file": Path(path).name, "in_sample": path in fit_on})
    methods = default_methods(ratio if ratio is not None else 0.05)
    curves = plot_scaling(workload, args.out, methods, cal=cal)
    print(f"calibration: {cal}")
    print(f"{'method':<22} {'n':>3} {'Gb/s':>8} {'measured':>10} {'predicted':>10} {'ratio':>6}  fit")
    for r in rows:
        print(
            f"{r['method']:<22} {r['n']:>3} {r['link_gbps']:>8.1f} {r['measured_s']:>10.4f} "
            f"{r['predicted_s']:>10.4f} {r['ratio']:>6.2f}  {'in' if r['in_sample'] else 'OUT'}"
        )
    misses = [r for r in rows if abs(r["ratio"] - 1) > 0.2]
    print(f"{len(rows) - len(misses)}/{len(rows)} points within 20%")
    if args.json_out:
        payload = {
            "results": [Path(p).name for p in args.results],
            "fit_on": [Path(p).name for p in args.results if p in fit_on],
            "calibration": asdict(cal),
            "validation": rows,
            "within_20pct": f"{len(rows) - len(misses)}/{len(rows)}",
            "curves": {str(k): v for k, v in curves.items()},
            "workload": asdict(workload),
        }
        Path(args.json_out).write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


__all__ = [
    "Calibration",
    "Link",
    "Measurement",
    "Method",
    "Workload",
    "allreduce_time",
    "calibrate",
    "default_methods",
    "measurements_from_results",
    "p2p_time",
    "plot_scaling",
    "scaling_curves",
    "step_time",
    "throughput_speedup",
    "time_to_target_speedup",
    "validate",
]

if __name__ == "__main__":
    main()
