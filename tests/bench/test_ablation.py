"""The ablation ladder: baseline -> speedup one technique at a time, and speedup minus one at a time."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from lightning_speedup.bench import get_recipe, get_task
from lightning_speedup.bench.ablation import TECHNIQUES, _resolved, ablation_recipes


@pytest.mark.parametrize("task", ["fashion-mnist", "char-lm"])
def test_ladder_adds_then_removes_one_technique_at_a_time(task: str) -> None:
    names = ablation_recipes(task)
    defaults = get_task(task).defaults

    def resolved(name: str):  # type: ignore[no-untyped-def]
        return _resolved(get_recipe(name).for_task(task), defaults)

    base, end = resolved("baseline"), resolved("speedup")
    k = names.index("speedup")
    assert names[0] == "baseline" and k >= 3

    def techniques_differing(r1, r2) -> set[str]:  # type: ignore[no-untyped-def]
        return {t for t, fs in TECHNIQUES.items() if any(getattr(r1, f) != getattr(r2, f) for f in fs)}

    ladder = [resolved(n) for n in names[: k + 1]]
    for prev, nxt in itertools.pairwise(ladder):
        assert len(techniques_differing(prev, nxt)) == 1, (prev.name, nxt.name)
    for name in names[k + 1 :]:
        r = resolved(name)
        removed = techniques_differing(r, end)
        assert removed and removed <= techniques_differing(base, end)
        assert all(getattr(r, f) == getattr(base, f) for t in removed for f in TECHNIQUES[t])
    # speedup compiles nothing (chosen by cold runs), so no step of the ladder compiles either
    assert not any(resolved(n).compile for n in names)


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
