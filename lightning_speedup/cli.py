"""`lightning-speedup`: the command-line entry point (bench, demo, list).

Exit status: 0 when every recipe reached its target, 3 when one did not (or a run failed),
2 for bad input (unknown task or recipe, a target out of range, an output folder in use),
4 when ``--time-budget`` stopped the bench early, 143 when a SIGTERM stopped it and 130 when a Ctrl-C
(SIGINT) did (finish any of them with ``--resume --out FOLDER``; the demo starts over instead).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

EXIT_OK, EXIT_BAD_INPUT, EXIT_NOT_REACHED, EXIT_INCOMPLETE = 0, 2, 3, 4
DEFAULT_PRICE_PER_GPU_HOUR = 4.54  # USD; source and date in --price-per-gpu-hour's help
EXIT_TERMINATED = 128 + 15  # what a shell reports for a process ended by SIGTERM
EXIT_INTERRUPTED = 128 + 2  # ... and by SIGINT (Ctrl-C)

# The demo's reduced budget on a CPU: ResNet-9 at a quarter of its width (width 16, 0.4M parameters), 10k
# training / 2k test images, at most 4 epochs, both recipes in fp32 (bf16 autocast, speedup's precision on a
# GPU, is several times slower on a CPU). "minutes" is the time the demo states for 2 idle cores.
CPU_DEMO = {"train_subset": 10_000, "val_subset": 2_000, "max_epochs": 4, "target": 0.80, "width": 16,
            "precision": "32-true", "minutes": "4-5"}  # fmt: skip


def _add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="fashion-mnist or char-lm (see `lightning-speedup list`)")
    p.add_argument("--recipe", action="append", dest="recipes", default=[], metavar="NAME",
                   help="a recipe to run; repeat it; the first is the reference of the speed-up column")  # fmt: skip
    p.add_argument("--target", type=float, default=None, help="quality target (default: the task's)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per recipe (default 1)")
    p.add_argument(
        "--first-seed", type=int, default=0, help="seeds are FIRST_SEED .. FIRST_SEED+SEEDS-1 (default 0)"
    )
    p.add_argument("--max-epochs", type=int, default=None, help="epoch budget per run (default: the task's)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default bench-out/TASK-DATE)")
    p.add_argument("--overwrite", action="store_true",
                   help="remove an earlier bench's files from --out (runs/, caches/, bench.json, report.*; nothing "
                   "else) and start afresh")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="keep the finished runs in --out (required) and run the rest; the settings must be the same")  # fmt: skip
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no run that would end after this many seconds (judged by the same recipe's "
                   "longest run so far); finish later with --resume")  # fmt: skip
    p.add_argument("--data", default=None, help="data folder (fashion-mnist) or text file (char-lm)")
    p.add_argument("--train-subset", type=int, default=None, help="train on this many samples (quick runs)")
    p.add_argument("--val-subset", type=int, default=None, help="validate on this many samples")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model argument for quick runs, e.g. width=16 (ResNet-9) or n_layer=2")  # fmt: skip
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (default auto)")
    p.add_argument("--no-stop", action="store_true", help="keep training after the target is reached")
    p.add_argument("--ablation", action="store_true",
                   help="add the ablation ladder of --task: baseline plus one technique at a time up to speedup, "
                   "then speedup minus one at a time (recipes given with --recipe keep their place, and are not "
                   "run twice)")  # fmt: skip
    _add_cache_args(p)


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache", choices=["cold", "warm", "both"], default="cold",
        help="compile caches of each run (every run is a fresh process): cold = empty, as a user's first run "
        "(default); warm = filled first by a throw-away run of the recipe (reported apart); both = per seed a "
        "cold run, then a warm run reusing its caches, side by side in the report",
    )  # fmt: skip
    p.add_argument("--keep-caches", action="store_true", help="keep the runs' cache folders under OUT/caches")
    p.add_argument(
        "--price-per-gpu-hour", type=float, default=DEFAULT_PRICE_PER_GPU_HOUR, metavar="USD",
        help=f"converts time to target into money in the reports (default {DEFAULT_PRICE_PER_GPU_HOUR}: Spheron's "
        "on-demand H200 SXM price per GPU-hour as of 17 March 2026, spheron.network/blog/nvidia-h200-vs-b200-vs-gb200)",
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-speedup",
        description="Measure how much faster Lightning trains with lightning_speedup (time to target).",
    )
    from lightning_speedup import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = sub.add_parser("bench", help="time-to-target of recipes on a task; writes report.json/.md/.png")
    _add_bench_args(bench)
    demo = sub.add_parser("demo", help="baseline vs speedup on Fashion-MNIST (reduced budget on a CPU)")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("demo-out"),
        help="output folder (default demo-out; the demo replaces its own earlier report there)",
    )
    demo.add_argument("--data", default=None, help="Fashion-MNIST folder (default: search)")
    demo.add_argument("--seeds", type=int, default=1)
    _add_cache_args(demo)
    sub.add_parser("list", help="list tasks and recipes")
    return parser


def _list() -> int:
    from lightning_speedup.bench import TASKS, available_recipes, get_recipe

    print("tasks:")
    for t in TASKS.values():
        print(f"  {t.name:<18} {t.description}")
    print("recipes:")
    for name in available_recipes():
        print(f"  {name:<18} {get_recipe(name).description}")
    return EXIT_OK


def parse_model_args(pairs: Sequence[str]) -> dict[str, object]:
    """``["width=16", "dropout=0.0", "log_train_loss=false"]`` -> ``{"width": 16, "dropout": 0.0,
    "log_train_loss": False}`` (true/false, ints, floats, else strings)."""
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg expects KEY=VALUE (e.g. width=16), got {pair!r}.")
        value: object = raw
        if raw.lower() in ("true", "false"):
            out[key] = raw.lower() == "true"
            continue
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                continue
        out[key] = value
    return out


def _bench(args: argparse.Namespace, model_kwargs: dict | None = None, command: str = "bench") -> int:
    from lightning_speedup.bench.report import check_out_dir, remove_demo_report, table, write_report
    from lightning_speedup.bench.runner import BenchConfig, resume_hint, run_bench

    if model_kwargs is None:
        model_kwargs = parse_model_args(getattr(args, "model_arg", []))
    if getattr(args, "ablation", False):
        from lightning_speedup.bench.ablation import ablation_recipes

        # The ladder starts at baseline and passes speedup: a recipe also named with --recipe runs once, at the
        # place --recipe gave it (the first --recipe stays the reference of the speed-up column).
        args.recipes = list(args.recipes) + [n for n in ablation_recipes(args.task) if n not in args.recipes]
    cfg = BenchConfig(
        task=args.task, recipes=args.recipes, seeds=args.seeds, target=args.target, max_epochs=args.max_epochs,
        first_seed=getattr(args, "first_seed", 0), data_path=args.data, train_subset=args.train_subset, val_subset=args.val_subset,
        model_kwargs=model_kwargs, accelerator=args.accelerator, stop_at_target=not args.no_stop,
        cache=getattr(args, "cache", "cold"), precision=getattr(args, "precision", None),
    )  # fmt: skip
    cfg.resolve()  # unknown names and bad numbers fail here, before anything is written
    price = getattr(args, "price_per_gpu_hour", DEFAULT_PRICE_PER_GPU_HOUR)
    if price is None or not math.isfinite(price) or price < 0:
        raise ValueError(f"--price-per-gpu-hour must be a finite number >= 0 (US dollars), got {price}.")
    budget = getattr(args, "time_budget", None)
    if budget is not None and (not math.isfinite(budget) or budget < 0):
        raise ValueError(f"--time-budget must be a finite number >= 0 of seconds, got {budget}.")
    resume = getattr(args, "resume", False)
    if resume and args.out is None:
        raise ValueError(
            "--resume needs --out: the folder of the bench to finish (without --out every bench starts a new "
            "bench-out/TASK-DATE folder). The stopped bench printed its folder; rerun with --resume --out FOLDER."
        )
    out = args.out or Path("bench-out") / f"{args.task}-{datetime.now():%Y%m%d-%H%M%S}"
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"--out {out} is a file; --out names the folder that receives the report (new or existing)."
        )
    if command == "demo":
        remove_demo_report(out)  # only a report the demo wrote; anything else is refused
        hint = "the demo cannot resume: run `lightning-speedup demo` again (it starts over)"
    else:
        hint = resume_hint(out)
        if not resume:
            check_out_dir(out, args.overwrite)
    results, meta, complete = run_bench(
        cfg, out, resume=resume, time_budget_s=budget, keep_caches=getattr(args, "keep_caches", False),
        overwrite=command != "demo" and args.overwrite, hint=hint,
    )  # fmt: skip
    meta["command"] = command
    meta["price_per_gpu_hour"] = price
    rows = write_report(results, meta, out)
    print()
    print(table(rows, meta))
    print(f"\nreport: {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}")
    stopped = meta.get("stopped")
    if stopped in ("SIGTERM", "SIGINT"):
        print(f"stopped by {stopped}: the finished runs are saved in {out}; {hint}.")
        return EXIT_TERMINATED if stopped == "SIGTERM" else EXIT_INTERRUPTED
    if not complete:
        print(f"incomplete: the time budget ran out; {hint}.")
        return EXIT_INCOMPLETE
    return EXIT_OK if all(r["all_reached"] for r in rows) else EXIT_NOT_REACHED


def _demo(args: argparse.Namespace) -> int:
    import torch

    ns = argparse.Namespace(
        task="fashion-mnist", recipes=["baseline", "speedup"], seeds=args.seeds, target=None, max_epochs=None,
        out=args.out, overwrite=False, data=args.data, train_subset=None, val_subset=None,
        accelerator="auto", no_stop=False, cache=args.cache, keep_caches=args.keep_caches,
        price_per_gpu_hour=args.price_per_gpu_hour, precision=None,
    )  # fmt: skip
    model_kwargs = {}
    if torch.cuda.is_available():
        print(f"demo: full Fashion-MNIST task on {torch.cuda.get_device_name(0)}")
    else:
        c = CPU_DEMO
        print(
            f"demo: no GPU, so a reduced budget that takes about {c['minutes']} minutes on 2 idle CPU cores "
            f"(longer on a busy machine): ResNet-9 at width {c['width']}, {c['train_subset']} training / "
            f"{c['val_subset']} test images, at most "
            f"{c['max_epochs']} epochs, target val_acc {c['target']}. Both recipes run in fp32 ({c['precision']}): "
            "speedup's bf16 autocast is several times slower on a CPU, and its CUDA graphs and fused optimizer act "
            "only on a GPU. Run it on a GPU for the real numbers."
        )
        ns.train_subset, ns.val_subset, ns.max_epochs, ns.target, ns.precision = (
            c["train_subset"], c["val_subset"], c["max_epochs"], c["target"], c["precision"],
        )  # fmt: skip
        model_kwargs = {"width": c["width"]}
    return _bench(ns, model_kwargs, command="demo")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("LIGHTNING_SPEEDUP_LOGLEVEL", "WARNING"))
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from lightning_speedup.bench.datasets import DataError

    try:
        if args.command == "list":
            return _list()
        if args.command == "demo":
            return _demo(args)
        return _bench(args)
    except (ValueError, FileExistsError, DataError) as err:
        print(f"lightning-speedup: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        # before the first run or while writing the report; a bench's runs handle their own
        print("lightning-speedup: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_INCOMPLETE",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_REACHED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "build_parser",
    "main",
]
