"""Bayesian vs random search: how many trials until a sweep reaches a target accuracy? (issue 7)

Both searchers tune the same real task, Fashion-MNIST classification, with the same budget: the same
search space, ``--num-samples`` trials per sweep, ``--concurrency`` trials at a time, no early stopping
(scheduler=None, so only the searcher differs), trial seed = sweep seed. Sweeps run interleaved, seed by
seed (bayes, random, bayes, random, ...), all through ``lightning_speedup.tune.tune_lightning`` on one
local Ray cluster in this process.

  --device cpu   reduced task: a small CNN (two strided convs, 4-32 channels) on 8192 training and 2048
                 validation images, 2 epochs, one CPU core per trial, 2 trials at a time.
                 space: lr loguniform(1e-5, 1e-1), weight_decay loguniform(1e-6, 1e-1),
                 batch_size {32, 64, 128, 256, 512}, channels {4, 8, 16, 32}.
  --device gpu   ResNet-9 (lightning_speedup.bench.modules.ImageClassifier, AdamW, bf16-mixed) on
                 20000 training and 5000 validation images, 1 epoch, fractional GPUs: 0.25 GPU and
                 2 CPUs per trial, 4 trials at a time. space: lr, weight_decay, batch_size as above,
                 label_smoothing uniform(0, 0.2).

A trial's score is its best validation accuracy. "Trials to target" of a sweep is the 1-based position,
in the order trials were created, of the first trial whose score reaches the target; a sweep that never
reaches it counts as num_samples + 1 (censored; the table shows how many reached). The headline target
is the 90th percentile of the scores of all random-search trials of the run (the accuracy one random
configuration in ten reaches), unless ``--target`` fixes it; the 80th and 95th percentiles are reported
too. The issue's goal: the Bayesian median at most half the random median.

Expected runtime (5 seeds x 2 searchers x 16 trials = 160 trials):
  --device cpu   about 5-6 minutes on an idle 2-core CPU (16 trials at 2 at a time plus about 5 s to
                 start a sweep's Ray workers, about 30 s per sweep); a 2-seed run took 4.6 minutes on a
                 shared 2-core machine at load average 4-5.
  --device gpu   about 4 minutes on one H100 (estimate, not measured: about 4 s per trial at a quarter
                 GPU). Needs ray[tune], optuna and scipy on the device (see docs/methods/tuning.md).

Run:
    python benchmarks/tune_bayes_vs_random.py --device cpu --out benchmarks/results/tune_bayes_vs_random_cpu.json
    source benchmarks/device_env.sh && python benchmarks/tune_bayes_vs_random.py --device gpu \\
        --out $OUT/tune_bayes_vs_random_gpu.json
Smoke test of the script itself (numbers meaningless, ~1 minute):
    python benchmarks/tune_bayes_vs_random.py --device cpu --smoke --out /tmp/tune_bvr_smoke.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from ray import tune
from torch import nn

from lightning_speedup.bench.datamodules import FashionMNISTDataModule
from lightning_speedup.bench.datasets import find_fashion_mnist
from lightning_speedup.bench.env import environment
from lightning_speedup.bench.modules import ImageClassifier
from lightning_speedup.tune import init_ray, tune_lightning

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "tune_bayes_vs_random.json"
SEARCHERS = ("bayes", "random")
QUANTILES = (0.8, 0.9, 0.95)
SEARCHED = ("lr", "weight_decay", "batch_size", "channels", "label_smoothing")

SETTINGS: dict[str, dict[str, Any]] = {
    "cpu": {"epochs": 2, "train_subset": 8192, "val_subset": 2048, "concurrency": 2,
            "resources": {"cpu": 1}, "precision": "32-true", "num_workers": 0},
    "gpu": {"epochs": 1, "train_subset": 20000, "val_subset": 5000, "concurrency": 4,
            "resources": {"cpu": 2, "gpu": 0.25}, "precision": "bf16-mixed", "num_workers": 2},
}  # fmt: skip


class SmallCNN(L.LightningModule):
    """Two strided convolutions and a linear head (~0.1 MFLOP per image at 8 channels)."""

    def __init__(self, channels: int, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(1, c, 5, stride=2, padding=2), nn.ReLU(),  # (B, c, 14, 14)
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.ReLU(),  # (B, 2c, 7, 7)
            nn.Flatten(), nn.Linear(2 * c * 7 * 7, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)


class FashionMNISTSubset(FashionMNISTDataModule):
    """``FashionMNISTDataModule`` that reads the IDX files once per trial, in ``setup`` (the folder was
    resolved before the sweep, so ``prepare_data`` has nothing to find or download)."""

    def prepare_data(self) -> None:
        pass


def build(config: dict[str, Any]) -> tuple[L.LightningModule, L.LightningDataModule]:
    if config["device"] == "cpu":
        module: L.LightningModule = SmallCNN(config["channels"], config["lr"], config["weight_decay"])
    else:
        module = ImageClassifier(
            optimizer="adamw", lr=config["lr"], weight_decay=config["weight_decay"],
            label_smoothing=config["label_smoothing"],
        )  # fmt: skip
    data = FashionMNISTSubset(
        data_dir=config["data_dir"], batch_size=config["batch_size"], num_workers=config["num_workers"],
        augment=False, train_subset=config["train_subset"], val_subset=config["val_subset"], seed=0,
    )  # fmt: skip
    return module, data


def search_space(device: str, data_dir: str, s: dict[str, Any]) -> dict[str, Any]:
    space: dict[str, Any] = {
        "lr": tune.loguniform(1e-5, 1e-1),
        "weight_decay": tune.loguniform(1e-6, 1e-1),
        "batch_size": tune.choice([32, 64, 128, 256, 512]),
        "device": device, "data_dir": data_dir, "num_workers": s["num_workers"],
        "train_subset": s["train_subset"], "val_subset": s["val_subset"],
    }  # fmt: skip
    if device == "cpu":
        space["channels"] = tune.choice([4, 8, 16, 32])
    else:
        space["label_smoothing"] = tune.uniform(0.0, 0.2)
    return space


def run_sweep(
    searcher: str, seed: int, args: argparse.Namespace, s: dict[str, Any], storage: str
) -> dict[str, Any]:
    space = search_space(args.device, args.data_dir, s)
    t0 = time.perf_counter()
    results = tune_lightning(
        build, space, "val_acc", "max", args.num_samples, searcher=searcher, scheduler=None, seed=seed,
        max_concurrent=s["concurrency"], resources_per_trial=s["resources"],
        trainer_kwargs={"max_epochs": s["epochs"], "precision": s["precision"]},
        storage_path=storage, name=f"{searcher}_seed{seed}", checkpoint=False, verbose=0,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    trials = []
    # ResultGrid lists the trials of a fresh sweep in the order Tune created them.
    for result in results.result_grid:
        df = result.metrics_dataframe
        score = float(df["val_acc"].max()) if df is not None and "val_acc" in df else math.nan
        config = {k: v for k, v in (result.config or {}).items() if k in SEARCHED}
        trials.append(
            {"score": score, "config": config, "error": None if result.error is None else str(result.error)}
        )
    best = results.best_metric if results.best_metric is not None else math.nan
    return {"searcher": searcher, "seed": seed, "wall_s": wall, "trials": trials, "best": best}


def trials_to_target(scores: list[float], target: float) -> int | None:
    for i, score in enumerate(scores):
        if not math.isnan(score) and score >= target:
            return i + 1
    return None


def quantile(values: list[float], q: float) -> float:
    xs = sorted(v for v in values if not math.isnan(v))
    if not xs:
        return math.nan
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(
    sweeps: list[dict[str, Any]], targets: dict[str, float], num_samples: int
) -> list[dict[str, Any]]:
    rows = []
    for label, target in targets.items():
        row: dict[str, Any] = {"target": label, "value": target}
        for searcher in SEARCHERS:
            counts = [trials_to_target([t["score"] for t in sw["trials"]], target)
                      for sw in sweeps if sw["searcher"] == searcher]  # fmt: skip
            censored = [c if c is not None else num_samples + 1 for c in counts]
            row[f"{searcher}_trials"] = censored
            row[f"{searcher}_median"] = statistics.median(censored) if censored else None
            row[f"{searcher}_reached"] = sum(c is not None for c in counts)
        if row["bayes_median"] is not None and row["random_median"]:
            row["ratio"] = row["bayes_median"] / row["random_median"]
            row["goal_met"] = row["ratio"] <= 0.5
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", choices=("cpu", "gpu"), default="gpu" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--seeds", type=int, default=5, help="sweep seeds 0..N-1 (>= 5 for the issue)")
    parser.add_argument("--num-samples", type=int, default=16, help="trials per sweep")
    parser.add_argument(
        "--target", type=float, default=None, help="fixed val_acc target (default: random p90)"
    )
    parser.add_argument(
        "--data-dir", default=None, help="Fashion-MNIST folder (default: find_fashion_mnist())"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="2 seeds x 4 trials on 1024 images: checks the script"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    s = dict(SETTINGS[args.device])
    if args.smoke:
        args.seeds, args.num_samples = 2, 4
        s.update(epochs=1, train_subset=1024, val_subset=512)
    args.data_dir = str(find_fashion_mnist(args.data_dir))
    init_ray(log_to_driver=False)

    sweeps: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tune_bvr_") as storage:
        for seed in range(args.seeds):
            order = SEARCHERS if seed % 2 == 0 else SEARCHERS[::-1]
            for searcher in order:
                sweep = run_sweep(searcher, seed, args, s, storage)
                sweeps.append(sweep)
                print(
                    f"seed {seed} {searcher:>6}: best {sweep['best']:.4f}, {sweep['wall_s']:.0f} s, scores "
                    + " ".join(f"{t['score']:.3f}" for t in sweep["trials"]),
                    flush=True,
                )

    random_scores = [t["score"] for sw in sweeps if sw["searcher"] == "random" for t in sw["trials"]]
    targets = {f"random p{round(q * 100)}": quantile(random_scores, q) for q in QUANTILES}
    if args.target is not None:
        targets = {"fixed": args.target, **targets}
    rows = summarize(sweeps, targets, args.num_samples)
    headline = rows[0] if args.target is not None else next(r for r in rows if r["target"] == "random p90")

    result = {
        "benchmark": "tune_bayes_vs_random",
        "environment": environment(),
        "versions": {m: __import__(m).__version__ for m in ("ray", "optuna", "lightning", "torch")},
        "device": args.device,
        "settings": {**s, "num_samples": args.num_samples, "seeds": list(range(args.seeds)), "smoke": args.smoke,
                     "scheduler": None, "search_space": {k: repr(v) for k, v in
                                                         search_space(args.device, args.data_dir, s).items()}},
        "headline": headline,
        "summary": rows,
        "sweeps": sweeps,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))

    print(f"\nwrote {args.out}")
    print(
        f"trials to reach the target (median over {args.seeds} seeds; {args.num_samples + 1} = not reached)"
    )
    print(
        f"{'target':>12} {'val_acc':>8} {'bayes':>6} {'reached':>8} {'random':>7} {'reached':>8} {'ratio':>6}"
    )
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "-"
        print(f"{r['target']:>12} {r['value']:>8.4f} {r['bayes_median']:>6} {r['bayes_reached']:>5}/{args.seeds:<2}"
              f" {r['random_median']:>7} {r['random_reached']:>5}/{args.seeds:<2} {ratio:>6}")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
