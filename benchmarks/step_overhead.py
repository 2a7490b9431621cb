"""Host time per training step of the bench's `speedup` Lightning path against a plain PyTorch loop doing
the same work, and where the Lightning path's extra time goes.

Both paths train fashion-mnist with a tiny ResNet-9 on a small subset, so the compute is negligible and the
per-step host cost dominates:

* ``lightning``: the bench's own run (``lightning_speedup.bench.runner.run_one``: the task's data pipeline,
  module, recipe callbacks, Trainer kwargs, TimeToTarget, CSV logger), for the `speedup` recipe with only
  its batch size changed.
* ``plain``: the same data (device-resident batches, the same subsets), the same GPUAugment ops, model,
  optimizer, OneCycle schedule and autocast, in a hand-written loop (as ``benchmarks/reference_loop.py``).

ms/step is an epoch's training time over its steps, median over the epochs after the first, then median
over ``--repeats`` runs of each path (interleaved). ``--profile-steps`` runs the Lightning path once more
under cProfile and attributes the time of each training batch (Lightning's ``_TrainingEpochLoop.advance``)
to the pieces of the step; cProfile inflates Python-heavy pieces, so the shares are its, not the clock's.

    python benchmarks/step_overhead.py --out /tmp/step_overhead.json                 # CPU, about a minute
    python benchmarks/step_overhead.py --device cuda --out results/step-overhead/h200.json
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import logging
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import fashion_dir

from lightning_speedup.bench.env import environment
from lightning_speedup.bench.recipes import get_recipe, register_recipe
from lightning_speedup.bench.runner import BenchConfig, run_one
from lightning_speedup.bench.tasks import RunContext, get_task
from lightning_speedup.data import GPUAugment
from lightning_speedup.data.resident import ResidentBatches
from lightning_speedup.schedules import OneCycle
from lightning_speedup.schedules.functional import one_cycle

TASK = "fashion-mnist"


def _recipe_name(base: str, batch_size: int) -> str:
    """The base recipe with only its batch size changed, registered in this process."""
    name = f"{base}@batch{batch_size}"
    register_recipe(get_recipe(base).extended(name=name, batch_size=batch_size), replace=True)
    return name


def _config(args: argparse.Namespace, max_epochs: int, **model_kwargs: Any) -> BenchConfig:
    return BenchConfig(
        task=TASK, recipes=[args.recipe_name], max_epochs=max_epochs, data_path=args.data,
        train_subset=args.batch_size * args.steps, val_subset=args.batch_size * args.val_steps,
        model_kwargs={"width": args.width, **model_kwargs}, accelerator=args.accelerator, stop_at_target=False,
    )  # fmt: skip


def run_lightning(args: argparse.Namespace, **model_kwargs: Any) -> dict[str, Any]:
    """One bench run of the recipe: ms/step from TimeToTarget's per-epoch training time (validation excluded);
    ms/epoch from the time between validations (training and validation)."""
    with tempfile.TemporaryDirectory() as run_dir:
        res = run_one(
            _config(args, args.epochs, **model_kwargs),
            args.recipe_name,
            args.seed,
            Path(run_dir),
            echo=lambda s: None,
        )
    if res.error:
        raise RuntimeError(f"the Lightning run failed: {res.error}")
    assert res.samples_per_s is not None
    ends = [h["time_s"] for h in res.history]
    epoch_ms = [1e3 * (b - a) for a, b in itertools.pairwise(ends)]  # epochs after the first
    return {
        "ms_per_step": 1e3 * args.batch_size / res.samples_per_s,
        "ms_per_epoch": statistics.median(epoch_ms),
        "epochs": res.epochs,
    }


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    """The same work without Lightning, built from the bench's own pieces."""
    from lightning_speedup.bench.runner import build_trainer_parts

    cfg = _config(args, args.epochs)
    task = get_task(TASK)
    recipe = get_recipe(args.recipe_name).for_task(TASK)
    torch.manual_seed(args.seed)
    ctx = RunContext(
        task=task, recipe=recipe, seed=args.seed, data_path=cfg.data_path, train_subset=cfg.train_subset,
        val_subset=cfg.val_subset, model_kwargs=dict(cfg.model_kwargs), accelerator=args.accelerator,
    )  # fmt: skip
    module, dm, callbacks, kwargs = build_trainer_parts(task, ctx)
    device = torch.device(args.device)
    module = module.to(device)
    pipeline = next(cb for cb in callbacks if isinstance(cb, GPUAugment)).pipeline
    eval_pipeline = pipeline.deterministic()
    assert eval_pipeline is not None
    train = ResidentBatches(
        [t.to(device) for t in dm.train_tensors], dm.batch_size, shuffle=True, drop_last=dm.drop_last,
        seed=args.seed,
    )  # fmt: skip
    val = ResidentBatches([t.to(device) for t in dm.val_tensors], dm.batch_size, shuffle=False)
    net = module.net
    opt = module.configure_optimizers()
    # The recipe's OneCycle callback with its defaults (max_lr from the recipe, beta1 cycled 0.95-0.85).
    max_lr = next(cb for cb in callbacks if isinstance(cb, OneCycle)).peak_lr
    total = args.epochs * len(train)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=kwargs["precision"] == "bf16-mixed")
    generator = torch.Generator(device=device)
    if kwargs.get("benchmark") and device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    from lightning_speedup.data.augment import batch_seed

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    step, epoch_s, wall_s = 0, [], []
    for _ in range(args.epochs):
        net.train()
        sync()
        t0 = time.perf_counter()
        for x, y in train:
            lr, beta1 = one_cycle(step, total, max_lr=max_lr)
            for group in opt.param_groups:
                group["lr"], group["betas"] = lr, (beta1, group["betas"][1])
            generator.manual_seed(batch_seed(args.seed, 0, step))
            x, _ = pipeline(x, None, generator)
            with autocast:
                logits = net(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        sync()
        epoch_s.append(time.perf_counter() - t0)
        net.eval()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        with torch.no_grad(), autocast:  # val_loss and val_acc, as the module's validation_step logs them
            for x, y in val:
                logits = net(eval_pipeline(x)[0].contiguous(memory_format=torch.channels_last)).float()
                loss_sum += F.cross_entropy(logits, y) * len(y)
                correct += (logits.argmax(-1) == y).sum()
        float(loss_sum), float(correct)  # read once per validation, as Lightning's epoch-end metrics
        wall_s.append(time.perf_counter() - t0)
    per_step = [1e3 * s / len(train) for s in epoch_s]
    return {
        "ms_per_step": statistics.median(per_step[1:]),
        "ms_per_epoch": statistics.median(1e3 * s for s in wall_s[1:]),
        "epochs": len(epoch_s),
    }


# (bucket, predicate on (file, function)): the pieces of a Lightning training batch. Their cumulative times
# do not nest in one another, except `model forward + loss`, from which `self.log` is subtracted.
_BUCKETS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("data: ResidentBatches", lambda f, n: f.endswith("data/resident.py") and n == "__iter__"),
    ("ours: GPUAugment", lambda f, n: f.endswith("data/gpu_augment.py") and n == "on_train_batch_start"),
    ("ours: TimeToTarget", lambda f, n: f.endswith("bench/timing.py") and n.startswith("on_train_batch")),
    (
        "ours: AsyncProgressBarMetrics",
        lambda f, n: f.endswith("lightning_speedup/metrics.py") and n.startswith("on_"),
    ),
    ("ours: schedule callback", lambda f, n: f.endswith("schedules/callbacks.py") and n.startswith("on_")),
    ("ours: bench _Progress", lambda f, n: f.endswith("bench/runner.py") and n.startswith("on_train_batch")),
    # Lightning reads every callback's state_key on every hook it calls, whether the callback overrides the hook.
    ("ours: callbacks' state_key", lambda f, n: "lightning_speedup/" in f and n == "state_key"),
    ("model forward + loss", lambda f, n: f.endswith("bench/modules.py") and n == "training_step"),
    ("self.log", lambda f, n: f.endswith("pytorch/core/module.py") and n == "log"),
    ("backward", lambda f, n: f.endswith("torch/_tensor.py") and n == "backward"),
    ("optimizer math (torch.optim.adam)", lambda f, n: f.endswith("torch/optim/adam.py") and n == "adam"),
    ("zero_grad", lambda f, n: f.endswith("torch/optim/optimizer.py") and n == "zero_grad"),
]
_STEP = ("loops/training_epoch_loop.py", "advance")


def profile_lightning(args: argparse.Namespace) -> dict[str, Any]:
    """cProfile of one bench run; each training batch's time split into the buckets above, and the functions with
    the most self time over the whole run (setup and data loading included), per training step."""
    epochs = max(2, -(-args.profile_steps // args.steps))
    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as run_dir:
        prof.runcall(
            run_one, _config(args, epochs), args.recipe_name, args.seed, Path(run_dir), lambda s: None
        )
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    step = [(v[1], v[3]) for (f, _, n), v in stats.items() if f.endswith(_STEP[0]) and n == _STEP[1]]
    assert len(step) == 1, step
    steps, step_s = step[0]
    buckets: dict[str, float] = {}
    for name, match in _BUCKETS:
        buckets[name] = sum(v[3] for (f, _, n), v in stats.items() if match(f, n))
    buckets["model forward + loss"] -= buckets["self.log"]
    # Calls on the CPU for every step in both paths (model, backward, optimizer math): not overhead.
    buckets["Lightning: everything else in the step"] = step_s - sum(buckets.values())
    per_step = {k: 1e3 * v / steps for k, v in buckets.items()}
    top = sorted(
        (
            (1e3 * v[2] / steps, f"{Path(f).parent.name}/{Path(f).name}:{line}:{n}")
            for (f, line, n), v in stats.items()
        ),
        reverse=True,
    )[: args.top]
    # Lightning's own functions that run on every step, by their self time: where its share of the step goes.
    lightning = sorted(
        (
            (1e3 * v[2] / steps, v[1] / steps, f"{f.split('site-packages/')[-1]}:{line}:{n}")
            for (f, line, n), v in stats.items()
            if ("/lightning/" in f or "/lightning_utilities/" in f) and v[1] >= steps
        ),
        reverse=True,
    )[: args.top]
    return {
        "steps": steps,
        "ms_per_step_profiled": 1e3 * step_s / steps,
        "buckets_ms_per_step": per_step,
        "buckets_share": {k: v / step_s * steps / 1e3 for k, v in per_step.items()},
        "top_self_ms_per_step_whole_run": [{"function": name, "ms": ms} for ms, name in top],
        "lightning_self_ms_per_step": [
            {"function": name, "ms": ms, "calls_per_step": calls} for ms, calls, name in lightning
        ],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="Fashion-MNIST folder (default: the package's search)")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda")
    )
    p.add_argument("--recipe", default="speedup")
    p.add_argument("--batch-size", type=int, default=8, help="small, so that compute is negligible")
    p.add_argument("--width", type=int, default=2, help="ResNet-9 width (64 in the bench)")
    p.add_argument("--steps", type=int, default=100, help="training steps per epoch")
    p.add_argument("--val-steps", type=int, default=20, help="validation batches per epoch (20 in the bench)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is not timed")
    p.add_argument("--repeats", type=int, default=3, help="runs of each path, interleaved")
    p.add_argument("--profile-steps", type=int, default=300, help="0: no profile")
    p.add_argument("--top", type=int, default=25, help="functions listed by self time in the profile")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    for flag in ("batch_size", "width", "steps", "val_steps", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.epochs < 2:
        p.error("--epochs must be >= 2: the first epoch (warm-up) is not timed")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    args.data = fashion_dir(args.data)
    args.accelerator = "gpu" if args.device == "cuda" else "cpu"
    args.recipe_name = _recipe_name(args.recipe, args.batch_size)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning_speedup").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    runs: dict[str, list[dict[str, Any]]] = {"lightning": [], "lightning_no_step_log": [], "plain": []}
    for _ in range(args.repeats):
        runs["lightning"].append(run_lightning(args))
        # The same run without the module's per-step self.log("train_loss", ...): Lightning's logging share.
        runs["lightning_no_step_log"].append(run_lightning(args, log_train_loss=False))
        runs["plain"].append(run_plain(args))
    med = {k: statistics.median(r["ms_per_step"] for r in v) for k, v in runs.items()}
    result: dict[str, Any] = {
        "benchmark": "step_overhead",
        "script": "benchmarks/step_overhead.py",
        "task": TASK,
        "recipe": args.recipe,
        "device": args.device,
        "environment": environment(),
        "args": {k: v for k, v in vars(args).items() if k != "recipe_name"},
        "ms_per_step": {
            k: {
                "median": med[k],
                "min": min(r["ms_per_step"] for r in v),
                "max": max(r["ms_per_step"] for r in v),
            }
            for k, v in runs.items()
        },
        "ms_per_epoch": {k: statistics.median(r["ms_per_epoch"] for r in v) for k, v in runs.items()},
        # An epoch's time beyond its training steps: validation, and the loop's per-epoch work.
        "ms_per_epoch_outside_steps": {
            k: statistics.median(r["ms_per_epoch"] - args.steps * r["ms_per_step"] for r in v)
            for k, v in runs.items()
        },
        "lightning_minus_plain_ms": med["lightning"] - med["plain"],
        "lightning_over_plain": med["lightning"] / med["plain"],
        "step_log_ms": med["lightning"] - med["lightning_no_step_log"],
        "runs": runs,
    }
    if args.profile_steps > 0:
        result["profile"] = profile_lightning(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    shown = ("ms_per_step", "ms_per_epoch_outside_steps", "lightning_minus_plain_ms", "step_log_ms")
    print(json.dumps({k: result[k] for k in shown}, indent=2))
    if "profile" in result:
        for k, v in result["profile"]["buckets_ms_per_step"].items():
            print(f"  {k:45s} {v:7.3f} ms/step")
    return result


if __name__ == "__main__":
    main()
