"""What PipelineStrategy costs per step over a bare ``schedule.step()`` loop on the same stages.

(a) ``bare``: ``torch.distributed.pipelining`` stages and schedule built by hand, a DataLoader, autocast,
    ``schedule.step`` + ``optimizer.step`` + ``zero_grad``: the least a pipelined training loop does.
(b) ``lightning``: the same model, data, split, schedule and optimizer through ``L.Trainer`` with
    ``PipelineStrategy`` (``metrics_every=0``).
One process (world size 1, several stages on it where the schedule interleaves), configurations
alternated (a b a b ...) ``--repeats`` times; per-step time is measured between a synchronised step
``--warmup`` and the last step, so start-up and the first steps' allocations are excluded.

    python benchmarks/pipeline_overhead.py --out overhead.json           # GPU, bf16
    python benchmarks/pipeline_overhead.py --accelerator cpu --layers 2 --width 32 --steps 6 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_speedup import PipelineStrategy
from lightning_speedup.bench.env import environment
from lightning_speedup.bench.modules import CharLM
from lightning_speedup.pipeline import SCHEDULES, collect_layers, layer_param_counts, plan_stages


def _model(args: argparse.Namespace) -> CharLM:
    torch.manual_seed(0)
    return CharLM(
        vocab_size=65,
        block_size=args.context,
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.width,
        dropout=0.0,
        tie_weights=False,
        optimizer="adamw",
        lr=1e-4,
    )


def _data(args: argparse.Namespace) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 65, (args.batch_size * args.steps, args.context), generator=g)
    return DataLoader(
        TensorDataset(x, torch.roll(x, -1, 1)),
        batch_size=args.batch_size,
        drop_last=True,
        pin_memory=args.accelerator == "gpu",
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare(args: argparse.Namespace, device: torch.device) -> float:
    from torch.distributed import pipelining

    module = _model(args).to(device)
    layers = collect_layers(module).modules
    counts = layer_param_counts(layers)
    v = args.stages_per_rank
    plan = plan_stages([float(c) for c in counts], counts, v, 1, "params")
    stages = [
        pipelining.PipelineStage(nn.Sequential(*layers[a:b]), s, v, device)
        for s, (a, b) in enumerate(plan.bounds)
    ]
    cls = getattr(
        pipelining,
        {
            "gpipe": "ScheduleGPipe",
            "1f1b": "Schedule1F1B",
            "interleaved_1f1b": "ScheduleInterleaved1F1B",
            "zero_bubble": "ScheduleInterleavedZeroBubble",
        }[args.schedule],
    )
    m = args.microbatches

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        return module.pipeline_loss(out, y) / m

    schedule = cls(stages if v > 1 else stages[0], n_microbatches=m, loss_fn=loss_fn, scale_grads=False)
    opt = module.configure_optimizers()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    t0 = 0.0
    for i, (x, y) in enumerate(_data(args)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            schedule.step(x, target=y, losses=[])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i + 1 == args.warmup:
            _sync(device)
            t0 = time.perf_counter()
    _sync(device)
    return (time.perf_counter() - t0) / (args.steps - args.warmup)


class _StepClock(L.Callback):
    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.t0, self.per_step = warmup, steps, 0.0, 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            _sync(pl_module.device)
            self.t0 = time.perf_counter()
        elif trainer.global_step == self.steps:
            _sync(pl_module.device)
            self.per_step = (time.perf_counter() - self.t0) / (self.steps - self.warmup)


def lightning(args: argparse.Namespace, device: torch.device) -> float:
    clock = _StepClock(args.warmup, args.steps)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=[clock],
        strategy=PipelineStrategy(
            args.schedule,
            n_microbatches=args.microbatches,
            stages_per_rank=args.stages_per_rank,
            metrics_every=0,
        ),
    )
    trainer.fit(_model(args), _data(args))
    return clock.per_step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--accelerator", default="gpu", choices=["gpu", "cpu"])
    ap.add_argument("--precision", default=None, help="default bf16-mixed on GPU, 32-true on CPU")
    ap.add_argument("--schedule", default="interleaved_1f1b", choices=SCHEDULES)
    ap.add_argument("--stages-per-rank", type=int, default=None)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.precision = args.precision or ("bf16-mixed" if args.accelerator == "gpu" else "32-true")
    if args.stages_per_rank is None:
        args.stages_per_rank = 2 if args.schedule in ("interleaved_1f1b", "zero_bubble") else 1
    if not 0 < args.warmup < args.steps:
        ap.error("need 0 < --warmup < --steps")
    device = torch.device("cuda", 0) if args.accelerator == "gpu" else torch.device("cpu")
    if not dist.is_initialized():  # the bare loop's one-process group; Lightning reuses it
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    runs: dict[str, list[float]] = {"bare": [], "lightning": []}
    for _ in range(args.repeats):
        runs["bare"].append(bare(args, device))
        runs["lightning"].append(lightning(args, device))
    med = {k: statistics.median(v) for k, v in runs.items()}
    overhead = med["lightning"] / med["bare"] - 1
    print(f"{'configuration':>12} {'ms/step median':>15} {'min-max':>17}")
    for k, v in runs.items():
        print(f"{k:>12} {1e3 * med[k]:>15.2f} {1e3 * min(v):>8.2f}-{1e3 * max(v):<8.2f}")
    print(f"PipelineStrategy overhead over the bare schedule loop: {100 * overhead:+.2f}% (goal < 2%)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "benchmark": "pipeline_overhead",
                    "environment": environment(),
                    "date": time.strftime("%Y-%m-%d"),
                    "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "seconds_per_step": runs,
                    "median_s": med,
                    "overhead": overhead,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
