"""The ablation ladder: baseline -> speedup one technique at a time, and speedup minus one at a time."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from lightning_speedup.bench import get_recipe, get_task
from lightning_speedup.bench.ablation import _resolved, ablation_recipes, callback_technique
from lightning_speedup.bench.recipes import Recipe, async_metrics, register_recipe

# What each technique may change, written out here rather than read from ablation.TECHNIQUES: fields, and the
# names of the callback factories it adds or removes.
FIELDS = {
    "bf16": {"precision"}, "batch": {"batch_size", "lr", "optimizer", "weight_decay"},
    "channels-last": {"channels_last"}, "cudnn-benchmark": {"trainer_kwargs"}, "data": {"data", "num_workers"},
    "schedule": {"max_epochs"}, "async-metrics": set(), "drop-last": {"drop_last"},
    "compile": {"compile", "compile_cache"}, "cuda-graphs": {"cuda_graphs", "compile_mode"},
    "fused-optimizer": {"fused_optimizer"}, "attention-no-cudnn": set(),
}  # fmt: skip
CALLBACKS = {"schedule": ("OneCycle(", "WarmupStableDecay("), "async-metrics": ("AsyncProgressBarMetrics(",),
             "attention-no-cudnn": ("SDPABackends(",)}  # fmt: skip
LADDERS = {
    "fashion-mnist": ["bf16", "batch", "channels-last", "data", "schedule", "async-metrics", "drop-last",
                      "cuda-graphs", "fused-optimizer"],
    "char-lm": ["bf16", "cudnn-benchmark", "schedule", "async-metrics", "drop-last", "cuda-graphs",
                "fused-optimizer", "attention-no-cudnn"],
}  # fmt: skip
# `speedup` minus a technique that another needs removes both: CUDA graphs replay fixed shapes, so they go
# with the dropped last batch.
REMOVED_WITH = {task: {"drop-last": ["drop-last", "cuda-graphs"]} for task in ("fashion-mnist", "char-lm")}


def _removed(task: str, technique: str) -> list[str]:
    return REMOVED_WITH.get(task, {}).get(technique, [technique])


def _resolved_step(task: str, name: str) -> Recipe:
    return _resolved(get_recipe(name).for_task(task), get_task(task).defaults)


def _changes(a: Recipe, b: Recipe) -> tuple[set[str], list[str]]:
    """The fields that differ (callbacks aside), and the names of the callbacks in one but not the other."""
    fields = {
        f.name
        for f in dataclasses.fields(Recipe)
        if f.name not in ("name", "description", "per_task", "callbacks")
        and getattr(a, f.name) != getattr(b, f.name)
    }
    names_a, names_b = ([f.__name__ for f in r.callbacks] for r in (a, b))
    return fields, sorted({*names_a} ^ {*names_b})


def _only(technique: str, a: Recipe, b: Recipe) -> None:
    """``a`` and ``b`` differ, and in nothing but ``technique``'s fields and callbacks."""
    fields, callbacks = _changes(a, b)
    assert fields or callbacks, (technique, a.name, b.name)
    assert fields <= FIELDS[technique], (technique, fields)
    assert all(c.startswith(CALLBACKS.get(technique, ())) for c in callbacks), (technique, callbacks)
    if technique in CALLBACKS:
        assert callbacks, (technique, "its callback did not change")


@pytest.mark.parametrize("task", ["fashion-mnist", "char-lm"])
def test_ladder_adds_then_removes_one_technique_at_a_time(task: str) -> None:
    names = ablation_recipes(task)
    techniques = LADDERS[task]
    forward = [f"{task}:baseline+{'+'.join(techniques[: i + 1])}" for i in range(len(techniques) - 1)]
    reverse = [f"{task}:speedup-{'-'.join(_removed(task, t))}" for t in techniques]
    assert names == ["baseline", *forward, "speedup", *reverse]

    base, end = _resolved_step(task, "baseline"), _resolved_step(task, "speedup")
    ladder = [_resolved_step(task, n) for n in names[: len(techniques) + 1]]
    for technique, prev, nxt in zip(techniques, ladder[:-1], ladder[1:], strict=True):
        _only(technique, prev, nxt)
        # Callbacks keep the end recipe's order.
        order = [f.__name__ for f in end.callbacks]
        assert [f.__name__ for f in nxt.callbacks] == [
            n for n in order if n in {f.__name__ for f in nxt.callbacks}
        ]
    for technique, name in zip(techniques, reverse, strict=True):
        without = _resolved_step(task, name)
        removed = _removed(task, technique)
        if len(removed) == 1:
            _only(technique, end, without)
        else:
            chained, callbacks = _changes(end, without)
            assert chained <= set().union(*(FIELDS[t] for t in removed)) and callbacks == []
            assert {"drop_last", "cuda_graphs"} <= chained
        fields, _ = _changes(end, without)
        assert all(getattr(without, f) == getattr(base, f) for f in fields)
    # speedup compiles nothing (chosen by cold runs), so no step of the ladder compiles either
    assert not any(_resolved_step(task, n).compile for n in names)

    # The schedule and the asynchronous metrics (and the LM's attention kernels) are steps of their own, in
    # both directions.
    schedule_name = end.callbacks[0].__name__
    assert schedule_name.startswith(CALLBACKS["schedule"])
    attention = ["SDPABackends()"] if task == "char-lm" else []
    for step, kept in (
        (f"{task}:speedup-async-metrics", [schedule_name, *attention]),
        (f"{task}:speedup-schedule", ["AsyncProgressBarMetrics()", *attention]),
        (
            f"{task}:{names[names.index('speedup') - 1].split(':')[1]}",
            [schedule_name, "AsyncProgressBarMetrics()"],
        ),
        (forward[techniques.index("schedule")], [schedule_name]),
    ):
        assert [f.__name__ for f in get_recipe(step).for_task(task).callbacks] == kept, step
    assert get_recipe(f"{task}:speedup-schedule").max_epochs is None


def test_compile_needs_the_dropped_last_batch_and_cuda_graphs_need_compile() -> None:
    names = ablation_recipes("fashion-mnist", end="speedup-compiled")
    forward = [n.rsplit("+", 1)[1] for n in names if "+" in n]
    assert forward[forward.index("drop-last") + 1] == "compile"  # drop-last first, then compile on top of it
    without = [n.removeprefix("fashion-mnist:speedup-compiled-") for n in names if "speedup-compiled-" in n]
    assert "drop-last-compile-cuda-graphs" in without and "compile-cuda-graphs" in without
    assert "cuda-graphs" in without and "drop-last" not in without
    end = _resolved_step("fashion-mnist", "speedup-compiled")
    no_drop = _resolved_step("fashion-mnist", "fashion-mnist:speedup-compiled-drop-last-compile-cuda-graphs")
    fields, callbacks = _changes(end, no_drop)
    assert fields == {"drop_last", "compile", "cuda_graphs", "compile_mode"} and not callbacks
    k = names.index("speedup-compiled")
    ladder = [_resolved_step("fashion-mnist", n) for n in names[: k + 1]]
    added = [*forward, "fused-optimizer"]
    assert added[-3:] == ["compile", "cuda-graphs", "fused-optimizer"]
    for technique, prev, nxt in zip(added, ladder[:-1], ladder[1:], strict=True):
        _only(technique, prev, nxt)


def test_any_other_callback_is_a_technique_named_after_its_factory() -> None:
    def stall_monitor(ctx: Any) -> Any:
        from lightning_speedup.data import DataStallMonitor

        return DataStallMonitor()

    stall_monitor.__name__ = "DataStallMonitor()"

    def warmup_cosine(ctx: Any) -> Any:  # a schedule not made by schedule(...): known by its name
        from lightning_speedup.schedules import WarmupCosine

        return WarmupCosine(peak_lr=1e-3)

    warmup_cosine.__name__ = "WarmupCosine(peak_lr=0.001)"
    assert callback_technique(warmup_cosine) == "schedule"
    assert callback_technique(stall_monitor) == "datastallmonitor"
    speedup = get_recipe("speedup").for_task("char-lm")
    register_recipe(
        speedup.extended(name="tmp-ablation-monitored", per_task={},
                         callbacks=(warmup_cosine, stall_monitor, async_metrics)),
        replace=True,
    )  # fmt: skip
    names = ablation_recipes("char-lm", end="tmp-ablation-monitored")
    assert names[-1] == "char-lm:tmp-ablation-monitored-datastallmonitor"
    # The monitor is the last technique, so the step before the end recipe has every callback but it.
    before_end = get_recipe(names[names.index("tmp-ablation-monitored") - 1])
    assert [f.__name__ for f in before_end.callbacks] == [
        "WarmupCosine(peak_lr=0.001)",
        "AsyncProgressBarMetrics()",
    ]
    assert [f.__name__ for f in get_recipe(names[-1]).callbacks] == [
        "WarmupCosine(peak_lr=0.001)", "AsyncProgressBarMetrics()",
    ]  # fmt: skip

    def clashing(ctx: Any) -> Any:
        return stall_monitor(ctx)

    clashing.__name__ = "Data()"
    register_recipe(
        speedup.extended(name="tmp-ablation-clash", per_task={}, extra_callbacks=(clashing,)), replace=True
    )
    with pytest.raises(
        ValueError, match="callback factory 'Data\\(\\)' would be the technique 'data', a technique of"
    ):
        ablation_recipes("char-lm", end="tmp-ablation-clash")


def test_ablation_steps_train_on_a_tiny_cpu_budget(fashion_mnist_dir: Path, tmp_path: Path) -> None:
    from lightning_speedup.cli import EXIT_OK, main

    steps = ["fashion-mnist:speedup-async-metrics", "fashion-mnist:speedup-drop-last-cuda-graphs"]
    tiny = ["--train-subset", "600", "--val-subset", "128", "--max-epochs", "1", "--model-arg", "width=4"]
    argv = ["bench", "--task", "fashion-mnist", "--data", str(fashion_mnist_dir), "--out", str(tmp_path / "o"),
            *tiny, "--target", "0.05"]  # fmt: skip
    assert main([*argv, *(a for s in steps for a in ("--recipe", s))]) == EXIT_OK
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert [r["recipe"] for r in report["runs"]] == steps
    assert all(r["reached"] and r["error"] is None for r in report["runs"])
    assert report["recipes"][steps[0]]["callbacks"] == ["OneCycle(max_lr=0.004)"]
    assert report["recipes"][steps[1]]["drop_last"] is False


def test_identical_recipes_give_a_two_step_ladder() -> None:
    from lightning_speedup.bench.recipes import register_recipe

    register_recipe(
        dataclasses.replace(get_recipe("baseline"), name="tmp-ablation-end", description="x", per_task={}),
        replace=True,
    )
    names = ablation_recipes("fashion-mnist", end="tmp-ablation-end")
    assert names == ["baseline", "tmp-ablation-end"]


def test_a_fresh_process_finds_ablation_steps_by_name() -> None:
    from lightning_speedup.bench.recipes import _RECIPES

    _RECIPES.pop("char-lm:speedup-bf16", None)
    assert get_recipe("char-lm:speedup-bf16").for_task("char-lm").precision == "32-true"
    with pytest.raises(ValueError, match="Unknown recipe 'nope:baseline'"):
        get_recipe("nope:baseline")


def test_cli_ablation_flag_lists_the_ladder() -> None:
    from lightning_speedup.cli import build_parser

    args = build_parser().parse_args(["bench", "--task", "char-lm", "--ablation"])
    assert args.ablation and args.recipes == []
