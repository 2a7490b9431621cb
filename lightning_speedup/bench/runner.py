"""Runs recipes x seeds as separate fits, interleaved (A B A B ...), and collects the results.

Every run is a fresh process (``python -m lightning_speedup.bench.worker``) with compile caches of its
own (Inductor, Triton, CUDA's kernel cache, the project's compiled artifacts), as a user's first run on
a new machine: ``cache="cold"`` gives each run empty caches; ``"warm"`` first fills one recipe's caches
with a throw-away run, then measures runs that reuse them; ``"both"`` runs, per seed, a cold run and
then a warm run that reuses the cold run's caches, so the report can set them side by side.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
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
from lightning_speedup.bench.recipes import Recipe, get_recipe
from lightning_speedup.bench.tasks import RunContext, Task, get_task
from lightning_speedup.bench.timing import TimeToTarget

log = logging.getLogger(__name__)

CACHE_MODES = ("cold", "warm", "both")


def _check_accelerator(name: str) -> None:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    # "gpu" is Lightning's alias (CUDA or MPS, whichever the machine has); the registry lists only real names.
    allowed = ["auto", "gpu", *AcceleratorRegistry.available_accelerators()]
    if name not in allowed:
        raise ValueError(f"--accelerator must be one of {sorted(allowed)}, got {name!r}.")


def _check_accelerator_available(name: str) -> None:
    """A named accelerator that this machine lacks fails here, before any run, not inside every run."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    if name == "auto":
        return
    names = ["cuda", "mps"] if name == "gpu" else [name]  # Lightning's "gpu": CUDA or MPS
    if not any(
        AcceleratorRegistry[n]["accelerator"].is_available() for n in names if n in AcceleratorRegistry
    ):
        what = "CUDA or MPS GPU" if name == "gpu" else f"{name} device"
        raise ValueError(
            f"--accelerator {name}: this machine has no {what} that torch can use "
            f"(torch.cuda.is_available() is {torch.cuda.is_available()}). Run the bench on a machine with one, "
            "or pass --accelerator cpu (or leave --accelerator out: auto picks what the machine has)."
        )


# Tasks whose data module rounds a training subset up to whole batches (the char-LM samples random windows):
# drop_last can never leave them without a batch.
_WHOLE_BATCH_TASKS = ("char-lm",)


def cache_environment(cache_dir: Path) -> dict[str, str]:
    """Environment variables that point every on-disk compile cache of a run into ``cache_dir``.

    Inductor keeps its FX-graph, AOT-autograd and autotuning caches under ``TORCHINDUCTOR_CACHE_DIR``;
    Triton its kernels under ``TRITON_CACHE_DIR``; the CUDA driver its JIT-compiled PTX under
    ``CUDA_CACHE_PATH``; ``LIGHTNING_SPEEDUP_COMPILE_CACHE`` is where the project's compiled-artifact
    cache keeps its files.
    """
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
        "TRITON_CACHE_DIR": str(cache_dir / "triton"),
        "CUDA_CACHE_PATH": str(cache_dir / "cuda"),
        "LIGHTNING_SPEEDUP_COMPILE_CACHE": str(cache_dir / "artifacts"),
        # Local caches on (their defaults), remote ones off: the run sees exactly this folder.
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
        "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE": "0",
        "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE": "0",
    }


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``: a reader (or an
    interrupted bench) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    """``json.loads`` of a file, with an error that names the file."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); it was cut short or edited. Delete it (a run file is then "
            "rerun by --resume) or choose another --out."
        ) from err


class BenchLocked(ValueError):
    """Another bench holds the output folder."""


class OutLock:
    """An exclusive ``fcntl.flock`` on ``OUT/.lock`` for the life of one bench: two benches on one folder
    would run every run twice and skew each other's timings. The file holds the holder's pid."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> OutLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BenchLocked(
                f"{self.path.parent} is in use by another bench (pid {holder}). Wait for it to finish, "
                "stop it, or choose another --out."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


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
    cache: str = "cold"
    # Every recipe's precision replaced by this one (the demo runs fp32 on a CPU, where bf16 autocast is slow).
    precision: str | None = None

    def recipe(self, name: str, task: str) -> Recipe:
        """Recipe ``name`` for ``task`` as this bench runs it (with the precision override, if any)."""
        recipe = get_recipe(name).for_task(task)
        return dataclasses.replace(recipe, precision=self.precision) if self.precision else recipe

    def epochs_of(self, recipe: Recipe, task: Task) -> int:
        """A recipe's epoch budget: an explicit --max-epochs applies to every recipe; otherwise the recipe's
        own (a schedule's length), else the task's."""
        return self.max_epochs or recipe.max_epochs or task.default_max_epochs

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
        for key, value in self.model_kwargs.items():
            # Sizes and counts (width, n_layer, block_size, ...) are the model's only integer arguments; a bool
            # (log_train_loss=False) is a switch.
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ValueError(f"--model-arg {key}={value}: sizes and counts must be >= 1 (e.g. {key}=16).")
        if self.data_path is not None and not Path(self.data_path).exists():
            # An explicit path is what the user meant: never fall back to another copy of the data.
            from lightning_speedup.bench.datasets import DataError

            needs = (
                "char-lm needs a UTF-8 text file"
                if task.name == "char-lm"
                else "fashion-mnist needs its folder"
            )
            raise DataError(
                f"{needs}, and --data {self.data_path} does not exist. Pass the folder (fashion-mnist) or text "
                "file (char-lm) that holds the data, or leave --data out to let the bench search the usual places."
            )
        task.locate_data(self.data_path)  # missing data fails here, with the places tried and the fixes
        target = task.default_target if self.target is None else self.target
        task.check_target(target)
        if self.seeds < 1:
            raise ValueError(f"--seeds must be >= 1, got {self.seeds}.")
        if self.first_seed < 0:
            raise ValueError(f"--first-seed must be >= 0, got {self.first_seed}.")
        if self.cache not in CACHE_MODES:
            raise ValueError(f"--cache must be one of {list(CACHE_MODES)}, got {self.cache!r}.")
        for flag, value in (("--train-subset", self.train_subset), ("--val-subset", self.val_subset)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1 (or left out for the whole split), got {value}.")
        if self.max_epochs is not None and self.max_epochs < 1:
            raise ValueError(
                f"--max-epochs must be >= 1 (or left out for the task's budget), got {self.max_epochs}."
            )
        _check_accelerator(self.accelerator)
        _check_accelerator_available(self.accelerator)
        if self.train_subset is not None and task.name not in _WHOLE_BATCH_TASKS:
            for name in self.recipes:
                recipe = self.recipe(name, task.name)
                batch = task.setting(recipe, "batch_size")
                if recipe.drop_last and self.train_subset < batch:
                    raise ValueError(
                        f"--train-subset {self.train_subset} is smaller than one batch of recipe {name!r} ({batch} "
                        "samples), which drops the last partial batch (drop_last): its runs would have nothing to "
                        f"train on. Pass --train-subset {batch} or more."
                    )
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
    # "cold": empty compile caches; "warm": caches filled by an earlier run of the same recipe.
    cache: str = "cold"
    # The cache variables the run's process saw (``os.environ`` inside the worker) and its pid.
    cache_env: dict[str, str] | None = None
    pid: int | None = None
    # Warm-up split: Dynamo + Inductor compile seconds (torch._dynamo.utils.compilation_time_metrics),
    # the sanity-check validation, and EagerCUDAGraphs' capture (Inductor's is inside its compile warm-up).
    compile_s: float | None = None
    sanity_s: float | None = None
    cudagraph_s: float | None = None
    # Mean GPU power over the run (nvidia-smi samples); None where no power is reported (a CPU).
    avg_power_w: float | None = None
    # The run's whole process as the bench saw it, from its start to its exit: interpreter, imports, CUDA
    # initialisation, data and model set-up, fit and teardown (time to target counts from the start of fit
    # only). None for runs made in the bench's own process, and in files from before it was recorded.
    process_s: float | None = None
    # Of that, the seconds from the process's launch to the start of fit (the same caveats).
    startup_s: float | None = None
    # Where the process's time before the clock went, in seconds (timestamps only; nothing is done differently):
    # imports_s (the interpreter's start and every import of the worker), power_sampler_s (its first nvidia-smi),
    # data_and_model_s (the task's data module, model and callbacks built), trainer_s (the Trainer built) and
    # fit_until_clock_s (from calling fit to the start of time to target: data set-up, device placement).
    startup_phases: dict[str, float] | None = None
    # The devices the run trained on (a strategy may take several): GPU-hours, cost and energy count each. None
    # in files from before it was recorded: one device.
    devices: int | None = None
    # The bench settings the run ran under (``_RESUME_KEYS``): --resume loads only runs whose settings are the
    # bench's. None in files from before they were recorded.
    settings: dict[str, Any] | None = None

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
    launched_at: float | None = None,
    phases: dict[str, float] | None = None,
) -> RunResult:
    """One fit of one recipe with one seed; failures are caught and reported, never hidden. ``launched_at``
    (``time.time()`` when the bench started this run's process) gives ``startup_s``; ``phases`` (the worker's
    own, before this call) gets this call's and becomes ``startup_phases``."""
    task, _, target, _ = cfg.resolve()
    recipe = cfg.recipe(recipe_name, task.name)
    max_epochs = cfg.epochs_of(recipe, task)
    L.seed_everything(seed, workers=True, verbose=False)
    ctx = RunContext(
        task=task, recipe=recipe, seed=seed, data_path=cfg.data_path, train_subset=cfg.train_subset,
        val_subset=cfg.val_subset, model_kwargs=dict(cfg.model_kwargs), accelerator=cfg.accelerator,
    )  # fmt: skip
    timer = TimeToTarget(task.metric, target, task.mode, stop_at_target=cfg.stop_at_target)
    error = None
    callbacks: list[Callback] | None = None
    startup_s = fit_called_at = devices = None
    phases = dict(phases or {})
    try:
        t0 = time.time()
        module, dm, callbacks, kwargs = build_trainer_parts(task, ctx)
        phases["data_and_model_s"] = time.time() - t0
        t0 = time.time()
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
                # Lightning's progress bar shows where a long epoch is, on a terminal; in logs and CI it
                # would only add noise, and the one-line-per-validation progress is there anyway.
                enable_progress_bar=sys.stderr.isatty(),
                enable_model_summary=False,
                **kwargs,
            )
            devices = trainer.num_devices * trainer.num_nodes
            fit_called_at = time.time()
            phases["trainer_s"] = fit_called_at - t0
            if launched_at is not None:
                startup_s = fit_called_at - launched_at
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
    if timer.clock_started_at is not None and fit_called_at is not None:
        phases["fit_until_clock_s"] = timer.clock_started_at - fit_called_at
    return RunResult(
        task=task.name, recipe=recipe_name, seed=seed, error=error, compile_s=_compile_seconds(),
        cudagraph_s=_capture_seconds(callbacks), startup_s=startup_s, startup_phases=phases or None,
        devices=devices, **s,
    )  # fmt: skip


_PHASE_NAMES = {
    "imports_s": "imports",
    "power_sampler_s": "power sampler",
    "data_and_model_s": "data and model",
    "trainer_s": "Trainer",
    "fit_until_clock_s": "fit until the clock",
}


def describe_process(res: RunResult) -> str:
    """One line on where a run's process went: before the clock (by phase), the fit, and what came after."""
    if res.process_s is None:
        return "process: not recorded"
    parts = [f"process {res.process_s:.1f} s"]
    phases = res.startup_phases or {}
    before = sum(phases.values())
    if phases:
        parts.append(f"before the clock {before:.1f} s (" + ", ".join(
            f"{_PHASE_NAMES.get(k, k)} {v:.1f}" for k, v in phases.items()
        ) + ")")  # fmt: skip
    parts.append(f"fit {res.total_s:.1f} s")
    parts.append(f"the rest {res.process_s - before - res.total_s:.1f} s")
    return ", ".join(parts)


def _capture_seconds(callbacks: Sequence[Callback] | None) -> float | None:
    """EagerCUDAGraphs' capture time; Inductor captures its graphs inside its own warm-up (not separated)."""
    from lightning_speedup.compile import EagerCUDAGraphs

    times = [
        cb.capture_s for cb in callbacks or () if isinstance(cb, EagerCUDAGraphs) and cb.capture_s is not None
    ]
    return sum(times) if times else None


def _compile_seconds() -> float:
    """Seconds this process spent in Dynamo frame compilation, backend (Inductor) compile included."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(compilation_time_metrics.get("_compile.compile_inner", [])))


# Settings that every run of one bench shares: bench.json records them, every run file too (``settings``), and
# --resume refuses a folder or a run whose settings differ from the command's.
_RESUME_KEYS = ("task", "target", "max_epochs", "train_subset", "val_subset", "model_kwargs", "cache",
                "data_sha256", "stop_at_target", "accelerator", "precision")  # fmt: skip
# Recorded since 2026-12-06: a bench.json or run file from before lacks them (unknown, accepted).
_LATER_RESUME_KEYS = frozenset({"data_sha256", "stop_at_target", "accelerator", "precision"})
_RESUME_NAMES = {"data_sha256": "data file (sha256)", "stop_at_target": "stop at target (--no-stop)",
                 "accelerator": "--accelerator", "precision": "precision override"}  # fmt: skip


def _settings(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: meta.get(k) for k in _RESUME_KEYS}


def _differences(saved: dict[str, Any], meta: dict[str, Any]) -> str:
    """The settings in which ``saved`` (bench.json, a run's ``settings``) differs from ``meta``, for people;
    empty when none does."""
    diff = []
    for k in _RESUME_KEYS:
        if k in _LATER_RESUME_KEYS and k not in saved:
            continue
        was, now = saved.get(k, "cold" if k == "cache" else None), meta.get(k)
        if was != now:
            if k == "data_sha256":
                was, now = f"{str(was)[:16]}...", f"{str(now)[:16]}..."
            diff.append(f"{_RESUME_NAMES.get(k, k)}: {was!r} there, {now!r} now")
    return ", ".join(diff)


def _check_resumable(out_dir: Path, meta: dict[str, Any], plan: list[tuple[int, str, str]]) -> None:
    """bench.json and every finished run that --resume would load must have this bench's settings: a run
    made under another target, budget or data would be reported as if it were this bench's."""
    saved_path = out_dir / "bench.json"
    if saved_path.exists():
        changes = _differences(read_json(saved_path), meta)
        if changes:
            raise ValueError(
                f"--resume: {out_dir} holds a bench with different settings ({changes}). "
                "Use the same arguments, or another --out."
            )
    for seed, name, cache in plan:
        path = out_dir / "runs" / f"{_run_file(out_dir, name, seed, cache, meta['cache'])}.json"
        if not path.exists():
            continue
        run = read_json(path)
        if run.get("error") is not None or run.get("settings") is None:
            continue  # a failed run is run again; a file from before settings were recorded: bench.json's
        changes = _differences(run["settings"], meta)
        if changes:
            raise ValueError(
                f"--resume: {path} was run with other settings than this bench ({changes}); resuming would "
                "report it as this bench's. Use the same arguments, or start afresh with --overwrite (it "
                "removes the earlier runs), or choose another --out."
            )


# What a bench writes into its --out folder; --overwrite removes these, and nothing else.
BENCH_OUTPUTS = ("runs", "caches", "bench.json", "report.json", "report.md", "report.png")


def remove_bench_outputs(out_dir: Path) -> list[str]:
    """Delete an earlier bench's own files and folders from ``out_dir`` (``BENCH_OUTPUTS``; files a user put
    there stay) and return the names removed."""
    removed = []
    for name in BENCH_OUTPUTS:
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        else:
            continue
        removed.append(name)
    return removed


def resume_hint(out_dir: Path) -> str:
    """How to finish a bench that stopped early: the folder to resume is named, not left to the default."""
    return f"rerun with --resume --out {shlex.quote(str(out_dir))} (and the same other arguments) to finish"


class _Terminated(Exception):
    """SIGTERM or SIGINT (Ctrl-C) arrived: the running child was stopped and nothing more starts."""


class _Children:
    """The running worker, so that SIGTERM to the bench reaches it too (a scheduler may signal only the
    main process); a SIGTERM to the whole group reaches the worker directly. Workers ignore SIGINT: a
    Ctrl-C reaches the bench alone, which stops the worker with SIGTERM (one message, no tracebacks)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.terminated = False
        self.signal_name: str | None = None  # the signal that stopped the bench

    def stop(self, signum: int) -> None:
        self.terminated = True
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def on_sigterm(self, signum: int, frame: object) -> None:
        self.stop(signum)


def _ignore_sigint() -> None:
    """In the worker's process before it starts: a Ctrl-C at the terminal goes to the whole process group; the
    bench handles it (a worker's KeyboardInterrupt would only print a second traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _echo_until_exit(proc: subprocess.Popen[str], echo: Callable[[str], None]) -> int:
    """Pass the worker's progress lines through ``echo``; its exit status once it has ended."""
    assert proc.stdout is not None
    for line in proc.stdout:
        echo(line.rstrip("\n"))
    return proc.wait()


def _drain(proc: subprocess.Popen[str], echo: Callable[[str], None]) -> int:
    """The worker's remaining output, then its exit status; a Ctrl-C meanwhile kills it at once."""
    while True:
        try:
            return _echo_until_exit(proc, echo)
        except KeyboardInterrupt:
            proc.kill()


def _run_in_process(
    cfg: BenchConfig,
    name: str,
    seed: int,
    run_dir: Path,
    cache_dir: Path,
    label: str,
    echo: Callable[[str], None],
    children: _Children,
) -> RunResult:
    """One run in a fresh Python process whose compile caches live in ``cache_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    spec = {"config": asdict(cfg), "recipe": name, "seed": seed, "run_dir": str(run_dir), "label": label,
            "launched_at": time.time()}  # fmt: skip
    spec_path, result_path = run_dir / "spec.json", run_dir / "result.json"
    result_path.unlink(missing_ok=True)
    write_atomic(spec_path, json.dumps(spec, indent=2) + "\n")
    env = {**os.environ, **cache_environment(cache_dir)}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_speedup.bench.worker", str(spec_path), str(result_path)],
        env=env, stdout=subprocess.PIPE, text=True, bufsize=1, preexec_fn=_ignore_sigint,
    )  # fmt: skip
    children.proc = proc
    try:
        try:
            rc = _echo_until_exit(proc, echo)
        except KeyboardInterrupt:
            children.stop(signal.SIGINT)
            _drain(proc, echo)
            raise _Terminated from None
    finally:
        children.proc = None
    process_s = time.perf_counter() - started
    if children.terminated or rc == -signal.SIGTERM:
        children.signal_name = children.signal_name or "SIGTERM"
        raise _Terminated
    if rc != 0 or not result_path.exists():
        error = f"the run's process exited with status {rc} before it wrote a result (see its output above)"
        echo(f"  {label}: FAILED ({error})")
        return RunResult(
            task=cfg.task, recipe=name, seed=seed, reached=False, time_to_target_s=None, epochs_to_target=None,
            steps_to_target=None, best_metric=None, final_metric=None, warmup_s=None, first_step_s=None,
            samples_per_s=None, peak_mem_mb=None, total_s=0.0, epochs=0, history=[], error=error,
            process_s=process_s,
        )  # fmt: skip
    return dataclasses.replace(RunResult(**read_json(result_path)), process_s=process_s)


def _plan(cfg: BenchConfig, recipes: list[str]) -> list[tuple[int, str, str]]:
    """(seed, recipe, cache) in the order they run: interleaved by seed, a cold run before the warm run
    that reuses its caches."""
    seeds = range(cfg.first_seed, cfg.first_seed + cfg.seeds)
    caches = {"cold": ["cold"], "warm": ["warm"], "both": ["cold", "warm"]}[cfg.cache]
    return [(seed, name, cache) for seed in seeds for name in recipes for cache in caches]


def _run_file(out_dir: Path, name: str, seed: int, cache: str, mode: str) -> str:
    # Cold runs keep the names of benches before the cache modes existed.
    return f"{name}-seed{seed}" if cache == "cold" else f"{name}-seed{seed}-warm"


def _cache_dir(caches: Path, name: str, seed: int, cache: str, mode: str) -> Path:
    if mode == "warm":  # one cache per recipe, filled by the throw-away run
        return caches / f"{name}-warm"
    return caches / f"{name}-seed{seed}"  # "both": the warm run reuses its own seed's cold cache


def _sha256(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def check_data(task: str, path: Path) -> dict[str, Any]:
    """Read the data once before the first run (a truncated or empty file fails here, not inside a run)
    and return its path and SHA-256 for the report."""
    from lightning_speedup.bench.datasets import DataError

    if task == "fashion-mnist":
        from lightning_speedup.bench.datasets import load_fashion_mnist

        try:
            load_fashion_mnist(path, download=False)
        except (DataError, ValueError, OSError, EOFError, RuntimeError) as err:
            raise ValueError(
                f"The Fashion-MNIST files in {path} cannot be read ({type(err).__name__}: {err}). Replace them "
                "with the official files (delete the folder and let the bench download them, or `sudo apt-get "
                "install dataset-fashion-mnist`), or pass another folder with --data."
            ) from err
        files = [f for f in path.iterdir() if f.is_file() and "idx" in f.name]
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{path} cannot be read as UTF-8 text ({err}); pass a UTF-8 text file with --data."
            ) from err
        if len(text) < 1000:
            raise ValueError(
                f"{path} holds {len(text)} characters; the char-LM needs a text of at least 1,000 characters "
                "(Tiny Shakespeare has 1.1M). Pass a longer UTF-8 text file with --data."
            )
        files = [path]
    return {"path": str(path.resolve()), "sha256": _sha256(files)}


def run_bench(
    cfg: BenchConfig,
    out_dir: Path,
    echo: Callable[[str], None] = print,
    resume: bool = False,
    time_budget_s: float | None = None,
    keep_caches: bool = False,
    overwrite: bool = False,
    hint: str | None = None,
) -> tuple[list[RunResult], dict[str, Any], bool]:
    """Every recipe x seed, interleaved by seed so that drifts of a shared machine hit all recipes alike,
    each in its own process with its own compile caches (see the module docstring).

    Each finished run is saved at once as ``runs/RECIPE-seedN.json`` (``-warm`` for warm runs). With
    ``resume`` those runs are loaded instead of rerun; failed ones are rerun. With ``time_budget_s`` no
    new run starts that would end after that many seconds, judged by the same recipe's longest run so far
    (a loaded run's ``process_s``, else its ``total_s``, counts; a recipe's first run is judged by the time passed
    alone). A SIGTERM or a Ctrl-C (SIGINT)
    stops the running run (it is not recorded) and starts nothing more; ``meta["stopped"]`` then says why and
    ``meta["resume_hint"]`` (``hint``, default: --resume with this folder) how to finish. ``overwrite`` first
    removes an earlier bench's outputs (``BENCH_OUTPUTS``) from ``out_dir``, once the folder is locked.
    Returns the results, the metadata, and whether every planned run is done.
    """
    task, recipes, target, max_epochs = cfg.resolve()
    if time_budget_s is not None and time_budget_s < 0:
        raise ValueError(f"--time-budget must be >= 0 seconds, got {time_budget_s}.")
    data = check_data(task.name, task.locate_data(cfg.data_path))
    env = environment()
    plan = _plan(cfg, recipes)
    meta = _meta(cfg, task, recipes, target, max_epochs, env)
    meta["data"] = data
    meta["data_sha256"] = data["sha256"]
    meta["resume_hint"] = hint or resume_hint(out_dir)
    if resume and overwrite:
        raise ValueError(
            "--resume keeps the finished runs of --out and --overwrite removes them: pass one of them."
        )
    if resume:
        _check_resumable(out_dir, meta, plan)
    with OutLock(out_dir):
        if overwrite:
            removed = remove_bench_outputs(out_dir)
            if removed:
                echo(f"--overwrite: removed the earlier bench's {', '.join(removed)} from {out_dir}")
        elif resume and not (out_dir / "bench.json").exists():
            echo(f"--resume: {out_dir} holds no earlier bench; starting it")
        return _run_plan(cfg, out_dir, plan, meta, env, echo, resume, time_budget_s, keep_caches)


def _run_plan(
    cfg: BenchConfig,
    out_dir: Path,
    plan: list[tuple[int, str, str]],
    meta: dict[str, Any],
    env: dict[str, Any],
    echo: Callable[[str], None],
    resume: bool,
    time_budget_s: float | None,
    keep_caches: bool,
) -> tuple[list[RunResult], dict[str, Any], bool]:
    task = get_task(cfg.task)
    settings = _settings(meta)
    write_atomic(out_dir / "bench.json", json.dumps(settings, indent=2) + "\n")
    recipes = list(meta["recipes"])
    hint = meta["resume_hint"]
    echo(
        f"bench {task.name}: {len(recipes)} recipe(s) x {cfg.seeds} seed(s), cache {cfg.cache} = {len(plan)} "
        f"runs, target {task.metric} {'>=' if task.mode == 'max' else '<='} {meta['target']}, at most "
        f"{describe_epoch_budgets(meta)}, on {env['gpu'] or 'CPU'}; each run in a fresh process"
        + (f"; precision {cfg.precision} for every recipe" if cfg.precision else "")
    )
    caches = out_dir / "caches"
    children = _Children()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, children.on_sigterm) if in_main else None
    results: list[RunResult] = []
    fills: dict[str, RunResult] = {}
    t_start = time.perf_counter()
    # Each recipe's longest run so far, in wall seconds: the estimate of its next run.
    longest: dict[str, float] = {}
    try:
        for i, (seed, name, cache) in enumerate(plan, 1):
            label = f"[{i}/{len(plan)}] {name} seed={seed}" + (" warm" if cache == "warm" else "")
            stem = _run_file(out_dir, name, seed, cache, cfg.cache)
            saved = out_dir / "runs" / f"{stem}.json"
            if resume and saved.exists():
                earlier = RunResult(**read_json(saved))
                if earlier.error is None:
                    results.append(earlier)
                    # its process's whole time where recorded; files from before that record its fit only
                    longest[name] = max(longest.get(name, 0.0), earlier.process_s or earlier.total_s or 0.0)
                    echo(f"{label}: done earlier, loaded from {saved}")
                    continue
                echo(f"{label}: failed earlier ({earlier.error}); running it again")
            if children.terminated:
                raise _Terminated
            elapsed, expected = time.perf_counter() - t_start, longest.get(name, 0.0)
            if time_budget_s is not None and elapsed + expected > time_budget_s:
                why = (
                    "used"
                    if elapsed > time_budget_s
                    else f"too short for {name} (its longest run: {expected:.0f}s)"
                )
                echo(f"time budget of {time_budget_s:.0f}s {why}: {len(plan) - i + 1} run(s) left; {hint}")
                meta["stopped"] = "time budget"
                return results, meta, False
            cache_dir = _cache_dir(caches, name, seed, cache, cfg.cache)
            t_run = time.perf_counter()
            # A warm run needs filled caches: "warm" fills a recipe's once per bench; "both" reuses the
            # cold run's, which a resumed bench may have loaded from disk after its caches were removed.
            if cache == "warm" and (
                (cfg.cache == "warm" and name not in fills)
                or (cfg.cache == "both" and not cache_dir.exists())
            ):
                shutil.rmtree(cache_dir, ignore_errors=True)
                echo(f"{label}: filling {name}'s compile caches with a throw-away run (not measured)")
                fill = _run_in_process(
                    cfg,
                    name,
                    seed,
                    out_dir / "runs" / f"{name}-fill",
                    cache_dir,
                    f"{label} fill",
                    echo,
                    children,
                )
                fills[name] = dataclasses.replace(fill, environment=env)
            elif cache == "cold":
                shutil.rmtree(cache_dir, ignore_errors=True)  # an interrupted earlier attempt's leftovers
            echo(label)
            res = _run_in_process(cfg, name, seed, out_dir / "runs" / stem, cache_dir, label, echo, children)
            res = dataclasses.replace(res, environment=env, cache=cache, settings=settings)
            longest[name] = max(longest.get(name, 0.0), time.perf_counter() - t_run)
            write_atomic(saved, json.dumps(res.to_dict(), indent=2) + "\n")
            shown = f"{res.time_to_target_s:.1f}s" if res.reached else "not reached"
            best = "-" if res.best_metric is None else f"{res.best_metric:.4g}"
            echo(f"  -> {shown} (best {task.metric} {best}, {res.epochs} epochs, {res.total_s:.1f}s total)")
            if res.process_s is not None:
                echo(f"     {describe_process(res)}")
            results.append(res)
            if cfg.cache != "warm" and (cache == "warm" or cfg.cache == "cold") and not keep_caches:
                shutil.rmtree(cache_dir, ignore_errors=True)
    except (_Terminated, KeyboardInterrupt):  # KeyboardInterrupt: a Ctrl-C while no worker ran
        stopped = children.signal_name or "SIGINT"
        echo(f"{stopped}: the running run was stopped and is not recorded; {hint}")
        meta["stopped"] = stopped
        return results, meta, False
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if fills:
            meta["warm_fills"] = {n: _fill_summary(r) for n, r in fills.items()}
        _environment_of_runs(meta, results)
        if not keep_caches:
            shutil.rmtree(caches, ignore_errors=True)
    return results, meta, True


def _fill_summary(r: RunResult) -> dict[str, Any]:
    """What the throw-away run that filled a recipe's caches cost (reported, never measured as a run)."""
    return {
        "seed": r.seed, "total_s": r.total_s, "warmup_s": r.warmup_s, "compile_s": r.compile_s,
        "time_to_target_s": r.time_to_target_s, "error": r.error,
    }  # fmt: skip


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
    # A resumed bench may be finished by a later checkout: every commit with its number of runs.
    meta["commits"] = dict(Counter(str(e.get("git_commit")) for e in envs))


def describe_epoch_budgets(meta: dict[str, Any]) -> str:
    """``"30 epochs"`` when every recipe has that budget, else each recipe's (``--max-epochs`` sets them all;
    otherwise a recipe's own budget, e.g. its schedule's length, else the task's)."""
    budgets = meta.get("epoch_budgets") or {}
    if len(set(budgets.values())) <= 1:
        return f"{next(iter(budgets.values()), meta['max_epochs'])} epochs"
    return "each recipe's own epoch budget (" + ", ".join(f"{n} {e}" for n, e in budgets.items()) + ")"


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
        "recipes": {n: cfg.recipe(n, task.name).summary() for n in recipes},
        "epoch_budgets": {n: cfg.epochs_of(cfg.recipe(n, task.name), task) for n in recipes},
        "train_subset": cfg.train_subset,
        "val_subset": cfg.val_subset,
        "model_kwargs": cfg.model_kwargs,
        "data_path": cfg.data_path,
        "cache": cfg.cache,
        "stop_at_target": cfg.stop_at_target,
        "accelerator": cfg.accelerator,
        "precision": cfg.precision,
        "environment": env,
    }
