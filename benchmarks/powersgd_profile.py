"""Where PowerSGD's step time goes (issue 6, goal a): the distributed char-LM's GPT under plain DDP and under
``powersgd_hook``, no Lightning, on ``--devices`` GPUs (NCCL), and a torch.profiler table of the hook's step.

distributed_charlm.py measured PowerSGD at about 0.64x DDP's tokens/s over NVLink on two H200s, some 20 ms per
step above the compute-only step whatever the link (sockets too), so the cost is the compressor's own. This
script times, per configuration, the median step (forward, backward with the hook, SGD step) and, for PowerSGD,
the host time of the hook's compression call (``_powersgd_step``) with and without waiting for the GPU, then
profiles a few compressed steps on rank 0.

    python benchmarks/powersgd_profile.py --devices 2 --out $WORK/powersgd_profile.json
    python benchmarks/powersgd_profile.py --smoke        # CPU/gloo plumbing check (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from distributed_cpu_algorithmic import free_port  # benchmarks/: scripts run from this folder
from torch.nn.parallel import DistributedDataParallel

import lightning_speedup.distributed.hooks as hooks
from lightning_speedup.bench.env import environment
from lightning_speedup.bench.models import GPT, GPTConfig


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = not args.smoke
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    cfg = GPTConfig(65, args.block_size, args.n_layer, args.n_head, args.n_embd, 0.0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    hook_times: list[tuple[float, float]] = []  # (host ms of the call, ms until the GPU finished it)
    original_step = hooks._powersgd_step

    def timed_step(*a: Any, **k: Any) -> None:
        t0 = time.perf_counter()
        original_step(*a, **k)
        t1 = time.perf_counter()
        if args.sync_hook:
            sync()
        hook_times.append(((t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3))

    hooks._powersgd_step = timed_step

    def run(name: str, profile: bool = False) -> dict[str, Any]:
        torch.manual_seed(0)
        model = GPT(cfg).to(device)
        if name == "compute_only":
            net: torch.nn.Module = model
        else:
            net = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
            if name.startswith(
                "ddp_powersgd"
            ):  # ddp_powersgd: CUDA graphs (captured at step 3); _eager: none
                state = hooks.PowerSGDState(
                    params=list(model.parameters()),
                    rank=args.rank,
                    start_iter=2,
                    cuda_graphs=name == "ddp_powersgd",
                )
                net.register_comm_hook(state, hooks.powersgd_hook)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(rank)
        x = torch.randint(0, 65, (args.batch_size, args.block_size), generator=g).to(device)
        hook_times.clear()
        times: list[float] = []

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                logits = net(x)
            F.cross_entropy(logits.float().view(-1, 65), x.view(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                hook_times.clear()
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            if i >= args.warmup:
                times.append((time.perf_counter() - t0) * 1e3)
        row: dict[str, Any] = {"step_ms": statistics.median(times)}
        compressed = list(hook_times)
        if compressed:
            row["hook_host_ms"] = statistics.median(h for h, _ in compressed)
            row["hook_until_gpu_done_ms"] = (
                statistics.median(d for _, d in compressed) if args.sync_hook else None
            )
        if profile:  # every rank steps (the collectives must match); rank 0 records
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with torch_profile(activities=acts) if rank == 0 else contextlib.nullcontext() as prof:
                for _ in range(args.profile_steps):
                    step()
                sync()
            if rank == 0:
                avg = prof.key_averages()
                row["profile_cpu"] = avg.table(sort_by="self_cpu_time_total", row_limit=25)
                if cuda:
                    row["profile_cuda"] = avg.table(sort_by="self_device_time_total", row_limit=15)
        return row

    rows = {}
    for name in args.configs:
        rows[name] = run(name, profile=(name == "ddp_powersgd" and args.profile_steps > 0))
        if rank == 0:
            print(f"{name:14s} {rows[name]['step_ms']:7.2f} ms/step"
                  + (f"  hook {rows[name]['hook_host_ms']:.2f} ms host" if "hook_host_ms" in rows[name] else "")
                  + (f", {rows[name]['hook_until_gpu_done_ms']:.2f} ms to GPU done"
                     if rows[name].get("hook_until_gpu_done_ms") is not None else ""), flush=True)  # fmt: skip
    if rank == 0:
        Path(out).write_text(json.dumps({"rows": rows}, indent=2))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rank", type=int, default=4, help="PowerSGD rank")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--sync-hook", action="store_true", help="also wait for the GPU after the hook's call")
    p.add_argument(
        "--configs",
        nargs="+",
        default=["compute_only", "ddp", "ddp_powersgd", "ddp_powersgd_eager"],
        choices=["compute_only", "ddp", "ddp_powersgd", "ddp_powersgd_eager"],
    )
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 CPU processes on gloo")
    p.add_argument("--out", type=Path, default=Path("powersgd_profile.json"))
    args = p.parse_args()
    if args.smoke:
        args.n_layer, args.n_embd, args.n_head, args.block_size, args.batch_size = 1, 32, 2, 16, 2
        args.warmup, args.steps, args.devices = 3, 2, 2
    port = free_port()
    tmp = str(args.out) + ".rows"
    started = time.time()
    mp.start_processes(
        _worker, args=(args.devices, port, args, tmp), nprocs=args.devices, start_method="spawn"
    )
    rows = json.loads(Path(tmp).read_text())["rows"]
    Path(tmp).unlink()
    for name, row in rows.items():
        for key in ("profile_cpu", "profile_cuda"):
            if key in row:
                print(f"=== {name} {key}\n{row[key]}")
    record = {
        "benchmark": "powersgd_profile",
        "issue": 6,
        "env": environment(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": rows,
        "wall_s": time.time() - started,
    }
    args.out.write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
