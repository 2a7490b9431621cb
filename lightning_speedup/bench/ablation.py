"""Ablations: the recipes between ``baseline`` and ``speedup`` one technique at a time, in both directions.

:func:`ablation_recipes` diffs the two recipes for one task, groups the fields that only make sense
together (a batch size and its learning rate; a schedule and its epoch budget; compile and its dropped
last batch; CUDA graphs and the compile they capture), and registers ``baseline+<technique>`` cumulatively
(each adds one technique to the previous) and ``speedup-<technique>`` (speedup without one technique).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from lightning_speedup.bench.recipes import Recipe, get_recipe, register_recipe

# Technique name -> the Recipe fields it sets, in the order the forward ladder adds them.
TECHNIQUES: dict[str, tuple[str, ...]] = {
    "bf16": ("precision",),
    "batch": ("batch_size", "lr", "optimizer", "weight_decay"),
    "channels-last": ("channels_last",),
    "cudnn-benchmark": ("trainer_kwargs",),
    "data": ("data", "num_workers"),
    "schedule": ("callbacks", "max_epochs"),
    "compile": ("compile", "drop_last", "compile_cache"),
    "cuda-graphs": ("cuda_graphs", "compile_mode"),
    "fused-optimizer": ("fused_optimizer",),
    "strategy": ("strategy",),
}
# A technique that needs another: removing the second removes the first too (CUDA graphs capture the compile).
_NEEDS = {"cuda-graphs": "compile"}


def _differing(a: Recipe, b: Recipe) -> list[str]:
    covered = {f for fields in TECHNIQUES.values() for f in fields}
    extra = [
        f.name
        for f in dataclasses.fields(Recipe)
        if f.name not in covered | {"name", "description", "per_task"}
        and getattr(a, f.name) != getattr(b, f.name)
    ]
    if extra:
        raise ValueError(
            f"ablation: fields {extra} differ but belong to no technique; add them to TECHNIQUES."
        )
    return [t for t, fields in TECHNIQUES.items() if any(getattr(a, f) != getattr(b, f) for f in fields)]


def _resolved(recipe: Recipe, defaults: dict[str, Any]) -> Recipe:
    return dataclasses.replace(
        recipe, **{k: v for k, v in defaults.items() if hasattr(recipe, k) and getattr(recipe, k) is None}
    )


def _with(recipe: Recipe, source: Recipe, techniques: list[str], name: str, description: str) -> Recipe:
    changes: dict[str, Any] = {f: getattr(source, f) for t in techniques for f in TECHNIQUES[t]}
    return dataclasses.replace(recipe, name=name, description=description, per_task={}, **changes)


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
            current, b, [t], name, f"{start} with {', '.join(techniques[: i + 1])} of {end} ({task})."
        )
        names.append(register_recipe(current, replace=True).name)
    names.append(end)
    for t in techniques:
        removed = [t] + [d for d, need in _NEEDS.items() if need == t and d in techniques]
        name = f"{task}:{end}-{'-'.join(removed)}"
        recipe = _with(b, a, removed, name, f"{end} without {', '.join(removed)} ({task}).")
        names.append(register_recipe(recipe, replace=True).name)
    return names
