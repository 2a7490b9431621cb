"""Runs recipes x seeds as separate fits, interleaved (A B A B ...), and collects the results."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from typing_extensions import override

from lightning_speedup.bench.env import environment
from lightning_speedup.bench.recipes import get_recipe
from lightning_speedup.bench.tasks import RunContext, Task, get_task
from lightning_speedup.bench.timing import TimeToTarget

log = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    """What every run of one bench shares."""

    task: str
    recipes: Sequence[str]
    seeds: int = 1
    target: float | None = None
    max_epochs: int | None = None
    data_path: str | None = None
    train_subset: int | None = None
    val_subset: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    accelerator: str = "auto"
    stop_at_target: bool = True
    first_seed: int = 0

    def resolve(self) -> tuple[Task, list[str], float, int]:
        """Validate names and numbers up front, before any run starts."""
        task = get_task(self.task)
        if not self.recipes:
            raise ValueError("Give at least one --recipe (e.g. --recipe baseline --recipe speedup).")
        for name in self.recipes:
            get_recipe(name).for_task(task.name)
        twice = sorted({n for n in self.recipes if list(self.recipes).count(n) > 1})
        if twice:
            raise ValueError(f"Recipe(s) {twice} listed more than once; use --seeds for repeats.")
        task.check_model_kwargs(self.model_kwargs)
        task.locate_data(self.data_path)  # missing data fails here, with the places tried and the fixes
        target = task.default_target if self.target is None else self.target
        task.check_target(target)
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}.")
        if self.first_seed < 0:
            raise ValueError(f"--first-seed must be >= 0, got {self.first_seed}.")
        max_epochs = self.max_epochs or task.default_max_epochs
        if max_epochs < 1:
            raise ValueError(f"--max-epochs must be >= 1, got {max_epochs}.")
        return task, list(self.recipes), target, max_epochs


@dataclass
class RunResult:
    task: str
    recipe: str
    seed: int
    reached: bool
    time_to_target_s: float | None
    epochs_to_target: int | None
    steps_to_target: int | None
    best_metric: float | None
    final_metric: float | None
    warmup_s: float | None
    first_step_s: float | None
    samples_per_s: float | None
    peak_mem_mb: float | None
    total_s: float
    epochs: int
    history: list[dict[str, float]]
    error: str | None = None
    environment: dict[str, Any] | None = None  # where the run ran (runs of one bench may span machines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Progress(Callback):
    """One line per validation, so long benches show where they are."""

    def __init__(self, label: str, metric: str, max_epochs: int, echo: Callable[[str], None]) -> None:
        self.label, self.metric, self.max_epochs, self.echo = label, metric, max_epochs, echo
        self._t0 = time.perf_counter()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        shown = f"{float(value):.4f}" if value is not None else "n/a"
        self.echo(
            f"  {self.label}  epoch {trainer.current_epoch + 1}/{self.max_epochs}  step {trainer.global_step}  "
            f"{self.metric}={shown}  {time.perf_counter() - self._t0:.1f}s"
        )


def build_trainer_parts(
    task: Task, ctx: RunContext
) -> tuple[L.LightningModule, L.LightningDataModule, list[Callback], dict[str, Any]]:
    """Module, data module, recipe callbacks and Trainer kwargs of one run (no Trainer yet)."""
    recipe = ctx.recipe
    dm, pipeline_callbacks = task.pipeline(ctx)
    module = task.build_module(ctx, dm)
    callbacks = list(pipeline_callbacks) + [factory(ctx) for factory in recipe.callbacks]
    kwargs: dict[str, Any] = {"precision": recipe.precision, "accelerator": ctx.accelerator, "devices": 1}
    if recipe.strategy is not None:
        kwargs["strategy"] = recipe.strategy
        kwargs.pop("devices")
    kwargs.update(recipe.trainer_kwargs)
    return module, dm, callbacks, kwargs


def run_one(
    cfg: BenchConfig,
    recipe_name: str,
    seed: int,
    run_dir: Path,
    echo: Callable[[str], None] = print,
    label: str = "",
) -> RunResult:
    """One fit of one recipe with one seed; failures are caught and reported, never hidden."""
    task, _, target, default_epochs = cfg.resolve()
    recipe = get_recipe(recipe_name).for_task(task.name)
    # An explicit --max-epochs applies to every recipe; otherwise a recipe's own budget (a schedule's
    # length), else the task's.
    max_epochs = cfg.max_epochs or recipe.max_epochs or default_epochs
    if recipe.compile:
        # Each run compiles as a fresh process would: without this, runs after the first reuse the
        # in-memory graphs of dynamo and show almost no warm-up. (Inductor's on-disk cache stays, as
        # it does for a user who trains twice.)
        torch._dynamo.reset()
    L.seed_everything(seed, workers=True, verbose=False)
    ctx = RunContext(
        task=task, recipe=recipe, seed=seed, data_path=cfg.data_path, train_subset=cfg.train_subset,
        val_subset=cfg.val_subset, model_kwargs=dict(cfg.model_kwargs), accelerator=cfg.accelerator,
    )  # fmt: skip
    timer = TimeToTarget(task.metric, target, task.mode, stop_at_target=cfg.stop_at_target)
    error = None
    try:
        module, dm, callbacks, kwargs = build_trainer_parts(task, ctx)
        with warnings.catch_warnings():
            # Noise that says nothing about the bench: 4 workers on a 2-core CI box, a short epoch, and
            # Lightning 2.6's own pytree deprecation.
            for pattern in (".*does not have many workers.*", ".*Tensor Cores.*", ".*worker processes in total.*",
                            ".*smaller than the logging interval.*", ".*LeafSpec.*"):  # fmt: skip
                warnings.filterwarnings("ignore", pattern)
            trainer = L.Trainer(
                max_epochs=max_epochs,
                callbacks=[
                    *callbacks,
                    timer,
                    _Progress(label or f"{recipe_name} seed={seed}", task.metric, max_epochs, echo),
                ],
                logger=CSVLogger(str(run_dir), name="", version=""),
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                **kwargs,
            )
            trainer.fit(module, datamodule=dm)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # a failed run is a row in the report, with its reason
        error = f"{type(err).__name__}: {err}"
        (run_dir / "error.txt").write_text(traceback.format_exc())
        echo(f"  {label or recipe_name}: FAILED ({error}); traceback in {run_dir / 'error.txt'}")
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    s = timer.summary()
    return RunResult(task=task.name, recipe=recipe_name, seed=seed, error=error, **s)


_RESUME_KEYS = ("task", "target", "max_epochs", "train_subset", "val_subset", "model_kwargs")


def _check_resumable(out_dir: Path, meta: dict[str, Any]) -> None:
    saved_path = out_dir / "bench.json"
    if not saved_path.exists():
        return
    saved = json.loads(saved_path.read_text())
    diff = [k for k in _RESUME_KEYS if saved.get(k) != meta.get(k)]
    if diff:
        changes = ", ".join(f"{k}: {saved.get(k)!r} there, {meta.get(k)!r} now" for k in diff)
        raise ValueError(
            f"--resume: {out_dir} holds a bench with different settings ({changes}). "
            "Use the same arguments, or another --out."
        )


def run_bench(
    cfg: BenchConfig,
    out_dir: Path,
    echo: Callable[[str], None] = print,
    resume: bool = False,
    time_budget_s: float | None = None,
) -> tuple[list[RunResult], dict[str, Any], bool]:
    """Every recipe x seed, interleaved by seed so that drifts of a shared machine hit all recipes alike.

    Each finished run is saved at once as ``runs/RECIPE-seedN.json``. With ``resume`` those runs are
    loaded instead of rerun. With ``time_budget_s`` no new run starts once that much time has passed.
    Returns the results, the metadata, and whether every planned run is done.
    """
    task, recipes, target, max_epochs = cfg.resolve()
    env = environment()
    plan = [(seed, name) for seed in range(cfg.first_seed, cfg.first_seed + cfg.seeds) for name in recipes]
    meta = _meta(cfg, task, recipes, target, max_epochs, env)
    if resume:
        _check_resumable(out_dir, meta)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.json").write_text(json.dumps({k: meta[k] for k in _RESUME_KEYS}, indent=2) + "\n")
    echo(
        f"bench {task.name}: {len(recipes)} recipe(s) x {cfg.seeds} seed(s) = {len(plan)} runs, target "
        f"{task.metric} {'>=' if task.mode == 'max' else '<='} {target}, at most {max_epochs} epochs, on "
        f"{env['gpu'] or 'CPU'}"
    )
    results = []
    t_start = time.perf_counter()
    for i, (seed, name) in enumerate(plan, 1):
        label = f"[{i}/{len(plan)}] {name} seed={seed}"
        saved = out_dir / "runs" / f"{name}-seed{seed}.json"
        if resume and saved.exists():
            results.append(RunResult(**json.loads(saved.read_text())))
            echo(f"{label}: done earlier, loaded from {saved}")
            continue
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
            echo(
                f"time budget of {time_budget_s:.0f}s used: {len(plan) - i + 1} run(s) left; rerun with --resume"
            )
            _environment_of_runs(meta, results)
            return results, meta, False
        echo(label)
        run_dir = out_dir / "runs" / f"{name}-seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        res = dataclasses.replace(run_one(cfg, name, seed, run_dir, echo=echo, label=label), environment=env)
        saved.write_text(json.dumps(res.to_dict(), indent=2) + "\n")
        shown = f"{res.time_to_target_s:.1f}s" if res.reached else "not reached"
        echo(
            f"  -> {shown} (best {task.metric} {res.best_metric}, {res.epochs} epochs, {res.total_s:.1f}s total)"
        )
        results.append(res)
    _environment_of_runs(meta, results)
    return results, meta, True


def _machine(env: dict[str, Any]) -> tuple[Any, ...]:
    return (env.get("gpu"), env.get("driver"), env.get("torch"), env.get("lightning"))


def _environment_of_runs(meta: dict[str, Any], results: list[RunResult]) -> None:
    """Describe the machine(s) the runs ran on, not the one that wrote the report (a resumed bench may
    only load runs). Several machines are listed under ``environments`` and flagged in the report."""
    envs = [r.environment for r in results if r.environment]
    if not envs:
        return
    distinct = list({_machine(e): e for e in envs}.values())
    meta["environment"] = envs[0]
    if len(distinct) > 1:
        meta["environments"] = distinct


def _meta(
    cfg: BenchConfig, task: Task, recipes: list[str], target: float, max_epochs: int, env: dict[str, Any]
) -> dict[str, Any]:
    return {
        "task": task.name,
        "task_description": task.description,
        "metric": task.metric,
        "mode": task.mode,
        "target": target,
        "max_epochs": max_epochs,
        "seeds": list(range(cfg.first_seed, cfg.first_seed + cfg.seeds)),
        "recipes": {n: get_recipe(n).for_task(task.name).summary() for n in recipes},
        "train_subset": cfg.train_subset,
        "val_subset": cfg.val_subset,
        "model_kwargs": cfg.model_kwargs,
        "environment": env,
    }
