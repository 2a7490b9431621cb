"""Does the LR range test's rule pick a good one-cycle peak? (issue 3)

For each reference task and seed:

  auto     ``OneCycle(max_lr="auto")``: the LR range test (100 steps, 1e-6 -> 10, the default rule: the
           smoothed loss minimum / 2 since 2026-11-27; the first H200 run used /4)
           picks max_lr, then a short one-cycle run trains with it;
  x f      the same run with ``max_lr = auto_lr * f`` for f in ``--factors`` (default 0.25 0.5 2 4).

Every run is a fresh model (same seed across factors) with a fixed small budget, bf16-mixed, one
GPU, torch's OneCycleLR defaults (pct_start 0.3, div 25, final div 1e4, betas[0] cycling
0.95 -> 0.85). The metric is the final validation metric of the run (fashion-mnist: val_acc on
the 10k test set; char-lm: val_loss on the first ``--lm-val-windows`` windows of the validation
text). Per factor we take the median (and the mean) over seeds; the rule passes when the best factor is
within 2x of the auto choice (0.5 <= f <= 2). The JSON also lists where other candidate rules
(minimum/2, /4, /10, the minimum itself, valley, steepest) land relative to the best LR.
``--resummarize FILE`` recomputes that analysis for an earlier result file without training.

  fashion-mnist  ImageClassifier (ResNet-9, Adam), FashionMNISTDataModule(augment=False), batch 128,
                 1 epoch (469 steps)
  char-lm        CharLM (GPT 6x6x384, ctx 256, AdamW wd 0.01), CharLMDataModule, batch 64, 300 steps

Runs are ordered seed by seed (auto first, since it fixes the LR, then the factors in an order
rotated per seed). Expected runtime on one H100: about 3.5 minutes with the defaults (3 seeds x 5
runs x 2 tasks); ``--tasks`` runs one task per call if needed.

Run on the device (carry [".data", ".whl"]):
    source benchmarks/device_env.sh && python benchmarks/lr_range_validation.py --out $OUT/lr_range_validation.json
CPU smoke test of the script itself (tiny budgets, numbers meaningless):
    python benchmarks/lr_range_validation.py --smoke --out /tmp/lr_range_smoke.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from _data import fashion_dir, text_path  # benchmarks/_data.py: scripts run from this folder

from lightning_speedup.bench.datamodules import CharLMDataModule, FashionMNISTDataModule
from lightning_speedup.bench.env import device_label, environment
from lightning_speedup.bench.modules import CharLM, ImageClassifier
from lightning_speedup.schedules import LRRangeTest, OneCycle

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "lr_range_validation.json"
METRIC = {"fashion-mnist": ("val_acc", "max"), "char-lm": ("val_loss", "min")}


def build(task: str, args: argparse.Namespace) -> tuple[L.LightningModule, L.LightningDataModule]:
    if task == "fashion-mnist":
        dm: L.LightningDataModule = FashionMNISTDataModule(
            data_dir=fashion_dir(args.data_dir),
            batch_size=args.fashion_batch,
            num_workers=args.workers,
            augment=False,
            train_subset=args.fashion_train_subset,
            val_subset=args.fashion_val_subset,
        )
        width = {"width": 8} if args.smoke else {}  # the smoke test's ResNet-9 is narrow, like its LM
        return ImageClassifier(optimizer="adam", lr=1e-3, **width), dm
    samples = args.lm_steps * args.lm_batch
    dm = CharLMDataModule(
        text_path(args.text, "--text"),
        block_size=args.lm_block,
        batch_size=args.lm_batch,
        num_workers=args.workers,
        samples_per_epoch=samples,  # one "epoch" is the whole budget: a single validation at the end
        val_windows=args.lm_val_windows,
    )
    model_kwargs = {"n_layer": 2, "n_head": 2, "n_embd": 64} if args.smoke else {}
    module = CharLM(
        vocab_size=dm.vocab_size, block_size=args.lm_block, optimizer="adamw", lr=1e-3, **model_kwargs
    )  # type: ignore[attr-defined]
    return module, dm


def run_one(task: str, seed: int, max_lr: float | str, args: argparse.Namespace) -> dict[str, Any]:
    L.seed_everything(seed, verbose=False)
    module, dm = build(task, args)
    schedule = OneCycle(
        max_lr=max_lr, range_test=LRRangeTest(num_steps=args.range_steps) if max_lr == "auto" else None
    )
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=1,
        callbacks=[schedule],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        benchmark=args.accelerator == "gpu",
    )
    started = time.perf_counter()
    trainer.fit(module, dm)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    metric_name, _ = METRIC[task]
    out: dict[str, Any] = {
        "task": task,
        "seed": seed,
        "max_lr": schedule.peak_lrs[0][0],
        "steps": schedule.schedule_total_steps,
        "metric": float(trainer.callback_metrics[metric_name]),
        "wall_s": wall,
    }
    if schedule.range_test_result is not None:
        out["range_test"] = schedule.range_test_result.to_dict()
    del trainer, module, dm
    return out


def summarize(task: str, runs: list[dict[str, Any]], factors: list[float]) -> dict[str, Any]:
    """Best factor by the median and by the mean over seeds, and where each candidate rule lands.

    A rule's LR is compared with the best LR of each seed's sweep (auto LR of that seed x best factor);
    rules are "minimum/d" for several divisors d, the minimum itself, valley and steepest.
    """
    _, mode = METRIC[task]
    pick = max if mode == "max" else min
    by_factor = {f: [r["metric"] for r in runs if r["factor"] == f] for f in factors}
    medians = {f: statistics.median(v) for f, v in by_factor.items() if v}
    means = {f: statistics.fmean(v) for f, v in by_factor.items() if v}
    best = pick(medians, key=medians.__getitem__)
    best_mean = pick(means, key=means.__getitem__)
    autos = [r for r in runs if r["factor"] == 1.0]
    divisor = (
        autos[0]["range_test"]["lr_at_minimum"] / autos[0]["range_test"]["lr"] if autos else float("nan")
    )
    candidates: dict[str, list[float]] = {}
    for r in autos:
        rt = r["range_test"]
        for name, lr in {
            f"auto (minimum/{divisor:.3g})": rt["lr"],
            "minimum/2": rt["lr_at_minimum"] / 2,
            "minimum/4": rt["lr_at_minimum"] / 4,
            "minimum/10": rt["lr_at_minimum"] / 10,
            "minimum": rt["lr_at_minimum"],
            "valley": rt["lr_valley"],
            "steepest": rt["lr_steepest"],
        }.items():
            candidates.setdefault(name, []).append(lr / r["max_lr"])  # in units of this seed's auto LR

    def landing(ratios_to_auto: list[float], best_factor: float) -> dict[str, Any]:
        ratio = statistics.median(ratios_to_auto) / best_factor
        nearest = min(factors, key=lambda f: abs(math.log(f / statistics.median(ratios_to_auto))))
        return {
            "median_ratio_to_best": ratio,
            "within_2x": 0.5 <= ratio <= 2.0,
            "nearest_factor": nearest,
            "metric_at_nearest_factor": means[nearest],
        }

    return {
        "metric": METRIC[task][0],
        "mode": mode,
        "auto_rule": f"minimum/{divisor:.3g}",
        "auto_lrs": [r["max_lr"] for r in autos],
        "median_by_factor": {str(f): m for f, m in medians.items()},
        "mean_by_factor": {str(f): m for f, m in means.items()},
        "runs_by_factor": {str(f): v for f, v in by_factor.items()},
        "best_factor": best,
        "best_factor_by_mean": best_mean,
        "best_at_edge": best in (min(factors), max(factors)),
        "auto_within_2x_of_best": 0.5 <= best <= 2.0,
        "rules": {name: landing(v, best) for name, v in candidates.items()},
        "rules_vs_best_by_mean": {name: landing(v, best_mean) for name, v in candidates.items()},
    }


def print_summary(record: dict[str, Any]) -> None:
    env = record["env"]
    print(
        f"\n{device_label(env)} | torch {env['torch']} | lightning {env['lightning']} "
        f"| {record['args']['precision']} | {len(record['seeds'])} seeds | {record['wall_s']:.0f}s"
    )
    factors = record["factors"]
    for task, s in record["summary"].items():
        print(
            f"{task}: metric {s['metric']} ({s['mode']}), auto ({s['auto_rule']}) max_lr per seed "
            + ", ".join(f"{v:.3g}" for v in s["auto_lrs"])
        )
        print("  factor " + " ".join(f"{f:>8g}" for f in factors))
        print("  median " + " ".join(f"{s['median_by_factor'][str(f)]:8.4f}" for f in factors))
        print("  mean   " + " ".join(f"{s['mean_by_factor'][str(f)]:8.4f}" for f in factors))
        verdict = "PASS" if s["auto_within_2x_of_best"] else "FAIL"
        edge = " (best at the edge of the sweep)" if s["best_at_edge"] else ""
        print(
            f"  best factor x{s['best_factor']:g} by median{edge}, x{s['best_factor_by_mean']:g} by mean: "
            f"auto within 2x of the median's best: {verdict}"
        )
        print(
            "  rules (LR / best LR by median; by mean): "
            + ", ".join(
                f"{k} {v['median_ratio_to_best']:.2g}; {s['rules_vs_best_by_mean'][k]['median_ratio_to_best']:.2g}"
                for k, v in s["rules"].items()
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tasks", nargs="+", default=["fashion-mnist", "char-lm"], choices=list(METRIC))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--factors", type=float, nargs="+", default=[0.25, 0.5, 2.0, 4.0])
    parser.add_argument("--range-steps", type=int, default=100)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument(
        "--data-dir", default=None, help="Fashion-MNIST folder (default: the loader's search)"
    )
    parser.add_argument("--text", default=None, help="Tiny Shakespeare input.txt")
    parser.add_argument("--fashion-batch", type=int, default=128)
    parser.add_argument("--fashion-train-subset", type=int, default=None)
    parser.add_argument("--fashion-val-subset", type=int, default=None)
    parser.add_argument("--lm-steps", type=int, default=300)
    parser.add_argument("--lm-batch", type=int, default=64)
    parser.add_argument("--lm-block", type=int, default=256)
    parser.add_argument("--lm-val-windows", type=int, default=256)
    parser.add_argument("--smoke", action="store_true", help="tiny CPU budgets to test the script itself")
    parser.add_argument(
        "--resummarize",
        type=Path,
        default=None,
        help="recompute the summary of an earlier result file (no training) and write it to --out",
    )
    args = parser.parse_args()
    if args.resummarize is not None:
        record = json.loads(args.resummarize.read_text())
        record["summary"] = {
            task: summarize(task, [r for r in record["runs"] if r["task"] == task], record["factors"])
            for task in record["summary"]
        }
        args.out.write_text(json.dumps(record, indent=1, default=str))
        print_summary(record)
        return
    args.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.accelerator, args.precision, args.workers, args.range_steps = "cpu", "32-true", 0, 20
        args.fashion_batch, args.fashion_train_subset, args.fashion_val_subset = 32, 256, 256
        args.lm_steps, args.lm_batch, args.lm_block, args.lm_val_windows = 12, 8, 32, 16
        args.seeds, args.factors = args.seeds[:1], [0.5, 2.0]
        torch.set_num_threads(1)
    torch.set_float32_matmul_precision("high")
    factors = sorted({1.0, *args.factors})
    others = [f for f in factors if f != 1.0]

    started = time.time()
    runs: list[dict[str, Any]] = []
    for task in args.tasks:
        for i, seed in enumerate(args.seeds):
            auto = run_one(task, seed, "auto", args) | {"factor": 1.0}
            runs.append(auto)
            print(
                f"{task} seed {seed}: auto max_lr={auto['max_lr']:.3g} -> {auto['metric']:.4f} ({auto['wall_s']:.1f}s)"
            )
            rotated = others[i % len(others) :] + others[: i % len(others)]  # vary the order across seeds
            for f in rotated:
                r = run_one(task, seed, auto["max_lr"] * f, args) | {"factor": f}
                runs.append(r)
                print(
                    f"{task} seed {seed}: x{f:g} max_lr={r['max_lr']:.3g} -> {r['metric']:.4f} ({r['wall_s']:.1f}s)"
                )

    summary = {task: summarize(task, [r for r in runs if r["task"] == task], factors) for task in args.tasks}
    env = environment()
    record = {
        "benchmark": "lr_range_validation",
        "issue": 3,
        "env": env,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seeds": args.seeds,
        "factors": factors,
        "runs": runs,
        "summary": summary,
        "wall_s": time.time() - started,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str))

    print_summary(record)


if __name__ == "__main__":
    main()
