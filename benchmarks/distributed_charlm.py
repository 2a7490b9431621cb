"""Communication-efficient data parallelism on GPUs (issue 6): DDP vs each strategy, fast vs slow interconnect.

Char-LM on Tiny Shakespeare scaled up so that communication matters: GPT 12 layers x 768 wide
(about 85M parameters, 340 MB of fp32 gradients), context 256, ``--batch-size`` sequences per GPU,
bf16-mixed, AdamW 1e-3 with 100 warm-up steps. Strategies (their string presets unless noted):

  ddp                  Lightning's DDPStrategy (fp32 gradient all-reduce, overlapped with backward)
  ddp_bf16_compress    CompressedDDPStrategy(compression="bf16")
  ddp_powersgd         CompressedDDPStrategy(compression="powersgd", rank=4); throughput is measured in the
                       compressed phase (start_iter=2 instead of the preset's 100, so that the CUDA graphs
                       are captured, at step 3, before the timed window)
  ddp_powersgd_eager   the same with cuda_graphs=False (the compression launched op by op every step)
  local_sgd            LocalSGDStrategy(sync_every=16; --local-sgd-every)
  diloco               DiLoCoStrategy(sync_every=100, outer SGD lr 0.7, Nesterov 0.9; --diloco-every, --diloco-outer-lr, ...)
  gossip_ring          GossipSGDStrategy(topology="ring"); skipped on 2 GPUs, where it is gossip_exponential
  gossip_exponential   GossipSGDStrategy(topology="exponential")
  compute_only         LocalSGDStrategy(sync_every=10**9): no communication at all; its step time is the
                       cost model's compute time C
The averaging strategies run with consensus_every=0: the consensus distance is a diagnostic that costs an
all-reduce of the model each time it is sampled.

Two interconnects, each in its own process tree (NCCL reads its settings once per process):
  nvlink    NCCL defaults (P2P over NVLink), NCCL_NVLS_ENABLE=0
  sockets   NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NVLS_ENABLE=0: traffic through the socket transport,
            about a 25 Gb/s network on a 2xH200 host

Each worker first measures NCCL all-reduce bus bandwidth (nccl-tests' busbw = algbw * 2(n-1)/n, 256 MB
fp32) and point-to-point bandwidth (every rank sends 256 MB to its right neighbour), and records them.

``--mode throughput`` (default): every configuration is a fresh Trainer and model; the clock covers a
window of steps after 5 warm-up steps, synchronized at both ends (32 steps; one full round, 100 steps,
for diloco; two rounds for local_sgd), on rank 0. Configurations are interleaved (a b c ... a b c ...);
each number is the median of ``--repeats`` runs. Tokens/s counts all GPUs' tokens. Afterwards the cost
model (lightning_speedup.distributed.costmodel) is calibrated on the measured step times and the
expected speed-up out to 512 nodes on 10/25/100 Gb/s links is plotted next to the JSON.

``--mode ttt``: time to validation loss ``--target`` (1.47): one run per strategy and interconnect,
validation (of the exactly averaged model) every ``--eval-every`` steps on the whole validation split,
stopping at the target or after ``--max-minutes``. Wall time counts from the start of fit.

Goals of the issue: with sockets, the best strategy reaches the target >= 2x faster than DDP; with NVLink
no strategy is more than 5% below DDP in tokens/s.

Expected runtime on 2 x H100 (estimates, not yet measured): throughput mode about 3.5 minutes (both
interconnects, 3 repeats; ``--networks sockets`` alone about 2). ttt mode: each run stops at the target
or at ``--max-minutes``; with ``--networks sockets --strategies ddp,local_sgd,diloco --max-minutes 3``
at most 9.5 minutes (DDP through sockets is the slow one).

Run on the device (kind nvidia-h100-x2; carry [".data", ".whl"]):
    source benchmarks/device_env.sh && python benchmarks/distributed_charlm.py --out $OUT/distributed_charlm.json
    source benchmarks/device_env.sh && python benchmarks/distributed_charlm.py --mode ttt --networks sockets \
        --strategies ddp,local_sgd,diloco --max-minutes 3 --out $OUT/distributed_charlm_ttt.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _data import text_path  # benchmarks/_data.py: scripts run from this folder

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "distributed_charlm.json"
NETWORKS: dict[str, dict[str, str]] = {
    "nvlink": {"NCCL_NVLS_ENABLE": "0"},
    "sockets": {"NCCL_NVLS_ENABLE": "0", "NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1"},
}
STRATEGIES = (
    "ddp",
    "ddp_bf16_compress",
    "ddp_powersgd",
    "ddp_powersgd_eager",
    "local_sgd",
    "diloco",
    "gossip_ring",
    "gossip_exponential",
    "compute_only",
)


# ---------------------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("throughput", "ttt"), default="throughput")
    p.add_argument("--networks", default="nvlink,sockets", help="comma-separated subset of nvlink,sockets")
    p.add_argument(
        "--strategies", default=",".join(STRATEGIES), help="comma-separated subset of " + ",".join(STRATEGIES)
    )
    p.add_argument("--devices", type=int, default=0, help="GPUs (0: all visible)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per GPU per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--dropout", type=float, default=0.2, help="the GPT's dropout (regularizes the 85M model on 1M chars)"
    )
    p.add_argument("--target", type=float, default=1.47)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-minutes", type=float, default=4.0, help="ttt: cap per run")
    p.add_argument(
        "--caps",
        default="",
        help="ttt: per-strategy caps in minutes overriding --max-minutes, e.g. 'ddp=4,local_sgd=2'",
    )
    p.add_argument(
        "--schedule-steps",
        type=int,
        default=0,
        help="ttt: warm-up-stable-decay over this many steps (linear decay to lr/10 over the last "
        "--decay-fraction); 0: constant LR after the warm-up",
    )
    p.add_argument("--decay-fraction", type=float, default=0.3)
    p.add_argument("--local-sgd-every", type=int, default=16, help="local_sgd: steps between averagings")
    p.add_argument("--diloco-every", type=int, default=100, help="diloco: inner steps per outer step")
    p.add_argument("--diloco-outer-lr", type=float, default=None, help="diloco: outer SGD lr (default 0.7)")
    p.add_argument(
        "--diloco-outer-momentum",
        type=float,
        default=None,
        help="diloco: outer Nesterov momentum (default 0.9)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data",
        default=None,
        help="Tiny Shakespeare input.txt (default: $LIGHTNING_SPEEDUP_DATA, .data, ../shared/data)",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU/gloo dry run with a tiny model (checks the script, no numbers)",
    )
    p.add_argument(
        "--resummarize", type=Path, default=None, help="recompute the ttt summary of a result file (no GPU)"
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # network name: run as a torchrun worker
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.schedule_steps < 0 or not 0.0 < args.decay_fraction <= 1.0:
        p.error(
            f"--schedule-steps must be >= 0 and --decay-fraction in (0, 1]; got {args.schedule_steps}, "
            f"{args.decay_fraction}"
        )
    if args.local_sgd_every < 1 or args.diloco_every < 1:
        p.error(
            f"--local-sgd-every and --diloco-every must be >= 1; got {args.local_sgd_every}, {args.diloco_every}"
        )
    args.caps = parse_caps(args.caps)  # {strategy: minutes}; a typo fails here, not inside the workers
    return args


def parse_caps(text: str) -> dict[str, float]:
    """``'ddp=4,local_sgd=2'`` -> ``{'ddp': 4.0, 'local_sgd': 2.0}``."""
    caps: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        name, sep, minutes = item.partition("=")
        if not sep or name not in STRATEGIES:
            raise SystemExit(
                f"--caps: expected STRATEGY=MINUTES with a strategy from {list(STRATEGIES)}, got {item!r}"
            )
        caps[name] = float(minutes)
    return caps


def driver(args: argparse.Namespace) -> None:
    import torch

    from lightning_speedup.bench.env import environment

    devices = args.devices or (2 if args.smoke else torch.cuda.device_count())
    if devices < 2:
        raise SystemExit(f"distributed_charlm needs >= 2 GPUs, found {devices}.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "benchmark": "distributed_charlm",
        "mode": args.mode,
        "env": environment(),
        "args": vars(args),
    }
    results["networks"], rows, ttt = {}, [], []
    stop = False
    for network in args.networks.split(","):
        if stop:
            break
        if network not in NETWORKS:
            raise SystemExit(f"Unknown network {network!r}; choose from {list(NETWORKS)}.")
        worker_out = out.with_name(f"{out.stem}.{network}.worker.json")
        env = {**os.environ, **NETWORKS[network], "PYTHONUNBUFFERED": "1"}
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={devices}",
            __file__, *sys.argv[1:], "--worker", network, "--worker-out", str(worker_out),
        ]  # fmt: skip
        print(
            f"[{network}] {' '.join(f'{k}={v}' for k, v in NETWORKS[network].items())} {' '.join(cmd)}",
            flush=True,
        )
        proc = subprocess.Popen(cmd, env=env)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # the device deadline (timeout --signal=INT reaches the workers too)
            rc = proc.wait()
            stop = True
        if rc != 0:
            # A deadline or a crash: keep what the workers finished (they rewrite the file after each run).
            print(f"[{network}] workers exited with {rc}; keeping the runs that finished", flush=True)
            results.setdefault("incomplete", []).append({"network": network, "returncode": rc})
            if not worker_out.exists():
                continue
        part = json.loads(worker_out.read_text())
        results["networks"][network] = part["network"]
        results.setdefault("model", part["model"])
        results["world_size"] = part["world_size"]
        rows += part["throughput"]
        ttt += part["ttt"]
        worker_out.unlink()
    results["throughput"] = rows
    results["ttt"] = ttt
    results["summary"] = summarize(rows)
    results["ttt_summary"] = summarize_ttt(ttt, args.target)
    compute = [r["step_time_s"] for r in rows if r["strategy"] == "compute_only"]
    results["compute_s"] = statistics.median(compute) if compute else None
    if args.mode == "throughput" and results["compute_s"]:
        results["cost_model"] = fit_cost_model(results, out.with_suffix(".scaling.png"))
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    print_table(results)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for network in dict.fromkeys(r["network"] for r in rows):
        ddp = [r["step_time_s"] for r in rows if r["network"] == network and r["strategy"] == "ddp"]
        ddp_med = statistics.median(ddp) if ddp else None
        for strategy in dict.fromkeys(r["strategy"] for r in rows if r["network"] == network):
            mine = [r for r in rows if r["network"] == network and r["strategy"] == strategy]
            med = statistics.median(r["step_time_s"] for r in mine)
            out.append(
                {
                    "network": network,
                    "strategy": strategy,
                    "step_time_s": med,
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
                    "speedup_vs_ddp": ddp_med / med if ddp_med else None,
                    "repeats": len(mine),
                }
            )
    return out


def _first_time_at(curve: list[Any], loss: float) -> float | None:
    """Wall time of the first validation at or below ``loss`` (None: never)."""
    return next((t for _, t, v in curve if v <= loss), None)


def summarize_ttt(rows: list[dict[str, Any]], target: float) -> list[dict[str, Any]]:
    """Per network and strategy: time to ``target`` and time to the best loss DDP reached, both vs DDP.

    When DDP never reaches the target, ``target_speedup_at_least`` is DDP's whole run time over the
    strategy's time to target: a lower bound. ``ddp_best`` is the loss DDP reached at best in its run; the
    time to it compares the methods at a loss both can reach (DDP's at its own best validation).
    """
    out = []
    for network in dict.fromkeys(r["network"] for r in rows):
        mine = [r for r in rows if r["network"] == network]
        ddp = next((r for r in mine if r["strategy"] == "ddp"), None)
        ddp_best = ddp["best_val_loss"] if ddp and ddp["curve"] else None
        ddp_to_best = _first_time_at(ddp["curve"], ddp_best) if ddp_best is not None else None
        ddp_run_s = ddp["curve"][-1][1] if ddp and ddp["curve"] else None
        for r in mine:
            t_target = _first_time_at(r["curve"], target)
            t_best = _first_time_at(r["curve"], ddp_best) if ddp_best is not None else None
            row = {
                "network": network,
                "strategy": r["strategy"],
                "target": target,
                "time_to_target_s": t_target,
                "best_val_loss": r["best_val_loss"],
                "run_s": r["curve"][-1][1] if r["curve"] else None,
                "ddp_best": ddp_best,
                "time_to_ddp_best_s": t_best,
                "speedup_to_ddp_best": ddp_to_best / t_best if ddp_to_best and t_best else None,
                "target_speedup": None,
                "target_speedup_at_least": None,
            }
            if ddp is not None and t_target is not None:
                ddp_target = _first_time_at(ddp["curve"], target)
                if ddp_target is not None:
                    row["target_speedup"] = ddp_target / t_target
                elif ddp_run_s:
                    row["target_speedup_at_least"] = ddp_run_s / t_target
            out.append(row)
    return out


def resummarize(path: Path) -> None:
    """Recompute ``ttt_summary`` of a committed ttt result file in place (no GPU needed)."""
    results = json.loads(path.read_text())
    results["ttt_summary"] = summarize_ttt(results["ttt"], results["args"]["target"])
    path.write_text(json.dumps(results, indent=2))
    print_table(results)


def fit_cost_model(results: dict[str, Any], png: Path) -> dict[str, Any]:
    """Calibrate the cost model on the median step times and plot the expected scaling."""
    from dataclasses import asdict

    from lightning_speedup.distributed import costmodel as cm

    workload, measurements, ratio = cm.measurements_from_results(results)  # medians of the repeats
    cal = cm.calibrate(measurements)
    curves = cm.plot_scaling(workload, png, cm.default_methods(ratio or 0.05), cal=cal)
    return {
        "calibration": asdict(cal),
        "validation": cm.validate(measurements, cal),
        "plot": str(png),
        "curves": {str(k): v for k, v in curves.items()},
    }


def print_table(results: dict[str, Any]) -> None:
    env = results["env"]
    print(
        f"\n{env.get('gpu')} x{results.get('world_size')}  torch {env['torch']}  lightning {env['lightning']}"
    )
    for name, net in results["networks"].items():
        print(
            f"  {name:<8} all-reduce busbw {net['busbw_gbytes_per_s']:.1f} GB/s, p2p {net['p2p_gbytes_per_s']:.1f} GB/s"
        )
    if results["summary"]:
        print(f"{'network':<8} {'strategy':<20} {'step ms':>8} {'tokens/s':>10} {'vs ddp':>7}")
        for s in results["summary"]:
            vs = f"{s['speedup_vs_ddp']:.2f}x" if s["speedup_vs_ddp"] else "-"
            print(
                f"{s['network']:<8} {s['strategy']:<20} {s['step_time_s'] * 1e3:>8.1f} {s['tokens_per_s']:>10.0f} {vs:>7}"
            )
    if results.get("cost_model"):
        print("cost model (predicted / measured step time):")
        for v in results["cost_model"]["validation"]:
            print(f"  {v['method']:<24} {v['link_gbps']:>7.0f} Gb/s  {v['ratio']:.2f}")
    if results.get("ttt_summary"):

        def fmt(x: float | None, spec: str) -> str:
            return "-" if x is None else format(x, spec)

        print(
            f"{'network':<8} {'strategy':<20} {'to target s':>11} {'vs ddp':>8} {'best val':>8} "
            f"{'to ddp best s':>13} {'vs ddp':>6}"
        )
        for t in results["ttt_summary"]:
            vs = (
                fmt(t["target_speedup"], ".2f")
                if t["target_speedup_at_least"] is None
                else (f">={t['target_speedup_at_least']:.2f}")
            )
            print(
                f"{t['network']:<8} {t['strategy']:<20} {fmt(t['time_to_target_s'], '.1f'):>11} {vs:>8} "
                f"{t['best_val_loss']:>8.3f} {fmt(t['time_to_ddp_best_s'], '.1f'):>13} "
                f"{fmt(t['speedup_to_ddp_best'], '.2f'):>6}"
            )


# ---------------------------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    import torch.distributed as dist
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import DDPStrategy
    from torch import Tensor
    from torch.utils.data import DataLoader, Dataset
    from typing_extensions import override

    import lightning_speedup.distributed as lsd
    from lightning_speedup.bench.datasets import load_text_corpus
    from lightning_speedup.bench.models import count_parameters
    from lightning_speedup.bench.modules import CharLM

    local_rank = int(os.environ["LOCAL_RANK"])
    if args.smoke:  # CPU/gloo dry run: same code path, tiny sizes
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        args.n_layer, args.n_embd, args.n_head, args.block_size, args.batch_size = 1, 32, 2, 32, 4
        args.repeats, args.window, args.warmup, args.eval_every = 1, 3, 2, 5
    else:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    network = args.worker

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # ---- interconnect bandwidth, recorded next to every number that depends on it
    def time_it(fn: Any, iters: int = 10) -> float:
        for _ in range(3):
            fn()
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return (time.perf_counter() - t0) / iters

    def measure_bandwidth() -> dict[str, Any]:
        x = torch.ones(64 * 1024 * 1024 if not args.smoke else 1024, device=device)  # 256 MB fp32
        recv = torch.empty_like(x)
        t_ar = time_it(lambda: dist.all_reduce(x))

        def ring_p2p() -> None:
            ops = [
                dist.P2POp(dist.isend, x, (rank + 1) % world),
                dist.P2POp(dist.irecv, recv, (rank - 1) % world),
            ]
            for w in dist.batch_isend_irecv(ops):
                w.wait()

        t_p2p = time_it(ring_p2p)
        algbw = x.numel() * 4 / t_ar / 1e9
        return {
            "env": NETWORKS[network],
            "allreduce_bytes": x.numel() * 4,
            "algbw_gbytes_per_s": algbw,
            "busbw_gbytes_per_s": algbw * 2 * (world - 1) / world,
            "p2p_gbytes_per_s": x.numel() * 4 / t_p2p / 1e9,
        }

    net_info = measure_bandwidth()

    # ---- data: random-offset windows, distinct per rank through the DistributedSampler
    corpus = load_text_corpus(text_path(args.data, "--data"))
    T = args.block_size

    class Windows(Dataset):
        def __init__(self, ids: Tensor, stride: int) -> None:
            self.ids, self.stride = ids, stride
            self.n = (len(ids) - T - 1) // stride

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
            chunk = self.ids[i * self.stride : i * self.stride + T + 1]
            return chunk[:-1], chunk[1:]

    train_set = Windows(corpus.train_ids, stride=7)  # ~143k overlapping windows
    val_set = Windows(corpus.val_ids, stride=T)  # the whole validation split once

    def loaders() -> tuple[DataLoader, DataLoader]:
        # No worker processes: slicing a token tensor is microseconds, and workers would add start-up per run.
        train = DataLoader(
            train_set,
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            pin_memory=device.type == "cuda",
        )
        val = DataLoader(val_set, batch_size=64)
        return train, val

    class BenchCharLM(CharLM):
        """CharLM with a linear warm-up of the learning rate (100 steps), then constant or, with
        ``--schedule-steps``, warm-up-stable-decay in optimizer steps (the same for every strategy)."""

        @property
        def warmup_steps(self) -> int:
            return 100

        def lr_factor(self, step: int) -> float:
            warm = min(1.0, (step + 1) / self.warmup_steps)
            total = args.schedule_steps if args.mode == "ttt" else 0
            if not total:
                return warm
            decay_start = total * (1.0 - args.decay_fraction)
            if step < decay_start:
                return warm
            return max(0.1, 1.0 - 0.9 * (step - decay_start) / max(1.0, total - decay_start))

        def configure_optimizers(self) -> Any:
            opt = super().configure_optimizers()
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def make_model() -> BenchCharLM:
        L.seed_everything(args.seed, verbose=False)
        with device:
            return BenchCharLM(
                vocab_size=corpus.vocab_size, block_size=T, n_layer=args.n_layer, n_head=args.n_head,
                n_embd=args.n_embd, dropout=args.dropout, lr=args.lr, betas=(0.9, 0.99),
            )  # fmt: skip

    probe = make_model()
    num_params = count_parameters(probe)
    model_info = {
        "n_layer": args.n_layer,
        "n_embd": args.n_embd,
        "dropout": args.dropout,
        "block_size": T,
        "batch_size_per_gpu": args.batch_size,
        "num_params": num_params,
        "num_buckets": math.ceil(num_params * 4 / (25 * 2**20)),  # DDP's 25 MB buckets
    }
    del probe

    def make_strategy(name: str, throughput: bool) -> tuple[Any, dict[str, Any] | None]:
        """The strategy object and its cost-model description."""
        if name == "ddp":
            return DDPStrategy(), {"kind": "ddp", "label": name}
        if name == "ddp_bf16_compress":
            return lsd.CompressedDDPStrategy(compression="bf16"), {
                "kind": "ddp",
                "label": name,
                "wire_fraction": 0.5,
            }
        if name in ("ddp_powersgd", "ddp_powersgd_eager"):
            # throughput: compressed from step 2, so the CUDA graphs are captured (step 3) before the window
            start = 2 if throughput else 100
            graphs = name == "ddp_powersgd"
            strategy = lsd.CompressedDDPStrategy(
                compression="powersgd", rank=4, start_iter=start, cuda_graphs=graphs
            )
            return strategy, {"kind": "ddp", "label": name, "compressor": "powersgd"}
        if name == "local_sgd":
            return lsd.LocalSGDStrategy(sync_every=args.local_sgd_every, consensus_every=0), {
                "kind": "local_sgd",
                "label": name,
                "sync_every": args.local_sgd_every,
            }
        if name == "diloco":
            outer = {
                k: v
                for k, v in (
                    ("outer_lr", args.diloco_outer_lr),
                    ("outer_momentum", args.diloco_outer_momentum),
                )
                if v is not None
            }
            return lsd.DiLoCoStrategy(sync_every=args.diloco_every, consensus_every=0, **outer), {
                "kind": "diloco",
                "label": name,
                "sync_every": args.diloco_every,
            }
        if name == "gossip_ring":
            return lsd.GossipSGDStrategy(topology="ring", consensus_every=0), {
                "kind": "gossip",
                "label": name,
                "degree": 2,
            }
        if name == "gossip_exponential":
            return lsd.GossipSGDStrategy(topology="exponential", consensus_every=0), {
                "kind": "gossip",
                "label": name,
                "degree": 1,
            }
        if name == "compute_only":
            return lsd.LocalSGDStrategy(sync_every=10**9, consensus_every=0), None
        raise SystemExit(f"Unknown strategy {name!r}; choose from {list(STRATEGIES)}.")

    def window_for(name: str) -> int:
        if args.smoke:
            return args.window
        return {"diloco": args.diloco_every, "local_sgd": max(args.window, 2 * args.local_sgd_every)}.get(
            name, args.window
        )

    class WindowTimer(Callback):
        def __init__(self, warmup: int, window: int) -> None:
            self.warmup, self.window = warmup, window
            self.t0 = self.t1 = 0.0

        @override
        def on_train_batch_start(self, trainer: L.Trainer, *a: Any) -> None:
            if trainer.global_step == self.warmup:
                sync()
                self.t0 = time.perf_counter()

        @override
        def on_train_batch_end(self, trainer: L.Trainer, *a: Any) -> None:
            if trainer.global_step == self.warmup + self.window:
                sync()
                self.t1 = time.perf_counter()

    def trainer(strategy: Any, **kw: Any) -> L.Trainer:
        return L.Trainer(
            accelerator=device.type, devices=world, strategy=strategy,
            precision="bf16-mixed" if device.type == "cuda" else "32-true", logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw,
        )  # fmt: skip

    names = [s for s in args.strategies.split(",") if s]
    if world == 2 and "gossip_ring" in names and "gossip_exponential" in names:
        names.remove("gossip_ring")  # on two processes both graphs are "average with the other one"
    rows: list[dict[str, Any]] = []
    ttt_rows: list[dict[str, Any]] = []

    def save_partial() -> None:
        """Rewritten after every run, so a run cut short by a deadline keeps what finished."""
        if rank == 0:
            part = {"network": net_info, "model": model_info, "world_size": world}
            Path(args.worker_out).write_text(json.dumps({**part, "throughput": rows, "ttt": ttt_rows}))

    if args.mode == "throughput":
        for repeat in range(args.repeats):
            for name in names:
                strategy, cm = make_strategy(name, throughput=True)
                window = window_for(name)
                timer = WindowTimer(args.warmup, window)
                train, _ = loaders()
                t = trainer(strategy, max_steps=args.warmup + window, limit_val_batches=0, callbacks=[timer])
                t.fit(make_model(), train)
                step = (timer.t1 - timer.t0) / window
                row = {
                    "network": network, "strategy": name, "repeat": repeat, "window": window,
                    "step_time_s": step, "tokens_per_s": world * args.batch_size * T / step, "cost_model": cm,
                }  # fmt: skip
                stats = getattr(t.strategy, "comm_stats", {})
                row["comm_stats"] = stats
                if "compression_ratio" in stats and cm is not None:
                    cm["wire_fraction"] = row["wire_fraction"] = 1.0 / stats["compression_ratio"]
                rows.append(row)
                save_partial()
                if rank == 0:
                    print(f"[{network}] {name:<20} repeat {repeat}: {step * 1e3:.1f} ms/step", flush=True)
                del t, strategy
    else:

        class Target(Callback):
            def __init__(self) -> None:
                self.t0 = 0.0
                self.reached: tuple[float, int] | None = None
                self.best = float("inf")
                self.curve: list[tuple[int, float, float]] = []

            @override
            def on_fit_start(self, trainer: L.Trainer, *a: Any) -> None:
                sync()
                self.t0 = time.perf_counter()

            @override
            def on_validation_end(self, trainer: L.Trainer, *a: Any) -> None:
                if trainer.sanity_checking:
                    return
                loss = float(trainer.callback_metrics["val_loss"])
                elapsed = time.perf_counter() - self.t0
                self.best = min(self.best, loss)
                self.curve.append((trainer.global_step, elapsed, loss))
                if loss <= args.target and self.reached is None:
                    self.reached = (elapsed, trainer.global_step)
                    trainer.should_stop = True

        def ttt_row(name: str, target: Target, steps: int, minutes: float) -> dict[str, Any]:
            reached = target.reached
            return {
                "network": network,
                "strategy": name,
                "reached": reached is not None,
                "time_s": reached[0] if reached else None,
                "steps": reached[1] if reached else steps,
                "best_val_loss": target.best,
                "max_minutes": minutes,
                "schedule_steps": args.schedule_steps,
                "tokens_per_s": world * args.batch_size * T * reached[1] / reached[0] if reached else None,
                "curve": target.curve,
            }

        for name in names:
            if name == "compute_only":
                continue
            strategy, _ = make_strategy(name, throughput=False)
            target = Target()
            train, val = loaders()
            minutes = args.caps.get(name, args.max_minutes)
            t = trainer(
                strategy, max_steps=10 if args.smoke else 100_000, max_time={"minutes": minutes},
                val_check_interval=args.eval_every, limit_val_batches=2 if args.smoke else None,
                check_val_every_n_epoch=None, num_sanity_val_steps=0, callbacks=[target],
            )  # fmt: skip
            try:
                t.fit(make_model(), train, val)
            except SystemExit:  # Lightning's graceful shutdown after SIGINT (the device deadline)
                ttt_rows.append({**ttt_row(name, target, t.global_step, minutes), "interrupted": True})
                save_partial()
                raise
            ttt_rows.append(ttt_row(name, target, t.global_step, minutes))
            save_partial()
            if rank == 0:
                print(f"[{network}] {name}: {ttt_rows[-1]}", flush=True)
            del t, strategy

    save_partial()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    cli = parse_args()
    if cli.resummarize:
        resummarize(cli.resummarize)
    elif cli.worker:
        worker(cli)
    else:
        driver(cli)
