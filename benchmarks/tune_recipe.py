"""Tunes a bench recipe's batch size, peak LR, schedule length and warm-up for the fastest time to target.

A Bayesian sweep (issue 21) through ``lightning_speedup.tune.tune_lightning`` with ``TimeToTargetObjective``.
A trial is the bench's own build of the recipe (``get_recipe(--recipe).for_task(--task)`` and
``build_trainer_parts``, as ``lightning-speedup bench`` builds a run) with four fields sampled:

  batch_size   the recipe's batch size
  peak_lr      the peak of its schedule callback (OneCycle's max_lr, WarmupStableDecay's peak_lr)
  epochs       the schedule's length, the recipe's max_epochs (the trial's Trainer stops there)
  warmup       the schedule's warm-up fraction (OneCycle's pct_start, WarmupStableDecay's warmup)

Every other field of the recipe and argument of its schedule stays as the recipe has it. A trial trains until
the task's target (``--target``, default the task's) and stops there, scoring its wall time from the start of
``fit``; a trial that misses scores TimeToTargetObjective's penalty. Trial seed = sweep seed (every trial
starts from the same weights and data order). No early stopping (scheduler=None), so with
``--compare-random`` only the searcher differs; sweeps run interleaved, seed by seed (bayes, random, random,
bayes, ...), on one Ray cluster.

Trials share the device (``--gpus-per-trial 0.25``: four trials on one GPU), so a trial's time is measured
beside other trials and is longer than a run alone: the sweep ranks configurations. The best one is measured
cold with ``lightning-speedup bench`` against the hand-picked recipe before it replaces it; the last line
printed is the ``Recipe.extended(...)`` call that builds it, for ``lightning_speedup/bench/recipes.py``.
``--recipe-out PATH`` also writes a recipes file that registers it as ``--tuned-name`` (default
``<recipe>-tuned``), for ``LIGHTNING_SPEEDUP_RECIPES=PATH lightning-speedup bench``; ``--from-result`` writes
that file from an existing result without sweeping.

Trials to target, per sweep: the 1-based number, in the order the searcher proposed them, of the first
trial that reached the quality target ("reach"), and of the first trial within ``--near-best`` of the
fastest time to target any sweep of this run found ("near best"); num_samples + 1 when none did (censored).

``--time-budget`` starts no sweep that the longest sweep so far says would end after it (exit 4), so that no
sweep is cut short; ``--resume`` keeps the finished sweeps of ``--out`` and runs the missing ones.

On the device (after ``source benchmarks/device_env.sh``, or ``bash benchmarks/run_on_gpu.sh tune``):
    python benchmarks/tune_recipe.py --device gpu --task char-lm --gpus-per-trial 0.25 --num-samples 16 \\
        --compare-random --out $OUT/tune_recipe_charlm.json
Smoke test of the script itself (numbers meaningless; about 15 s on 2 CPU cores):
    python benchmarks/tune_recipe.py --device cpu --task fashion-mnist --smoke --num-samples 2 \\
        --out /tmp/tune_recipe_smoke.json
The tuned recipe of a result, measured cold against the hand-picked one in a fresh process:
    python benchmarks/tune_recipe.py --task char-lm --from-result RESULT.json --recipe-out /tmp/tuned.py
    LIGHTNING_SPEEDUP_RECIPES=/tmp/tuned.py lightning-speedup bench --task char-lm --cache cold \\
        --recipe speedup --recipe speedup-tuned
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from typing_extensions import override

from lightning_speedup import schedules as schedules_module
from lightning_speedup.bench import recipes as recipes_module
from lightning_speedup.bench.datasets import DataError
from lightning_speedup.bench.env import environment
from lightning_speedup.bench.recipes import RECIPES_ENV, Recipe, get_recipe, schedule, schedule_spec
from lightning_speedup.bench.runner import build_trainer_parts, write_atomic
from lightning_speedup.bench.tasks import TASKS, RunContext, Task, get_task

SEARCHED = ("batch_size", "peak_lr", "epochs", "warmup")
SEARCHERS = ("bayes", "tpe", "random")
# The schedule callbacks a sweep can tune: (peak LR argument, warm-up fraction argument).
SCHEDULE_ARGS: dict[str, tuple[str, str]] = {
    "OneCycle": ("max_lr", "pct_start"),
    "WarmupStableDecay": ("peak_lr", "warmup"),
    "WarmupCosine": ("peak_lr", "warmup"),
}


@dataclass(frozen=True)
class Space:
    """The searched ranges of one task: batch sizes to choose from, and inclusive bounds of the rest."""

    batch_sizes: tuple[int, ...]
    peak_lr: tuple[float, float]  # log-uniform
    epochs: tuple[int, int]
    warmup: tuple[float, float]

    def domains(self) -> dict[str, Any]:
        from ray import tune

        return {
            "batch_size": tune.choice(list(self.batch_sizes)),
            "peak_lr": tune.loguniform(*self.peak_lr),
            "epochs": tune.randint(self.epochs[0], self.epochs[1] + 1),  # randint's upper bound is exclusive
            "warmup": tune.uniform(*self.warmup),
        }

    def contains(self, config: dict[str, Any]) -> bool:
        return (
            config["batch_size"] in self.batch_sizes
            and self.peak_lr[0] <= config["peak_lr"] <= self.peak_lr[1]
            and self.epochs[0] <= config["epochs"] <= self.epochs[1]
            and self.warmup[0] <= config["warmup"] <= self.warmup[1]
        )


# Around the hand-picked `speedup` recipe (Fashion-MNIST: batch 512, OneCycle max_lr 4e-3, 10 epochs,
# pct_start 0.3; char-LM: batch 128, WarmupStableDecay peak 1e-3, 40 epochs, warm-up 0.05 with decay 0.3),
# wide enough that the hand-picked point is not on an edge.
SPACES: dict[str, Space] = {
    "fashion-mnist": Space(batch_sizes=(256, 512, 1024, 2048), peak_lr=(1e-3, 2e-2), epochs=(4, 16),
                           warmup=(0.1, 0.5)),
    "char-lm": Space(batch_sizes=(64, 128, 256), peak_lr=(3e-4, 4e-3), epochs=(15, 60), warmup=(0.01, 0.2)),
}  # fmt: skip


@dataclass(frozen=True)
class Smoke:
    """The CPU test's reduced task: a small subset, a narrow model, one or two epochs, a reachable target."""

    space: Space
    target: float
    train_subset: int
    val_subset: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)


SMOKE: dict[str, Smoke] = {
    "fashion-mnist": Smoke(Space((32, 64), (1e-3, 1e-2), (1, 2), (0.2, 0.4)), target=0.3, train_subset=512,
                           val_subset=256, model_kwargs={"width": 4}),
    "char-lm": Smoke(Space((8, 16), (1e-3, 1e-2), (1, 2), (0.0, 0.2)), target=3.3, train_subset=256,
                     val_subset=32, model_kwargs={"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32}),
}  # fmt: skip


# --- the recipe with the sampled values --------------------------------------------------------


def schedule_of(recipe: Recipe, task: str) -> tuple[int, str, dict[str, float]]:
    """Position, class name and arguments of the recipe's one ``schedule(...)`` callback factory.

    Raises:
        ValueError: the recipe has no such factory for a schedule in :data:`SCHEDULE_ARGS`, or more than one.
    """
    found = []
    for index, factory in enumerate(recipe.callbacks):
        spec = schedule_spec(factory)
        if spec is not None and spec[0] in SCHEDULE_ARGS:
            found.append((index, *spec))
    if len(found) != 1:
        names = [getattr(f, "__name__", repr(f)) for f in recipe.callbacks] or "none"
        raise ValueError(
            f"Recipe {recipe.name!r} for task {task!r} has {len(found)} schedule callbacks that this sweep "
            f"can tune (its callbacks: {names}); it needs exactly one schedule(...) of "
            f"{sorted(SCHEDULE_ARGS)} from "
            "lightning_speedup/bench/recipes.py, whose peak LR and warm-up the sweep replaces. Choose such a "
            "recipe, e.g. --recipe speedup."
        )
    return found[0]


def recipe_overrides(recipe: Recipe, task: str, config: dict[str, Any]) -> dict[str, Any]:
    """The ``Recipe.extended(...)`` arguments that give ``recipe`` (for ``task``) the sampled values."""
    index, name, kwargs = schedule_of(recipe, task)
    peak_arg, warmup_arg = SCHEDULE_ARGS[name]
    callbacks = list(recipe.callbacks)
    callbacks[index] = schedule(name, **{**kwargs, peak_arg: float(config["peak_lr"]),
                                         warmup_arg: float(config["warmup"])})  # fmt: skip
    return {"batch_size": int(config["batch_size"]), "max_epochs": int(config["epochs"]),
            "callbacks": tuple(callbacks)}  # fmt: skip


def hand_picked(recipe: Recipe, task: Task) -> dict[str, Any]:
    """The recipe's own values of the searched fields."""
    _, name, kwargs = schedule_of(recipe, task.name)
    peak_arg, warmup_arg = SCHEDULE_ARGS[name]
    defaults = inspect.signature(getattr(schedules_module, name)).parameters
    return {
        "batch_size": task.setting(recipe, "batch_size"),
        "peak_lr": kwargs.get(peak_arg, defaults[peak_arg].default),
        "epochs": recipe.max_epochs or task.default_max_epochs,
        "warmup": kwargs.get(warmup_arg, defaults[warmup_arg].default),
    }


def _factory_source(factory: Callable[..., Any]) -> str:
    """Python source that names a callback factory of ``bench/recipes.py``."""
    spec = schedule_spec(factory)
    if spec is not None:
        name, kwargs = spec
        args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        return f"schedule({name!r}{args})"
    for attr, value in vars(recipes_module).items():
        if value is factory:
            return attr
    return f"<{getattr(factory, '__name__', repr(factory))}>"


def extended_source(recipe_name: str, task: str, overrides: dict[str, Any]) -> str:
    """The ``Recipe.extended(...)`` call, as Python source, that builds the tuned recipe."""

    def value(key: str, v: Any) -> str:
        if key != "callbacks":
            return repr(v)
        items = [_factory_source(f) for f in v]
        return f"({', '.join(items)}{',' if len(items) == 1 else ''})"

    args = ", ".join(f"{k}={value(k, v)}" for k, v in overrides.items())
    return f"get_recipe({recipe_name!r}).for_task({task!r}).extended({args})"


def _import_name(source: str) -> str:
    """The name of ``bench/recipes.py`` that a factory's source (from :func:`_factory_source`) calls."""
    return schedule.__name__ if source.startswith(f"{schedule.__name__}(") else source


def check_recipe_out(recipe_name: str, tuned_name: str, callbacks: Sequence[Callable[..., Any]]) -> None:
    """Refuse a recipes file that would replace the tuned recipe or could not rebuild its callbacks.

    Raises:
        ValueError: ``tuned_name`` is ``recipe_name``, or a callback factory has no name in ``bench/recipes.py``.
    """
    if tuned_name == recipe_name:
        raise ValueError(
            f"--tuned-name {tuned_name!r} would replace the recipe the sweep tunes; choose another name, e.g. "
            f"{recipe_name}-tuned."
        )
    unnamed = [source for source in map(_factory_source, callbacks) if source.startswith("<")]
    if unnamed:
        raise ValueError(
            f"--recipe-out: recipe {recipe_name!r} has callback factories {unnamed} that are not names of "
            "lightning_speedup/bench/recipes.py, so a recipes file cannot rebuild them; define them there (as "
            "async_metrics is), leave out --recipe-out, or tune a recipe whose callbacks are."
        )


def recipe_file_source(
    result: dict[str, Any], task: str, recipe: str, tuned_name: str, result_path: str, command: str
) -> str:
    """A Python recipes file that registers the best config of ``result`` as the recipe ``tuned_name``.

    The file builds the recipe as ``best["recipe_extended"]`` does, from the recipe the sweep tuned specialised
    for ``task`` (``for_task``), so ``$LIGHTNING_SPEEDUP_RECIPES=FILE lightning-speedup bench --recipe
    <tuned_name>`` runs it in a fresh process.

    Raises:
        ValueError: ``result`` is not a sweep result, was made for another task or recipe, has no best config,
            ``tuned_name`` would replace the tuned recipe itself, or a callback factory of the recipe has no name
            in ``bench/recipes.py``.
    """
    recipe_name = result.get("recipe")
    if result.get("benchmark") != "tune_recipe":
        raise ValueError(
            f"{result_path} is not a result file of tune_recipe.py (no 'benchmark': 'tune_recipe')."
        )
    if result.get("task") != task:
        raise ValueError(
            f"{result_path} was made for task {result.get('task')!r}, not {task!r}; pass --task "
            f"{result.get('task')} or a result file of a {task} sweep."
        )
    if recipe_name != recipe:
        raise ValueError(
            f"{result_path} tuned recipe {recipe_name!r}, not --recipe {recipe!r}; pass --recipe {recipe_name}."
        )
    best = result.get("best")
    if not best or not best.get("config"):
        raise ValueError(
            f"{result_path} has no best config (no trial reported a result; see its sweeps' errors): there is "
            "no tuned recipe to write. Run the sweeps again."
        )
    base = get_recipe(str(recipe_name)).for_task(task)
    overrides = recipe_overrides(base, task, best["config"])
    check_recipe_out(str(recipe_name), tuned_name, overrides["callbacks"])
    factories = [_factory_source(f) for f in overrides["callbacks"]]
    sweep = next(
        (sw for sw in result.get("sweeps", []) if (sw["searcher"], sw["seed"]) == (best["searcher"], best["seed"])),
        {},
    )  # fmt: skip
    date = sweep.get("date") or result.get("environment", {}).get("date", "an unknown date")
    ttt = best.get("time_to_target_s")
    reached = (
        f"time to target {ttt:.4g} s while sharing the device with other trials (measure it alone, cold, with "
        "`lightning-speedup bench` before trusting it)"
        if best.get("reached") and ttt is not None
        else "it did NOT reach the target in the sweep (the least-bad miss)"
    )
    description = (
        f"{recipe_name} tuned for {task} by benchmarks/tune_recipe.py ({best['searcher']} sweep, seed "
        f"{best['seed']}, trial {best.get('trial')}, {result_path}, {date}): {reached}. Specialised for {task} "
        f"({recipe_name}'s {task} settings): the bench runs it on any task it is given, with these settings."
    )
    call = extended_source(
        str(recipe_name), task, {"name": tuned_name, "description": description, **overrides}
    )
    names = ["get_recipe", "register_recipe", *dict.fromkeys(_import_name(f) for f in factories)]
    source = (
        f'"""The recipe {tuned_name!r}: {recipe_name!r} with the best config of a tune_recipe.py sweep, for {task}.\n\n'
        f"Generated from {result_path} by\n    {command}\n"
        f"Use it with\n    {RECIPES_ENV}=THIS_FILE lightning-speedup bench --task {task} --recipe {recipe_name} "
        f'--recipe {tuned_name}\n"""\n\n'
        f"from lightning_speedup.bench.recipes import {', '.join(sorted(dict.fromkeys(names)))}\n\n"
        f"register_recipe({call}, replace=True)\n"
    )
    compile(source, "<recipe file>", "exec")  # a broken file fails here, not in the bench's fresh process
    return source


def jsonable_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    return {k: [_factory_source(f) for f in v] if k == "callbacks" else v for k, v in overrides.items()}


# --- one trial --------------------------------------------------------------------------------


class RecipeEpochs(Callback):
    """Ends a trial after its recipe's epoch budget, the schedule's length, which varies from trial to trial
    while a sweep's Trainer arguments are shared (``max_epochs`` there is the space's longest schedule).

    Lowers ``trainer.fit_loop.max_epochs`` in ``setup``, before the schedule callback and the time-to-target
    report read ``trainer.estimated_stepping_batches`` (in ``on_fit_start`` and at each validation), so the
    schedule spans the trial's own epochs and a miss is charged for its own full run.
    """

    def __init__(self, max_epochs: int) -> None:
        if not isinstance(max_epochs, int) or max_epochs < 1:
            raise ValueError(f"RecipeEpochs: max_epochs must be an integer >= 1, got {max_epochs!r}.")
        self.max_epochs = max_epochs

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        budget = trainer.fit_loop.max_epochs
        if budget is not None and budget != -1 and self.max_epochs > budget:
            raise ValueError(
                f"RecipeEpochs: the trial's schedule has {self.max_epochs} epochs but the sweep's Trainer "
                f"allows {budget}; set the sweep's trainer_kwargs['max_epochs'] to the longest schedule."
            )
        trainer.fit_loop.max_epochs = self.max_epochs


def build(config: dict[str, Any]) -> tuple[L.LightningModule, L.LightningDataModule, list[Callback]]:
    """One trial: the bench's build of the recipe with the sampled values (runs in a Ray worker)."""
    fixed = json.loads(config["bench"])
    if fixed["recipe_files"]:
        # A Ray worker runs in a trial folder of its own, where ./benchmarks/recipes.py is not: name the
        # recipe files the driver saw (its candidates and ablations) by their absolute paths.
        os.environ[RECIPES_ENV] = fixed["recipe_files"]
    task = get_task(fixed["task"])
    base = get_recipe(fixed["recipe"]).for_task(task.name)
    recipe = base.extended(**recipe_overrides(base, task.name, config), **fixed["recipe_extra"])
    ctx = RunContext(
        task=task, recipe=recipe, seed=fixed["seed"], data_path=fixed["data"],
        train_subset=fixed["train_subset"], val_subset=fixed["val_subset"],
        model_kwargs=fixed["model_kwargs"], accelerator=fixed["accelerator"],
    )  # fmt: skip
    # The precision and Trainer arguments build_trainer_parts returns are the recipe's, shared by every trial:
    # the sweep passes them as its trainer_kwargs (see Plan.trainer_kwargs).
    module, dm, callbacks, _ = build_trainer_parts(task, ctx)
    assert recipe.max_epochs is not None
    return module, dm, [*callbacks, RecipeEpochs(recipe.max_epochs)]


# --- the plan: every argument checked before Ray starts ---------------------------------------


@dataclass
class Plan:
    task: Task
    recipe_name: str
    recipe: Recipe  # resolved for the task
    target: float
    space: Space
    searchers: list[str]
    seeds: list[int]
    num_samples: int
    resources: dict[str, float]
    max_concurrent: int
    data: str
    train_subset: int | None
    val_subset: int | None
    model_kwargs: dict[str, Any]
    recipe_extra: dict[str, Any]
    accelerator: str
    recipe_files: str  # the benchmark recipe files get_recipe reads, absolute, joined by os.pathsep
    scheduler: str | None = None  # None: every trial runs to its target or its epochs; "asha": weak ones stop
    # Names the sweeps in --storage, so a second run beside a first one starts sweeps of its own.
    started: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S"))

    def fixed(self, seed: int) -> str:
        """The constants every trial of a sweep gets, as one JSON string (a search-space constant)."""
        return json.dumps({
            "task": self.task.name, "recipe": self.recipe_name, "seed": seed, "data": self.data,
            "train_subset": self.train_subset, "val_subset": self.val_subset,
            "model_kwargs": self.model_kwargs,
            "recipe_extra": self.recipe_extra, "accelerator": self.accelerator,
            "recipe_files": self.recipe_files,
        })  # fmt: skip

    @property
    def trainer_kwargs(self) -> dict[str, Any]:
        # The longest schedule of the space: RecipeEpochs lowers it to each trial's own.
        return {
            "precision": self.recipe.precision,
            **self.recipe.trainer_kwargs,
            "max_epochs": self.space.epochs[1],
        }


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _recipe_files() -> str:
    """This checkout's ``benchmarks/recipes.py`` and the files of ``$LIGHTNING_SPEEDUP_RECIPES``, absolute."""
    files = [Path(__file__).resolve().parent / "recipes.py"]
    files += [Path(f).resolve() for f in os.environ.get(RECIPES_ENV, "").split(os.pathsep) if f]
    return os.pathsep.join(str(f) for f in dict.fromkeys(files) if f.is_file())


def make_plan(args: argparse.Namespace) -> Plan:
    """Check the arguments and resolve the task, recipe, target, data and resources.

    Raises:
        ValueError: a bad argument (the message says what is allowed).
        DataError: the task's data was not found.
    """
    task = get_task(args.task)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}.")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1 (the sweep runs with seeds 0..N-1), got {args.seeds}.")
    if not args.cpus_per_trial > 0:
        raise ValueError(f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}.")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ValueError(f"--max-concurrent must be >= 1, got {args.max_concurrent}.")
    if not 0 <= args.near_best < 1:
        raise ValueError(f"--near-best must be a fraction in [0, 1), got {args.near_best}.")
    if args.time_budget is not None and not args.time_budget > 0:
        raise ValueError(f"--time-budget must be > 0 seconds, got {args.time_budget}.")
    if args.compare_random and args.searcher == "random":
        raise ValueError(
            "--compare-random runs a random sweep beside --searcher; choose --searcher bayes or tpe."
        )
    if args.device == "cpu":
        gpus = 0.0 if args.gpus_per_trial is None else args.gpus_per_trial
        if gpus != 0:
            raise ValueError(
                f"--gpus-per-trial {args.gpus_per_trial:g} needs --device gpu; with --device cpu leave it "
                "out (each trial trains on --cpus-per-trial CPU cores)."
            )
        slots = max(1, int(_available_cpus() // args.cpus_per_trial))
    else:
        gpus = 0.25 if args.gpus_per_trial is None else args.gpus_per_trial
        if not 0 < gpus <= 1:
            raise ValueError(
                f"--gpus-per-trial must be in (0, 1] (a trial trains on one GPU or a share of one, e.g. 0.25 "
                f"for four trials per GPU), got {gpus:g}."
            )
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device gpu, but torch {torch.__version__} sees no CUDA device here. Use --device cpu, or "
                "run on the GPU machine (bash benchmarks/run_on_gpu.sh tune)."
            )
        slots = max(1, int(torch.cuda.device_count() / gpus + 1e-9))
    recipe = get_recipe(args.recipe).for_task(task.name)
    if recipe.strategy is not None:
        raise ValueError(
            f"Recipe {args.recipe!r} uses strategy {recipe.strategy!r}; a trial trains on one device. Tune a "
            "single-device recipe."
        )
    schedule_of(recipe, task.name)  # the recipe must have a schedule to tune
    if args.recipe_out is not None:
        # Refused before the sweeps rather than after them: the recipes file could not be written.
        check_recipe_out(args.recipe, args.tuned_name or f"{args.recipe}-tuned", recipe.callbacks)
    smoke = SMOKE[task.name] if args.smoke else None
    target = args.target if args.target is not None else smoke.target if smoke else task.default_target
    task.check_target(target)
    space = smoke.space if smoke else SPACES[task.name]
    if args.data is not None and not Path(args.data).exists():
        raise ValueError(
            f"--data {args.data} does not exist; pass the task's data folder or file, or leave it out."
        )
    # Absolute: trials run in Ray workers with working directories of their own.
    data = str(Path(task.locate_data(args.data)).resolve())
    searchers = [args.searcher, "random"] if args.compare_random else [args.searcher]
    return Plan(
        task=task, recipe_name=args.recipe, recipe=recipe, target=target, space=space, searchers=searchers,
        seeds=list(range(args.seeds)), num_samples=args.num_samples,
        resources={"cpu": args.cpus_per_trial, "gpu": gpus}, max_concurrent=args.max_concurrent or slots,
        data=data, train_subset=smoke.train_subset if smoke else None,
        val_subset=smoke.val_subset if smoke else None,
        model_kwargs=dict(smoke.model_kwargs) if smoke else {},
        # The smoke test's reduced task has no use for data-loader worker processes on a 2-core machine.
        recipe_extra={"num_workers": 0} if smoke else {},
        scheduler=None if args.scheduler == "none" else args.scheduler,
        accelerator="gpu" if gpus > 0 else "cpu", recipe_files=_recipe_files(),
    )  # fmt: skip


# --- sweeps and their summary -----------------------------------------------------------------


def _finite(value: Any) -> Any:
    """NaN and infinities as None (JSON has neither); numpy scalars as Python numbers."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _searched(config: dict[str, Any]) -> dict[str, Any]:
    out = {k: _finite(config.get(k)) for k in SEARCHED}
    for k in ("batch_size", "epochs"):
        if out[k] is not None:
            out[k] = int(out[k])
    return out


def run_sweep(plan: Plan, searcher: str, seed: int, storage: str, verbose: int) -> dict[str, Any]:
    from lightning_speedup.tune import TimeToTargetObjective, tune_lightning

    task = plan.task
    space = {**plan.space.domains(), "bench": plan.fixed(seed)}
    # Sweeps of one file may come from several calls (--resume): each says when and on what it ran.
    where = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "gpu": torch.cuda.get_device_name(0) if plan.accelerator == "gpu" else None}  # fmt: skip
    t0 = time.perf_counter()
    try:
        results = tune_lightning(
            build, space, num_samples=plan.num_samples, searcher=searcher, scheduler=plan.scheduler,
            objective=TimeToTargetObjective(task.metric, plan.target, task.mode),  # type: ignore[arg-type]
            resources_per_trial=plan.resources, trainer_kwargs=plan.trainer_kwargs, storage_path=storage,
            name=f"{task.name}_{searcher}_seed{seed}_{plan.started}", seed=seed,
            max_concurrent=plan.max_concurrent,
            checkpoint=False, verbose=verbose,
        )  # fmt: skip
    except RuntimeError as err:  # every trial failed: the first trial's error is the cause
        cause = (
            f"; first trial's error: {type(err.__cause__).__name__}: {err.__cause__}" if err.__cause__ else ""
        )
        return {"searcher": searcher, "seed": seed, **where, "wall_s": time.perf_counter() - t0,
                "complete": True, "trials": [], "best": None, "error": f"{err}{cause}"}  # fmt: skip
    wall = time.perf_counter() - t0
    trials = []
    for number, row in enumerate(results.dataframe().to_dict("records"), start=1):
        reached = bool(row.get("reached_target") is True or row.get("reached_target") == 1)
        score = _finite(row.get("time_to_target_s"))
        trials.append({
            "trial": number, "config": _searched({k.removeprefix("config/"): v for k, v in row.items()}),
            "status": row["status"], "reached": reached, "time_to_target_s": score if reached else None,
            "score": score, "best_metric": _finite(row.get(task.metric)),
            "validations": _finite(row.get("iterations")),
            "time_s": _finite(row.get("time_s")),
            "error": row.get("error") if isinstance(row.get("error"), str) else None,
        })  # fmt: skip
    sweep: dict[str, Any] = {"searcher": searcher, "seed": seed, **where, "wall_s": wall,
                             "complete": results.complete, "trials": trials, "best": None,
                             "error": None}  # fmt: skip
    if results.best_config is not None:
        config = _searched(results.best_config)
        best_trial = next((t for t in trials if t["config"] == config), None)
        sweep["best"] = _best_entry(plan, config, best_trial, reached=bool(results.reached_target))
    return sweep


def _best_entry(
    plan: Plan, config: dict[str, Any], trial: dict[str, Any] | None, reached: bool
) -> dict[str, Any]:
    overrides = recipe_overrides(plan.recipe, plan.task.name, config)
    return {
        "config": config, "reached": reached,
        "time_to_target_s": trial["time_to_target_s"] if trial else None,
        "best_metric": trial["best_metric"] if trial else None, "trial": trial["trial"] if trial else None,
        "recipe_overrides": jsonable_overrides(overrides),
        "recipe_extended": extended_source(plan.recipe_name, plan.task.name, overrides),
    }  # fmt: skip


def first_trial(trials: Sequence[dict[str, Any]], hit: Callable[[dict[str, Any]], bool]) -> int | None:
    """The 1-based number of the first trial for which ``hit`` holds, or None."""
    return next((t["trial"] for t in trials if hit(t)), None)


def sweep_gpus(sweeps: Sequence[dict[str, Any]]) -> list[str]:
    """The GPUs the sweeps ran on, sorted (none for CPU sweeps)."""
    return sorted({sw["gpu"] for sw in sweeps if sw.get("gpu")})


def trials_to_target(
    sweeps: Sequence[dict[str, Any]], searchers: Sequence[str], num_samples: int, near_best: float
) -> dict[str, Any]:
    """Per searcher: per seed, the trials until one reached the target and until one came within
    ``near_best`` of the fastest time any sweep found (num_samples + 1 where none did), their medians and
    how many sweeps got there."""
    gpus = sweep_gpus(sweeps)
    # Times from different GPUs do not compare: sweeps resumed on another GPU keep 'reach' (a metric threshold)
    # and leave 'near best' (a fraction of the fastest time) out.
    comparable = len(gpus) <= 1
    times = [
        t["time_to_target_s"] for sw in sweeps for t in sw["trials"] if t["time_to_target_s"] is not None
    ]
    fastest = min(times) if times and comparable else None
    bar = fastest * (1 + near_best) if fastest is not None else None
    out: dict[str, Any] = {"fastest_time_to_target_s": fastest, "near_best": near_best, "near_best_s": bar,
                           "censored_at": num_samples + 1, "gpus": gpus,
                           "times_comparable": comparable}  # fmt: skip
    for searcher in searchers:
        row: dict[str, Any] = {}
        own = [sw for sw in sweeps if sw["searcher"] == searcher]
        for key, hit in (
            ("reach", lambda t: t["reached"]),
            ("near_best", lambda t: bar is not None and t["time_to_target_s"] is not None
             and t["time_to_target_s"] <= bar),
        ):  # fmt: skip
            if key == "near_best" and not comparable:
                row.update(near_best=None, near_best_median=None, near_best_got_there=None)
                continue
            counts = [first_trial(sw["trials"], hit) for sw in own]
            censored = [c if c is not None else num_samples + 1 for c in counts]
            row[key] = censored
            row[f"{key}_median"] = statistics.median(censored) if censored else None
            row[f"{key}_got_there"] = sum(c is not None for c in counts)
        row["seeds"] = [sw["seed"] for sw in own]
        out[searcher] = row
    return out


def overall_best(sweeps: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest best of a sweep that reached the target (the first of equal ones), else the first best."""
    bests = [(sw, sw["best"]) for sw in sweeps if sw["best"] is not None]
    reached = [(sw, b) for sw, b in bests if b["reached"] and b["time_to_target_s"] is not None]
    if reached:
        sw, best = min(reached, key=lambda p: p[1]["time_to_target_s"])
    elif bests:
        sw, best = bests[0]
    else:
        return None
    return {"searcher": sw["searcher"], "seed": sw["seed"], **best}


def settings_of(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    """What the sweeps of one result file share (``--resume`` refuses a file whose sweeps differ)."""
    return {
        "searchers": plan.searchers, "num_samples": plan.num_samples, "seeds": plan.seeds,
        "resources_per_trial": plan.resources, "max_concurrent": plan.max_concurrent, "scheduler": plan.scheduler,
        "near_best": args.near_best, "time_budget_s": args.time_budget, "trainer_kwargs": plan.trainer_kwargs,
        "train_subset": plan.train_subset, "val_subset": plan.val_subset, "model_kwargs": plan.model_kwargs,
        "recipe_extra": plan.recipe_extra,
        "search_space": {"batch_size": list(plan.space.batch_sizes), "peak_lr": list(plan.space.peak_lr),
                         "peak_lr_sampling": "loguniform", "epochs": list(plan.space.epochs),
                         "warmup": list(plan.space.warmup)},
    }  # fmt: skip


# The fields of a result file that its sweeps must share with the sweeps a --resume adds. Searchers, seeds,
# --near-best and --time-budget may change: a resume may add a searcher or seeds.
_SHARED = ("task", "recipe", "metric", "target", "device", "smoke")
_SHARED_SETTINGS = ("num_samples", "resources_per_trial", "max_concurrent", "scheduler", "trainer_kwargs",
                    "train_subset", "val_subset", "model_kwargs", "recipe_extra", "search_space")  # fmt: skip


def header(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "benchmark": "tune_recipe", "task": plan.task.name, "recipe": plan.recipe_name,
        "metric": plan.task.metric, "mode": plan.task.mode, "target": plan.target, "device": args.device,
        "smoke": args.smoke,
    }  # fmt: skip


def previous_sweeps(plan: Plan, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The finished sweeps of ``--out`` that this run's plan has too, for ``--resume``.

    Raises:
        ValueError: the file is not a result of this script, or its sweeps ran with other settings.
    """
    path: Path = args.out
    if not path.exists():
        print(f"--resume: {path} does not exist yet; starting the sweeps", flush=True)
        return []
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"--resume: {path} is not valid JSON ({err}); delete it or choose another --out."
        ) from err
    if not isinstance(saved, dict) or saved.get("benchmark") != "tune_recipe":
        raise ValueError(f"--resume: {path} is not a result file of tune_recipe.py; choose another --out.")
    fresh, settings = header(plan, args), settings_of(plan, args)
    differ = [k for k in _SHARED if saved.get(k) != fresh[k]]
    differ += [k for k in _SHARED_SETTINGS if saved.get("settings", {}).get(k) != settings[k]]
    if differ:
        was = {k: saved.get(k, saved.get("settings", {}).get(k)) for k in differ}
        raise ValueError(
            f"--resume: the sweeps in {path} ran with other settings ({', '.join(differ)}: {was}). Resume "
            "with the arguments they ran with, or choose another --out."
        )
    wanted = {(searcher, seed) for searcher in plan.searchers for seed in plan.seeds}
    return [
        sw for sw in saved.get("sweeps", [])
        if (sw["searcher"], sw["seed"]) in wanted and sw["complete"] and not sw["error"]
    ]  # fmt: skip


def report(
    plan: Plan,
    args: argparse.Namespace,
    sweeps: list[dict[str, Any]],
    interrupted: bool,
    skipped: list[dict[str, Any]],
) -> dict[str, Any]:
    import optuna
    import ray

    picked = hand_picked(plan.recipe, plan.task)
    return {
        **header(plan, args),
        "environment": {**environment(), "ray": ray.__version__, "optuna": optuna.__version__,
                        "seeds": plan.seeds},
        "settings": settings_of(plan, args),
        "hand_picked": {**picked, "in_space": plan.space.contains(picked)},
        "complete": not (interrupted or skipped) and all(sw["complete"] and not sw["error"] for sw in sweeps),
        "skipped_sweeps": skipped,
        "sweeps": sweeps,
        "best_per_sweep": [
            {"searcher": sw["searcher"], "seed": sw["seed"], **(sw["best"] or {})} for sw in sweeps
        ],
        "trials_to_target": trials_to_target(sweeps, plan.searchers, plan.num_samples, args.near_best),
        "best": overall_best(sweeps),
    }  # fmt: skip


# --- console output ---------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_sweep(sweep: dict[str, Any], metric: str) -> None:
    reached = sum(t["reached"] for t in sweep["trials"])
    best = sweep["best"] or {}
    print(
        f"seed {sweep['seed']} {sweep['searcher']:>6}: {len(sweep['trials'])} trials in "
        f"{sweep['wall_s']:.0f} s, "
        f"{reached} reached the target; best {_fmt(best.get('time_to_target_s'))} s "
        f"({metric} {_fmt(best.get('best_metric'))}, trial {_fmt(best.get('trial'))})"
        + ("" if sweep["complete"] else " [interrupted]"),
        flush=True,
    )


def print_summary(result: dict[str, Any], out: Path) -> None:
    ttt = result["trials_to_target"]
    print(f"\nwrote {out}")
    print(
        f"trials to target (median over seeds; {ttt['censored_at']} = not reached): 'reach' = the first "
        f"trial at {result['metric']} {'>=' if result['mode'] == 'max' else '<='} {result['target']}, "
        f"'near best' = the first within {ttt['near_best']:.0%} of the fastest time to target "
        f"({_fmt(ttt['fastest_time_to_target_s'])} s)"
    )
    if not ttt["times_comparable"]:
        print(f"  (the sweeps ran on different GPUs, {' and '.join(ttt['gpus'])}: their times do not compare, so "
              "'near best' is left out)")  # fmt: skip
    print(f"{'searcher':>8} {'reach':>6} {'got there':>10} {'near best':>10} {'got there':>10}")
    for searcher in result["settings"]["searchers"]:
        row, n = ttt[searcher], len(ttt[searcher]["seeds"])
        near = "-" if row["near_best_got_there"] is None else f"{row['near_best_got_there']}/{n}"
        print(f"{searcher:>8} {_fmt(row['reach_median']):>6} {row['reach_got_there']:>6}/{n:<3} "
              f"{_fmt(row['near_best_median']):>10} {near:>10}")  # fmt: skip
    best = result["best"]
    if best is None:
        print("\nno trial reported a result; see the errors in the JSON")
        return
    picked = result["hand_picked"]
    verdict = "reached the target" if best["reached"] else "did NOT reach the target (the least-bad miss)"
    print(
        f"\nbest config ({best['searcher']} seed {best['seed']} trial {best['trial']}, {verdict}; "
        f"time to target {_fmt(best['time_to_target_s'])} s while sharing the device):"
    )
    print(f"{'field':>10} {'hand-picked':>12} {'tuned':>12}")
    for key in SEARCHED:
        print(f"{key:>10} {_fmt(picked[key]):>12} {_fmt(best['config'][key]):>12}")
    print(
        f"measure it cold against {result['recipe']!r} with `lightning-speedup bench` before it replaces it:"
    )
    print(best["recipe_extended"], flush=True)


# --- main -------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tune_recipe.py", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--recipe", default="speedup", help="the recipe to tune (default: speedup)")
    p.add_argument("--target", type=float, default=None, help="quality target (default: the task's; --smoke: "
                   "a reachable one)")  # fmt: skip
    p.add_argument("--searcher", choices=SEARCHERS, default="bayes")
    p.add_argument("--num-samples", type=int, default=16, help="trials per sweep")
    p.add_argument("--device", choices=("cpu", "gpu"), default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--gpus-per-trial",
        type=float,
        default=None,
        help="share of a GPU per trial (--device gpu; default 0.25: four trials per GPU)",
    )
    p.add_argument(
        "--cpus-per-trial",
        type=float,
        default=None,
        help="CPU cores per trial (default: 1 with --device cpu, 4 with --device gpu)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at once, the same for every searcher (default: as many as the devices hold)",
    )
    p.add_argument("--seeds", type=int, default=1, help="repeat the sweep with seeds 0..N-1")
    p.add_argument(
        "--scheduler",
        choices=("none", "asha"),
        default="none",
        help="none (default): every trial runs to the target or its epochs; asha: stop trials whose "
        "time-to-target score trails at a rung (counted in validations), for every searcher alike",
    )
    p.add_argument(
        "--compare-random",
        action="store_true",
        help="run a random sweep with the same budget beside each sweep (interleaved)",
    )
    p.add_argument(
        "--near-best",
        type=float,
        default=0.1,
        help="'near best' in trials to target: within this fraction of the fastest time (default 0.1)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny subset, width and epoch count with a reachable target: checks the script on a CPU",
    )
    p.add_argument(
        "--data", default=None, help="the task's data folder (fashion-mnist) or text file (char-lm)"
    )
    p.add_argument(
        "--storage", default=None, help="keep the Ray Tune sweeps here (default: a temporary folder)"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no sweep that the longest sweep so far says would end after this many seconds (exit 4)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished sweeps of --out (same settings) and run only the missing ones",
    )
    p.add_argument("--verbose", type=int, default=0, help="Ray Tune's verbosity (0-2)")
    p.add_argument(
        "--out", type=Path, default=None, help="the result file (JSON); needed unless --from-result"
    )
    p.add_argument(
        "--recipe-out",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"write a recipes file registering the best config as --tuned-name (for ${RECIPES_ENV})",
    )
    p.add_argument("--tuned-name", default=None, help="the tuned recipe's name (default: '<recipe>-tuned')")
    p.add_argument(
        "--from-result",
        type=Path,
        default=None,
        metavar="RESULT_JSON",
        help="no sweep: write --recipe-out from the best config of this result file",
    )
    p.add_argument(
        "--from-searcher",
        default=None,
        metavar="SEARCHER",
        help="with --from-result: the best config of this searcher's sweeps (e.g. bayes) instead of the best of all",
    )
    return p


def write_recipe_file(
    result: dict[str, Any], args: argparse.Namespace, result_path: Path, argv: Sequence[str]
) -> None:
    """Write ``--recipe-out`` from ``result``'s best config (see :func:`recipe_file_source`)."""
    tuned_name = args.tuned_name or f"{result.get('recipe')}-tuned"
    command = "python benchmarks/tune_recipe.py " + shlex.join(argv)
    source = recipe_file_source(result, args.task, args.recipe, tuned_name, str(result_path), command)
    write_atomic(args.recipe_out, source)
    print(f"wrote {args.recipe_out}: {RECIPES_ENV}={args.recipe_out} lightning-speedup bench --task {args.task} "
          f"--recipe {result['recipe']} --recipe {tuned_name}", flush=True)  # fmt: skip


def from_result(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """``--from-result``: the recipes file of an existing result, without sweeping.

    Raises:
        ValueError: the file is missing, not a result of this script, of another task or recipe, or has no best.
    """
    path: Path = args.from_result
    if args.recipe_out is None:
        raise ValueError("--from-result writes a recipes file; name it with --recipe-out PATH.")
    if not path.is_file():
        raise ValueError(f"--from-result {path} does not exist; pass the JSON that --out of a sweep wrote.")
    try:
        result = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--from-result {path} is not valid JSON ({err}).") from err
    if not isinstance(result, dict):
        raise ValueError(
            f"--from-result {path} is not a result file of tune_recipe.py; pass the JSON of --out."
        )
    if args.from_searcher is not None:
        own = [sw for sw in result.get("sweeps", []) if sw.get("searcher") == args.from_searcher]
        if not own:
            ran = sorted({sw.get("searcher") for sw in result.get("sweeps", [])})
            raise ValueError(
                f"--from-searcher {args.from_searcher!r}: {path} has no sweep of it; its searchers: {ran}."
            )
        result = {**result, "best": overall_best(own)}
    write_recipe_file(result, args, path, argv)


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.from_result is not None:
        try:
            from_result(args, argv)
        except ValueError as err:
            ap.error(str(err))  # exits 2
        return 0
    if args.out is None:
        ap.error(
            "--out is required: the result file of the sweeps (or pass --from-result to only write a recipe)"
        )
    if args.cpus_per_trial is None:
        args.cpus_per_trial = 4.0 if args.device == "gpu" else 1.0
    try:
        plan = make_plan(args)
        sweeps = previous_sweeps(plan, args) if args.resume else []
    except (ValueError, DataError) as err:
        ap.error(str(err))  # exits 2
    done = {(sw["searcher"], sw["seed"]) for sw in sweeps}
    if done:
        print(f"--resume: keeping the finished sweeps {sorted(done)} of {args.out}", flush=True)
        here = torch.cuda.get_device_name(0) if args.device == "gpu" and torch.cuda.is_available() else None
        elsewhere = [g for g in sweep_gpus(sweeps) if g != here]
        if here is not None and elsewhere:
            print(
                f"--resume: the kept sweeps ran on {', '.join(elsewhere)} and this one runs on {here}: trials to "
                "the target still compare, times (the 'near best' count, which sweep's best is fastest) do not",
                file=sys.stderr, flush=True,
            )  # fmt: skip

    from lightning_speedup.tune import init_ray

    init_ray(log_to_driver=args.verbose >= 2)
    interrupted = failed = False
    skipped: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tune_recipe_") as tmp:
        storage = args.storage or tmp
        try:
            for seed in plan.seeds:
                order = plan.searchers if seed % 2 == 0 else plan.searchers[::-1]
                for searcher in order:
                    if (searcher, seed) in done:
                        continue
                    longest = max((sw["wall_s"] for sw in sweeps), default=0.0)
                    if (
                        args.time_budget is not None
                        and time.perf_counter() - t_start + longest > args.time_budget
                    ):
                        # A sweep cut short in the middle would compare the searchers on unequal budgets.
                        skipped.append({"searcher": searcher, "seed": seed})
                        continue
                    sweep = run_sweep(plan, searcher, seed, storage, args.verbose)
                    sweeps.append(sweep)
                    print_sweep(sweep, plan.task.metric)
                    # Written after every sweep, so that a run cut short by its time budget keeps what it did.
                    write_atomic(args.out, json.dumps(report(plan, args, sweeps, False, skipped), indent=1))
                    if sweep["error"]:
                        # The next sweeps build the same trials; they would fail the same way.
                        print(f"sweep failed: {sweep['error']}", file=sys.stderr, flush=True)
                        failed = True
                        break
                    if not sweep["complete"]:
                        raise KeyboardInterrupt  # Ray Tune stopped the sweep on SIGINT: stop here too
                if failed:
                    break
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: the result file holds the sweeps so far", file=sys.stderr, flush=True)
    result = report(plan, args, sweeps, interrupted, skipped)
    write_atomic(args.out, json.dumps(result, indent=1))
    if skipped:
        print(
            f"--time-budget {args.time_budget:g} s: skipped the sweeps {skipped}", file=sys.stderr, flush=True
        )
    print_summary(result, args.out)
    if args.recipe_out is not None:
        if result["best"] is None:
            print(f"--recipe-out: no best config, so no recipe written to {args.recipe_out}", file=sys.stderr)
        else:
            try:
                write_recipe_file(result, args, args.out, argv)
            except ValueError as err:
                print(f"--recipe-out: {err}", file=sys.stderr, flush=True)
                failed = True
    return 1 if failed else 130 if interrupted else 4 if skipped else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
