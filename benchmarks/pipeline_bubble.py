"""Measured pipeline bubble per schedule next to theory, on layers that take a fixed time.

Each layer sleeps ``--forward-ms`` in forward and ``--backward-ms`` in backward, so a process's busy time
per step is known exactly (micro-batches x its layers x (forward + backward)), and the bubble is what is
left of the step: ``1 - busy / step time``. Runs ``PipelineStrategy`` inside a real Lightning ``fit`` on
CPU processes (gloo) and reads the strategy's own logged ``pipeline/bubble``, so the benchmark checks the
strategy's metric as well as the schedules. Theory: (p-1)/(m+p-1) for GPipe and 1F1B, divided by v when
interleaved.

    python benchmarks/pipeline_bubble.py --pipeline-size 2 4 --microbatches 1 2 4 8 --out bubble.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_speedup import PipelineStrategy
from lightning_speedup.bench.env import environment
from lightning_speedup.pipeline import SCHEDULES, theoretical_bubble


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, forward_s: float, backward_s: float) -> Tensor:
        ctx.backward_s = backward_s
        ctx.save_for_backward(x, w)
        time.sleep(forward_s)
        return x * w

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        x, w = ctx.saved_tensors
        time.sleep(ctx.backward_s)
        return grad * w, (grad * x).sum().reshape(w.shape), None, None


class FixedTimeLayer(nn.Module):
    def __init__(self, forward_s: float, backward_s: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))
        self.forward_s, self.backward_s = forward_s, backward_s

    def forward(self, x: Tensor) -> Tensor:
        return _Sleep.apply(x, self.w, self.forward_s, self.backward_s)


class FixedTimeModel(L.LightningModule):
    def __init__(self, n_layers: int, forward_s: float, backward_s: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList([FixedTimeLayer(forward_s, backward_s) for _ in range(n_layers)])

    def pipeline_layers(self) -> list[nn.Module]:
        return list(self.layers)

    def pipeline_loss(self, output: Tensor, target: Tensor) -> Tensor:
        return ((output - target) ** 2).mean()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # the unpipelined step; PipelineStrategy runs the layers itself
        for layer in self.layers:
            x = layer(x)
        return self.pipeline_loss(x, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _Collect(L.Callback):
    def __init__(self, path: Path) -> None:
        self.path, self.bubbles, self.steps = path, [], []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        m = trainer.callback_metrics
        if "pipeline/bubble" in m and trainer.global_step > 2:  # the first steps warm up
            self.bubbles.append(float(m["pipeline/bubble"]))
            self.steps.append(float(m["pipeline/step_time_s"]))

    def on_train_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_rank == 0:
            self.path.write_text(json.dumps({"bubbles": self.bubbles, "steps": self.steps}))


def measure(schedule: str, p: int, m: int, args: argparse.Namespace, work: Path) -> dict[str, Any] | None:
    v = 2 if schedule in ("interleaved_1f1b", "zero_bubble") else 1
    if (schedule != "gpipe" and m < p) or (v > 1 and m % p):
        return None  # the schedule does not accept this many micro-batches
    model = FixedTimeModel(p * v, args.forward_ms / 1e3, args.backward_ms / 1e3)
    data = TensorDataset(torch.randn(m * 64, 4), torch.randn(m * 64, 4))
    out = work / f"{schedule}-p{p}-m{m}.json"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=p,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        strategy=PipelineStrategy(
            schedule, n_microbatches=m, stages_per_rank=v, metrics_every=1, start_method="fork"
        ),
        callbacks=[_Collect(out)],
    )
    trainer.fit(model, DataLoader(data, batch_size=m, drop_last=True))
    rec = json.loads(out.read_text())
    measured = statistics.median(rec["bubbles"])
    theory = theoretical_bubble(schedule, p, m, v)
    return {
        "schedule": schedule,
        "pipeline_size": p,
        "microbatches": m,
        "stages_per_rank": v,
        "bubble_measured_rank0": measured,
        "bubble_theory": theory,
        "difference_pp": 100 * (measured - theory),
        "step_time_s_median": statistics.median(rec["steps"]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    ap.add_argument("--pipeline-size", nargs="+", type=int, default=[2, 4])
    ap.add_argument(
        "--microbatches",
        nargs="+",
        type=int,
        default=[1, 2, 4, 8],
        help="multiples of the pipeline size (m = k * p)",
    )
    ap.add_argument("--forward-ms", type=float, default=10.0)
    ap.add_argument("--backward-ms", type=float, default=20.0)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.steps < 4:
        ap.error("--steps must be >= 4 (the first 3 steps warm up)")
    work = Path(args.out).with_suffix(".parts") if args.out else Path("pipeline_bubble.parts")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in args.pipeline_size:
        for k in args.microbatches:
            for schedule in args.schedules:
                row = measure(schedule, p, k * p, args, work)
                if row is not None:
                    rows.append(row)
    print(f"{'schedule':>17} {'p':>2} {'m':>3} {'measured':>9} {'theory':>7} {'diff (pp)':>9}")
    for r in rows:
        print(
            f"{r['schedule']:>17} {r['pipeline_size']:>2} {r['microbatches']:>3} "
            f"{r['bubble_measured_rank0']:>9.3f} {r['bubble_theory']:>7.3f} {r['difference_pp']:>9.1f}"
        )
    if args.out:
        result = {
            "benchmark": "pipeline_bubble",
            "environment": environment(),
            "date": time.strftime("%Y-%m-%d"),
            "forward_ms": args.forward_ms,
            "backward_ms": args.backward_ms,
            "steps": args.steps,
            "rows": rows,
        }
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
