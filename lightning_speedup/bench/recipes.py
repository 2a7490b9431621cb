"""Recipes: declarative descriptions of how to train a task, so techniques are added by editing data.

A :class:`Recipe` names the Trainer arguments (precision, strategy, extra kwargs), the optimizer and
its learning rate, the callbacks, the data pipeline and model switches (``channels_last``,
``compile``). ``per_task`` overrides any field for one task. The package holds ``baseline``, ``speedup-levers``,
``speedup`` and the candidates the cold bench compares for ``speedup``; ablations and candidates that
lost live in ``benchmarks/recipes.py`` (see :func:`load_recipe_files`).

Callbacks are listed as factories ``(RunContext) -> Callback`` so each run gets fresh instances.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch import Callback

    from lightning_speedup.bench.tasks import RunContext

CallbackFactory = Callable[["RunContext"], "Callback"]
COMPILE_CHOICES = (False, True, "full", "regional", "auto")
CUDA_GRAPHS_CHOICES = (None, "inductor", "eager")


@dataclass(frozen=True)
class Recipe:
    """How to train. ``None`` fields take the task's default (DESIGN.md's baseline)."""

    name: str
    description: str
    precision: str = "32-true"
    batch_size: int | None = None
    optimizer: str | None = None
    lr: float | None = None
    weight_decay: float | None = None
    # False; True or "full" (the model's forward); "regional" (repeated blocks, lightning_speedup.Compile);
    # "auto" (regional, only when the measured eager step time says it repays its cost in the run's steps).
    compile: bool | str = False
    # torch.compile's mode: None (default), "reduce-overhead" (CUDA graphs), ...
    compile_mode: str | None = None
    compile_cache: bool = True  # regional/auto: keep compiled artifacts across processes
    # None; "inductor" (compile with mode="reduce-overhead"); "eager" (make_graphed_callables, no Inductor)
    cuda_graphs: str | None = None
    fused_optimizer: bool = False  # torch's fused Adam/AdamW/SGD kernel on CUDA (one launch per step)
    channels_last: bool = False
    data: str = "baseline"
    num_workers: int = 4
    drop_last: bool = False
    max_epochs: int | None = None  # the recipe's own epoch budget (a schedule's length); None: the task's
    callbacks: tuple[CallbackFactory, ...] = ()
    strategy: str | None = None
    trainer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    per_task: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(
                f"Recipe {self.name!r}: compile={self.compile!r}; choose one of {list(COMPILE_CHOICES)}."
            )
        if self.cuda_graphs not in CUDA_GRAPHS_CHOICES:
            raise ValueError(
                f"Recipe {self.name!r}: cuda_graphs={self.cuda_graphs!r}; choose one of {list(CUDA_GRAPHS_CHOICES)}."
            )
        if self.cuda_graphs == "inductor" and self.compile not in (True, "full"):
            raise ValueError(
                f"Recipe {self.name!r}: cuda_graphs='inductor' captures the compiled model; set compile='full' "
                "or use cuda_graphs='eager' without compile."
            )
        if self.cuda_graphs == "eager" and self.compile:
            raise ValueError(
                f"Recipe {self.name!r}: cuda_graphs='eager' graphs the uncompiled model; set compile=False."
            )

    def for_task(self, task: str) -> Recipe:
        """This recipe with the overrides for ``task`` applied."""
        overrides = dict(self.per_task.get(task, {}))
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(
                f"Recipe {self.name!r} overrides unknown fields {sorted(unknown)} for task {task!r}."
            )
        return dataclasses.replace(self, per_task={}, **overrides) if overrides else self

    def extended(self, name: str | None = None, description: str | None = None, **changes: Any) -> Recipe:
        """A copy with ``changes``; ``callbacks=`` replaces, ``extra_callbacks=`` appends."""
        extra = tuple(changes.pop("extra_callbacks", ()))
        if extra:
            changes["callbacks"] = tuple(changes.get("callbacks", self.callbacks)) + extra
        return dataclasses.replace(
            self, name=name or self.name, description=description or self.description, **changes
        )

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly description for reports."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = _jsonable(value)
        return out


def _jsonable(value: Any) -> Any:
    """Callback factories by name, mappings and sequences recursively (``per_task`` holds factories too)."""
    if callable(value):
        return getattr(value, "__name__", type(value).__name__)
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe, replace: bool = False) -> Recipe:
    """Add ``recipe`` to the registry; ``replace=True`` lets a feature extend an existing recipe."""
    if recipe.name in _RECIPES and not replace:
        raise ValueError(f"A recipe named {recipe.name!r} exists; pass replace=True to redefine it.")
    _RECIPES[recipe.name] = recipe
    return recipe


RECIPES_ENV = "LIGHTNING_SPEEDUP_RECIPES"
_loaded_files: set[str] = set()


def load_recipe_files() -> None:
    """Register the recipes of the benchmark files: ``./benchmarks/recipes.py`` when run from the repository,
    and every path in ``$LIGHTNING_SPEEDUP_RECIPES`` (separated by ``os.pathsep``). Each file is run once."""
    paths = [Path("benchmarks/recipes.py")]
    paths += [Path(p) for p in os.environ.get(RECIPES_ENV, "").split(os.pathsep) if p]
    for path in paths:
        resolved = str(path.resolve())
        if resolved in _loaded_files or not path.is_file():
            if not path.is_file() and path != paths[0]:
                raise ValueError(f"${RECIPES_ENV} names {str(path)!r}, which is not a file.")
            continue
        _loaded_files.add(resolved)
        spec = importlib.util.spec_from_file_location(f"_ls_recipes_{len(_loaded_files)}", path)
        assert spec is not None and spec.loader is not None
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def available_recipes() -> list[str]:
    load_recipe_files()
    return sorted(_RECIPES)


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name`` (benchmark recipes included, see :func:`load_recipe_files`); an
    unknown name lists the known ones and the closest match."""
    if name not in _RECIPES:
        load_recipe_files()
    if name not in _RECIPES and ":" in name:
        # An ablation step ("<task>:baseline+bf16"), registered on demand so a fresh process finds it too.
        from lightning_speedup.bench.ablation import ablation_recipes

        task = name.split(":", 1)[0]
        with contextlib.suppress(ValueError):  # not a task's ablation: the error below lists what exists
            ablation_recipes(task)
    try:
        return _RECIPES[name]
    except KeyError:
        close = difflib.get_close_matches(name, _RECIPES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown recipe {name!r}.{hint} Available recipes: {', '.join(available_recipes())}. "
            "List them with `lightning-speedup list`."
        ) from None


BASELINE = register_recipe(
    Recipe(
        name="baseline",
        description=(
            "Vanilla Lightning as a typical user writes it: fp32, per-sample CPU augmentation in the "
            "Dataset, DataLoader(batch_size=128, shuffle=True, num_workers=4), Adam 1e-3 constant "
            "(AdamW 1e-3 for the LM), no compile, validation every epoch."
        ),
    )
)

# What Lightning and PyTorch themselves offer, before any lightning_speedup technique.
LEVERS = register_recipe(
    Recipe(
        name="speedup-levers",
        description=(
            "Lightning's own levers: bf16-mixed autocast, channels_last, torch.compile (CUDA only; the last "
            "partial training batch dropped so it compiles once), cudnn.benchmark, batch 512 with the LR "
            "scaled by sqrt(4) = 2x (the LM keeps batch 128)."
        ),
        precision="bf16-mixed",
        batch_size=512,
        lr=2e-3,
        compile=True,
        drop_last=True,
        channels_last=True,
        trainer_kwargs={"benchmark": True},
        per_task={"char-lm": {"batch_size": 128, "lr": 1e-3, "channels_last": False}},
    )
)


# --- speedup and the candidates measured cold against it.


def schedule(name: str, **kwargs: float) -> CallbackFactory:
    """A factory of ``lightning_speedup.schedules.<name>(**kwargs)``, named in reports as the call reads."""

    def make(ctx: RunContext) -> Callback:
        from lightning_speedup import schedules

        return getattr(schedules, name)(**kwargs)

    make.__name__ = f"{name}({', '.join(f'{k}={v:g}' for k, v in kwargs.items())})"
    make.schedule_spec = (name, dict(kwargs))  # type: ignore[attr-defined]  # read by schedule_spec()
    return make


def schedule_spec(factory: CallbackFactory) -> tuple[str, dict[str, float]] | None:
    """The schedule class name and keyword arguments of a factory made by :func:`schedule`, else None."""
    spec = getattr(factory, "schedule_spec", None)
    return None if spec is None else (spec[0], dict(spec[1]))


def one_cycle(max_lr: float) -> CallbackFactory:
    return schedule("OneCycle", max_lr=max_lr)


def wsd(peak_lr: float) -> CallbackFactory:
    return schedule("WarmupStableDecay", peak_lr=peak_lr, warmup=0.05, decay=0.3)


def async_metrics(ctx: RunContext) -> Callback:
    from lightning_speedup.metrics import AsyncProgressBarMetrics

    return AsyncProgressBarMetrics()


async_metrics.__name__ = "AsyncProgressBarMetrics()"


def attention_without_cudnn(ctx: RunContext) -> Callback:
    """``SDPABackends()``: attention on flash, efficient or math, not cuDNN's kernel (whose plans each fresh
    process builds on its first calls)."""
    from lightning_speedup.compile import SDPABackends

    return SDPABackends()


attention_without_cudnn.__name__ = "SDPABackends()"

_LM_SPEEDUP = {
    **LEVERS.per_task["char-lm"],
    "data": "baseline",
    "callbacks": (wsd(1e-3),),
    "max_epochs": 40,
    "compile_mode": None,
    "fused_optimizer": False,
    "cuda_graphs": None,
}

# Lightning's levers plus the techniques that won on the device: device-resident data with GPUAugment and
# OneCycle for images, warmup-stable-decay for the LM; for images the compiled step replayed as CUDA graphs
# with the fused Adam kernel, because the small model's step is host-bound.
SPEEDUP = register_recipe(
    LEVERS.extended(
        name="speedup-compiled",
        description=(
            "speedup-levers + lightning_speedup: the data set resident in GPU memory with GPUAugment, OneCycle "
            "(max_lr 4e-3, 10 epochs), torch.compile(mode='reduce-overhead') and the fused Adam kernel for "
            "images; for the LM (baseline data pipeline) WarmupStableDecay (peak 1e-3, 5% warm-up, 1-sqrt "
            "decay over the last 30%, 40 epochs)."
        ),
        data="resident",
        callbacks=(one_cycle(4e-3),),
        max_epochs=10,
        compile_mode="reduce-overhead",
        cuda_graphs="inductor",
        fused_optimizer=True,
        per_task={"char-lm": _LM_SPEEDUP},
    )
)

# `speedup` is chosen by cold time to target (a fresh process, empty compile caches, as a user's first run):
# without torch.compile, whose cold compilation cost more than it saved on both tasks; with the training
# forward/backward replayed as CUDA graphs captured without Inductor (EagerCUDAGraphs) and the fused Adam(W)
# kernel, which won cold on both tasks; for images without cuDNN's benchmark mode, whose autotuning took
# 4-7 s of each cold run. `speedup-autotune` is the recipe before the last two of these comparisons; the
# other candidates derive from it, unchanged, so that their results stay reproducible under their names.
_EAGER_LM = {**_LM_SPEEDUP, "compile": False, "callbacks": (wsd(1e-3), async_metrics)}
SPEEDUP_AUTOTUNE = register_recipe(
    SPEEDUP.extended(
        name="speedup-autotune",
        description=(
            "speedup with cuDNN's benchmark mode (Trainer(benchmark=True): each convolution's algorithm "
            "autotuned on its first call) and, for the LM, an eager training step. `speedup` until 2026-12-04."
        ),
        compile=False,
        compile_mode=None,
        cuda_graphs="eager",
        extra_callbacks=(async_metrics,),
        per_task={"char-lm": _EAGER_LM},
    )
)
register_recipe(
    SPEEDUP_AUTOTUNE.extended(
        name="speedup",
        description=(
            "speedup-levers + lightning_speedup without torch.compile, chosen by cold time to target: the "
            "training step's forward/backward as CUDA graphs without Inductor (EagerCUDAGraphs) with the fused "
            "Adam(W) kernel; for images the data set resident in GPU memory with GPUAugment, OneCycle (max_lr "
            "4e-3, 10 epochs) and no cuDNN benchmark mode; for the LM WarmupStableDecay (peak 1e-3, 40 "
            "epochs) and attention off cuDNN's kernel (SDPABackends()); AsyncProgressBarMetrics."
        ),
        trainer_kwargs={},
        # The LM's runs were measured with cudnn.benchmark on, which picks convolution algorithms (the GPT has none).
        # Its attention off cuDNN's kernel won cold on 2026-12-05 (`speedup-lm-flash` in that day's files).
        per_task={
            "char-lm": {
                **_EAGER_LM,
                "callbacks": (*_EAGER_LM["callbacks"], attention_without_cudnn),
                "cuda_graphs": "eager",
                "fused_optimizer": True,
                "trainer_kwargs": {"benchmark": True},
            }
        },
    )
)
register_recipe(
    SPEEDUP_AUTOTUNE.extended(
        name="speedup-eager-step",
        description="speedup-autotune without EagerCUDAGraphs: the training step runs eagerly (the LM's is the same).",
        cuda_graphs=None,
        per_task={"char-lm": _EAGER_LM},
    )
)
register_recipe(
    SPEEDUP_AUTOTUNE.extended(
        name="speedup-regional",
        description=(
            "speedup-autotune with regional compilation (each repeated block compiled once, lightning_speedup."
            "Compile) and the cross-process compiled-artifact cache, instead of CUDA graphs."
        ),
        compile="regional",
        cuda_graphs=None,
        per_task={"char-lm": {**_EAGER_LM, "compile": "regional"}},
    )
)
register_recipe(
    SPEEDUP_AUTOTUNE.extended(
        name="speedup-auto",
        description=(
            "speedup-autotune with compile='auto' instead of CUDA graphs: regional compilation only when the measured "
            "eager step time and the steps left say it repays its cost; the artifact cache on."
        ),
        compile="auto",
        cuda_graphs=None,
        per_task={"char-lm": {**_EAGER_LM, "compile": "auto"}},
    )
)
