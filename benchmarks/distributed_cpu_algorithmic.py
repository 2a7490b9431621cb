"""The algorithmic side of issue 6: loss per step of each strategy vs DDP, 4 gloo processes on CPU.

Wall time on a CPU says nothing about a network, but *steps* do: how many optimizer steps each
strategy needs to reach a loss, relative to DDP, is independent of the interconnect. This script
measures it, and the cost model combines it with GPU step times
(``costmodel.time_to_target_speedup(..., steps_ratio=...)``).

Char-LM on Tiny Shakespeare at toy scale: GPT 2 layers x 64 wide, 2 heads, context 64, no
dropout, AdamW 3e-3, 16 sequences per process per step (64 per step over 4 processes), windows
distinct per process (DistributedSampler). Every ``--eval-every`` steps the validation loss of the
*exactly averaged* model (what the strategies evaluate) is measured on 32 fixed validation windows.

Strategies: the registered strings with their presets (``local_sgd``: H=16; ``diloco``: H=100, outer
SGD 0.7 Nesterov 0.9; ``gossip_ring``; ``gossip_exponential``; ``ddp_bf16_compress``; ``ddp_powersgd``:
rank 4 after 100 plain steps), plus ``local_sgd_h4`` and ``diloco_h25`` to show the dependence on H.

Targets are the (median) validation losses DDP reaches at 25%, 50% and 75% of the run; a strategy's
steps-to-target is its first evaluation at or below one, ``steps_ratio`` that over DDP's. Configurations are interleaved per
seed (a b c ... a b c ...); every number is the median over ``--seeds`` seeds.

Expected runtime: about 6 minutes on an idle 2-core machine with the defaults (300 steps, 3 seeds,
9 configurations); no GPU involved.

    python benchmarks/distributed_cpu_algorithmic.py --out benchmarks/results/distributed_cpu_algorithmic.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

import lightning_speedup.distributed  # noqa: F401  (defines the strategy classes)
from lightning_speedup._registry import register_strategies
from lightning_speedup.bench.datasets import load_text_corpus
from lightning_speedup.bench.env import environment
from lightning_speedup.bench.modules import CharLM

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "distributed_cpu_algorithmic.json"
CONFIGS: dict[str, dict[str, Any]] = {
    "ddp": {},
    "local_sgd": {"string": "local_sgd"},
    "local_sgd_h4": {"string": "local_sgd", "sync_every": 4},
    "diloco": {"string": "diloco"},
    "diloco_h25": {"string": "diloco", "sync_every": 25},
    "gossip_ring": {"string": "gossip_ring"},
    "gossip_exponential": {"string": "gossip_exponential"},
    "ddp_bf16_compress": {"string": "ddp_bf16_compress"},
    "ddp_powersgd": {"string": "ddp_powersgd"},
}


class Windows(Dataset):
    """Overlapping (x, y) windows of a token stream at a fixed stride."""

    def __init__(self, ids: Tensor, block: int, stride: int, limit: int | None = None) -> None:
        self.ids, self.block, self.stride = ids, block, stride
        n = (len(ids) - block - 1) // stride
        self.n = n if limit is None else min(n, limit)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        chunk = self.ids[i * self.stride : i * self.stride + self.block + 1]
        return chunk[:-1], chunk[1:]


class Curve(Callback):
    """Rank 0 writes the (step, val_loss) points and the mean-over-ranks training loss per step."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.val: list[tuple[int, float]] = []
        self.train: list[float] = []

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *a: Any
    ) -> None:
        loss = outputs["loss"].detach().clone()
        self.train.append(float(trainer.strategy.reduce(loss, reduce_op="mean")))

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            stats = getattr(trainer.strategy, "comm_stats", {})
            self.path.write_text(json.dumps({"val": self.val, "train": self.train, "comm_stats": stats}))


def make_strategy(name: str) -> Any:
    cfg = dict(CONFIGS[name])
    if not cfg:
        return DDPStrategy(start_method="fork")
    from lightning.pytorch.strategies import StrategyRegistry

    entry = StrategyRegistry[cfg.pop("string")]
    return entry["strategy"](**{**entry["init_params"], **cfg, "start_method": "fork"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    name: str, seed: int, args: argparse.Namespace, train_set: Dataset, val_set: Dataset, vocab: int
) -> dict[str, Any]:
    os.environ["MASTER_PORT"] = str(free_port())
    L.seed_everything(seed, verbose=False)
    model = CharLM(
        vocab_size=vocab, block_size=args.block, n_layer=2, n_head=2, n_embd=64, dropout=0.0, lr=3e-3
    )
    path = Path(args.tmp) / f"{name}_{seed}.json"
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.processes,
        strategy=make_strategy(name),
        max_steps=args.steps,
        val_check_interval=args.eval_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Curve(path)],
    )
    train = DataLoader(train_set, batch_size=16, shuffle=True, drop_last=True)
    val = DataLoader(val_set, batch_size=8)
    t0 = time.perf_counter()
    trainer.fit(model, train, val)
    out = json.loads(path.read_text())
    out["wall_s"] = time.perf_counter() - t0
    return out


def steps_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


FRACTIONS = (0.25, 0.5, 0.75)  # targets: the loss DDP reaches at these fractions of the run


def summarize(runs: dict[str, list[dict[str, Any]]], steps: int, ddp_bytes_per_step: float) -> dict[str, Any]:
    """Median curves per configuration; for each DDP-derived target, the steps to it and their ratio to DDP's."""

    def median_curve(name: str) -> list[tuple[int, float]]:
        curves = [r["val"] for r in runs[name]]
        return [(curves[0][i][0], statistics.median(c[i][1] for c in curves)) for i in range(len(curves[0]))]

    ddp = median_curve("ddp")
    targets = {f: next(loss for step, loss in ddp if step >= f * steps) for f in FRACTIONS}
    ddp_steps = {f: steps_to(ddp, t) for f, t in targets.items()}
    table = {}
    for name in runs:
        curve = median_curve(name)
        reached = {f: steps_to(curve, t) for f, t in targets.items()}
        table[name] = {
            "final_val_loss": curve[-1][1],
            "steps_to_target": {str(f): s for f, s in reached.items()},
            "steps_ratio": {
                str(f): (s / ddp_steps[f]) if (s and ddp_steps[f]) else None for f, s in reached.items()
            },
            "median_curve": curve,
            # Lightning's DDP does not count bytes: DDP's are those of a ring all-reduce of fp32 gradients.
            "bytes_sent_per_step": ddp_bytes_per_step
            if name == "ddp"
            else statistics.median(r["comm_stats"].get("bytes_sent", 0.0) for r in runs[name]) / steps,
        }
    return {
        "target_val_loss": {str(f): t for f, t in targets.items()},
        "target_rule": "the median val loss DDP reaches at 25/50/75% of the steps; ratio = steps / DDP's steps",
        "table": table,
    }


def print_summary(summary: dict[str, Any], processes: int) -> None:
    targets = ", ".join(f"{float(f):.0%}: {t:.3f}" for f, t in summary["target_val_loss"].items())
    print(
        f"\ntargets (DDP's val loss at {targets}), {processes} processes; steps ratio vs DDP ('-': not reached)"
    )
    head = " ".join(f"{'@' + format(float(f), '.0%'):>6}" for f in summary["target_val_loss"])
    print(f"{'strategy':<20} {'final val':>9} {head} {'KB/step':>8}")
    for name, row in summary["table"].items():
        ratios = " ".join(f"{r:>6.2f}" if r else f"{'-':>6}" for r in row["steps_ratio"].values())
        print(f"{name:<20} {row['final_val_loss']:>9.3f} {ratios} {row['bytes_sent_per_step'] / 1e3:>8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--block", type=int, default=64)
    p.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS)
    )
    p.add_argument(
        "--data",
        default=None,
        help="Tiny Shakespeare input.txt (default: $LIGHTNING_SPEEDUP_DATA, ../shared/data)",
    )
    p.add_argument("--tmp", default="/tmp/distributed_cpu_algorithmic")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args()
    register_strategies()  # the strategy strings, as `import lightning_speedup` does

    root = Path(__file__).resolve().parents[1]
    candidates = [Path(args.data)] if args.data else []
    if os.environ.get("LIGHTNING_SPEEDUP_DATA"):
        candidates.append(Path(os.environ["LIGHTNING_SPEEDUP_DATA"]) / "tinyshakespeare" / "input.txt")
    candidates += [
        root / ".data/tinyshakespeare/input.txt",
        root.parent / "shared/data/tinyshakespeare/input.txt",
    ]
    text = next((c for c in candidates if c.is_file()), None)
    if text is None:
        raise SystemExit(
            f"Tiny Shakespeare not found; looked at {[str(c) for c in candidates]}. Pass --data."
        )
    corpus = load_text_corpus(text)
    train_set = Windows(corpus.train_ids, args.block, stride=3)
    val_set = Windows(corpus.val_ids, args.block, stride=args.block, limit=32)
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    names = args.configs.split(",")
    if "ddp" not in names:
        names.insert(0, "ddp")
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for seed in args.seeds:
        for name in names:
            runs[name].append(run(name, seed, args, train_set, val_set, corpus.vocab_size))
            print(
                f"seed {seed} {name:<20} final val {runs[name][-1]['val'][-1][1]:.3f} ({runs[name][-1]['wall_s']:.0f} s)",
                flush=True,
            )
    probe = CharLM(vocab_size=corpus.vocab_size, block_size=args.block, n_layer=2, n_head=2, n_embd=64)
    num_params = sum(p.numel() for p in probe.parameters())
    n = args.processes
    summary = summarize(runs, args.steps, 2 * (n - 1) / n * 4 * num_params)
    result = {
        "benchmark": "distributed_cpu_algorithmic",
        "env": environment(),
        "args": vars(args),
        "model": {
            "n_layer": 2,
            "n_embd": 64,
            "n_head": 2,
            "block_size": args.block,
            "num_params": num_params,
        },
        "runs": runs,
        "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    print_summary(summary, args.processes)


if __name__ == "__main__":
    main()
