"""Ablations: the recipes between ``baseline`` and ``speedup`` one technique at a time, in both directions.

:func:`ablation_recipes` diffs the two recipes for one task, groups the fields that only make sense
together (a batch size and its learning rate; a schedule callback and its epoch budget; CUDA graphs and the
compile mode they need), splits the callbacks by the technique each factory is (a schedule, the asynchronous
progress-bar metrics, or one named after any other factory), and registers ``baseline+<technique>``
cumulatively (each adds one technique to the previous) and ``speedup-<technique>`` (speedup without one
technique, and without the techniques that need it: no compile without the dropped last batch).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from lightning_speedup.bench.recipes import (
    CallbackFactory,
    Recipe,
    async_metrics,
    attention_without_cudnn,
    get_recipe,
    register_recipe,
    schedule_spec,
)

# Technique name -> the Recipe fields it sets, in the order the forward ladder adds them. ``callbacks`` is
# no technique's field: each callback factory belongs to the technique :func:`callback_technique` names
# ("schedule", "async-metrics", or one after the factory, added to the ladder after these).
TECHNIQUES: dict[str, tuple[str, ...]] = {
    "bf16": ("precision",),
    "batch": ("batch_size", "lr", "optimizer", "weight_decay"),
    "channels-last": ("channels_last",),
    "cudnn-benchmark": ("trainer_kwargs",),
    "data": ("data", "num_workers"),
    "schedule": ("max_epochs",),
    "async-metrics": (),
    "drop-last": ("drop_last",),
    "compile": ("compile", "compile_cache"),
    "cuda-graphs": ("cuda_graphs", "compile_mode"),
    "fused-optimizer": ("fused_optimizer",),
    "strategy": ("strategy",),
}
# A technique that needs another: removing the second removes the first too. CUDA graphs capture the compile;
# compile drops the last partial batch so that it compiles one shape.
_NEEDS = {"cuda-graphs": "compile", "compile": "drop-last"}


@functools.cache
def _schedule_classes() -> tuple[str, ...]:
    from lightning.pytorch import Callback

    from lightning_speedup import schedules

    return tuple(
        name for name, obj in vars(schedules).items() if isinstance(obj, type) and issubclass(obj, Callback)
    )


def callback_technique(factory: CallbackFactory) -> str:
    """The technique a callback factory of a recipe is: ``"schedule"`` for a schedule (a ``schedule(...)``
    factory, or one named after a schedule callback of ``lightning_speedup.schedules``), ``"async-metrics"``
    for ``async_metrics``, ``"attention-no-cudnn"`` for ``attention_without_cudnn``, else the factory's name in
    lower case without its arguments."""
    name = getattr(factory, "__name__", type(factory).__name__)
    if schedule_spec(factory) is not None or name.startswith(_schedule_classes()):
        return "schedule"
    if factory is async_metrics:
        return "async-metrics"
    if factory is attention_without_cudnn:
        return "attention-no-cudnn"
    technique = name.split("(", 1)[0].lower()
    if technique in TECHNIQUES:
        raise ValueError(
            f"ablation: the callback factory {name!r} would be the technique {technique!r}, a technique of "
            f"Recipe fields; rename the factory (its __name__) so the ablation can tell the two apart."
        )
    return technique


def _callbacks_of(recipe: Recipe, technique: str) -> tuple[CallbackFactory, ...]:
    return tuple(f for f in recipe.callbacks if callback_technique(f) == technique)


def _part(recipe: Recipe, technique: str) -> tuple[Any, ...]:
    """What of ``recipe`` the technique sets: its fields' values, then its callback factories."""
    fields = TECHNIQUES.get(technique, ())
    return (*(getattr(recipe, f) for f in fields), _callbacks_of(recipe, technique))


def _differing(a: Recipe, b: Recipe) -> list[str]:
    """The techniques whose settings differ between ``a`` and ``b``, in the ladder's order."""
    covered = {f for fields in TECHNIQUES.values() for f in fields}
    extra = [
        f.name
        for f in dataclasses.fields(Recipe)
        if f.name not in covered | {"name", "description", "per_task", "callbacks"}
        and getattr(a, f.name) != getattr(b, f.name)
    ]
    if extra:
        raise ValueError(
            f"ablation: fields {extra} differ but belong to no technique; add them to TECHNIQUES."
        )
    named_after_factories = [callback_technique(f) for f in (*b.callbacks, *a.callbacks)]
    candidates = [*TECHNIQUES, *dict.fromkeys(t for t in named_after_factories if t not in TECHNIQUES)]
    return [t for t in candidates if _part(a, t) != _part(b, t)]


def _resolved(recipe: Recipe, defaults: dict[str, Any]) -> Recipe:
    return dataclasses.replace(
        recipe, **{k: v for k, v in defaults.items() if hasattr(recipe, k) and getattr(recipe, k) is None}
    )


def _with(
    recipe: Recipe,
    source: Recipe,
    techniques: list[str],
    order: tuple[CallbackFactory, ...],
    name: str,
    description: str,
) -> Recipe:
    """``recipe`` with ``source``'s settings of ``techniques``: their fields, and their callbacks in place of
    ``recipe``'s, ordered as in ``order`` (the end recipe's callbacks; others after them, as they came)."""
    changes: dict[str, Any] = {f: getattr(source, f) for t in techniques for f in TECHNIQUES.get(t, ())}
    kept = [f for f in recipe.callbacks if callback_technique(f) not in techniques]
    added = [f for f in source.callbacks if callback_technique(f) in techniques]
    merged = kept + added
    rank = {id(f): i for i, f in enumerate(order)}
    changes["callbacks"] = tuple(sorted(merged, key=lambda f: (rank.get(id(f), len(order)), merged.index(f))))
    return dataclasses.replace(recipe, name=name, description=description, per_task={}, **changes)


def _removed_with(technique: str, techniques: list[str]) -> list[str]:
    """``technique`` and every technique of ``techniques`` that needs it, directly or through another."""
    removed = [technique]
    for t in techniques:
        need = _NEEDS.get(t)
        while need is not None and need != technique:
            need = _NEEDS.get(need)
        if need == technique:
            removed.append(t)
    return removed


def ablation_recipes(task: str, start: str = "baseline", end: str = "speedup") -> list[str]:
    """Register and return, in order: ``start``, ``start`` plus one technique at a time up to ``end``'s
    settings, ``end``, then ``end`` minus each technique. Names carry the task: ``<task>:baseline+bf16``."""
    from lightning_speedup.bench.tasks import get_task

    defaults = get_task(task).defaults  # a field left None and one set to the task's default are the same
    a, b = (_resolved(get_recipe(n).for_task(task), defaults) for n in (start, end))
    techniques = _differing(a, b)
    names = [start]
    current = a
    for i, t in enumerate(techniques):
        if i == len(techniques) - 1:
            break  # the last step is `end` itself
        name = f"{task}:{start}+{'+'.join(techniques[: i + 1])}"
        current = _with(
            current, b, [t], b.callbacks, name,
            f"{start} with {', '.join(techniques[: i + 1])} of {end} ({task}).",
        )  # fmt: skip
        names.append(register_recipe(current, replace=True).name)
    names.append(end)
    for t in techniques:
        removed = _removed_with(t, techniques)
        name = f"{task}:{end}-{'-'.join(removed)}"
        recipe = _with(b, a, removed, b.callbacks, name, f"{end} without {', '.join(removed)} ({task}).")
        names.append(register_recipe(recipe, replace=True).name)
    return names
