"""Recipes are declarative and resolved per task; unknown names fail with a useful message."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor

from lightning_speedup.bench import RunContext, get_recipe, get_task, register_recipe
from lightning_speedup.bench.datasets import DataError
from lightning_speedup.bench.recipes import _RECIPES, Recipe, attention_without_cudnn, available_recipes
from lightning_speedup.bench.runner import BenchConfig, build_trainer_parts


def _as(recipe: Recipe, other: Recipe, **changes: object) -> Recipe:
    """``recipe`` under ``other``'s name, description and per-task table, with ``changes``: equal to ``other``
    exactly when the two recipes differ in nothing else."""
    return dataclasses.replace(
        recipe, name=other.name, description=other.description, per_task=other.per_task, **changes
    )


def test_baseline_matches_design() -> None:
    task = get_task("fashion-mnist")
    r = get_recipe("baseline").for_task("fashion-mnist")
    assert r.precision == "32-true" and not r.compile and r.num_workers == 4 and r.data == "baseline"
    assert task.setting(r, "batch_size") == 128 and task.setting(r, "lr") == 1e-3
    assert task.setting(r, "optimizer") == "adam"
    lm = get_task("char-lm")
    assert lm.setting(get_recipe("baseline").for_task("char-lm"), "optimizer") == "adamw"


def test_speedup_per_task_overrides() -> None:
    fm = get_recipe("speedup").for_task("fashion-mnist")
    lm = get_recipe("speedup").for_task("char-lm")
    assert (
        fm.precision == lm.precision == "bf16-mixed"
        and not fm.compile
        and not lm.compile
        and fm.channels_last
    )
    assert fm.batch_size == 512 and lm.batch_size == 128 and not lm.channels_last


def test_speedup_adds_cudagraphs_and_fused_adam_for_images_only() -> None:
    """speedup-compiled = speedup-no-cudagraphs + reduce-overhead compile + fused Adam, for images."""
    from lightning_speedup.bench.modules import ImageClassifier

    mine, base = (
        get_recipe("speedup-compiled").for_task("fashion-mnist"),
        get_recipe("speedup-no-cudagraphs").for_task("fashion-mnist"),
    )
    assert mine.compile_mode == "reduce-overhead" and base.compile_mode is None
    assert mine.cuda_graphs == "inductor" and base.cuda_graphs is None
    assert mine.fused_optimizer and not base.fused_optimizer
    assert (mine.data, mine.max_epochs, mine.batch_size) == (base.data, base.max_epochs, base.batch_size)
    lm, lm_base = (
        get_recipe("speedup-compiled").for_task("char-lm"),
        get_recipe("speedup-no-cudagraphs").for_task("char-lm"),
    )
    assert lm == dataclasses.replace(lm_base, name="speedup-compiled", description=lm.description)
    model = ImageClassifier(compile=True, compile_mode="reduce-overhead", width=4)
    model.configure_model()
    assert model._forward is not None and model.compile_mode == "reduce-overhead"
    with pytest.raises(RuntimeError, match="Unrecognized mode=bogus"):
        ImageClassifier(compile=True, compile_mode="bogus", width=4).configure_model()


def test_cold_start_candidates() -> None:
    """`speedup` and its candidates differ from `speedup-compiled` only in how (and whether) they compile or
    graph the step and in cuDNN's benchmark mode; `speedup` graphs both tasks' steps without Inductor, and
    differs from `speedup-autotune` (the candidates' base) only there, for images in benchmark mode and for the
    LM in its attention kernels."""
    base = get_recipe("speedup-compiled")
    for task in ("fashion-mnist", "char-lm"):
        sp = base.for_task(task)
        eager = get_recipe("speedup").for_task(task)
        assert eager.compile is False and eager.compile_mode is None
        assert eager.cuda_graphs == "eager" and eager.fused_optimizer and eager.drop_last
        attention = ["SDPABackends()"] if task == "char-lm" else []  # the LM's attention off cuDNN's kernel
        assert [c.__name__ for c in eager.callbacks] == [c.__name__ for c in sp.callbacks] + [
            "AsyncProgressBarMetrics()",
            *attention,
        ]
        same = ("precision", "batch_size", "lr", "data", "max_epochs", "channels_last", "drop_last")
        assert all(getattr(eager, f) == getattr(sp, f) for f in same)
        assert get_recipe("speedup-regional").for_task(task).compile == "regional"
        assert get_recipe("speedup-auto").for_task(task).compile == "auto"
        autotune = get_recipe("speedup-autotune").for_task(task)
        assert autotune.trainer_kwargs == {"benchmark": True}
        assert [c.__name__ for c in autotune.callbacks] == [c.__name__ for c in sp.callbacks] + [
            "AsyncProgressBarMetrics()"
        ]
        for name in ("speedup-regional", "speedup-auto", "speedup-eager-step"):
            r = get_recipe(name).for_task(task)
            assert r.callbacks == autotune.callbacks and r.data == eager.data, name
            assert r.cuda_graphs is None and r.trainer_kwargs == autotune.trainer_kwargs, name
    images = get_recipe("speedup").for_task("fashion-mnist")
    autotune = get_recipe("speedup-autotune").for_task("fashion-mnist")
    assert images.trainer_kwargs == {}
    assert _as(autotune, images, trainer_kwargs={}) == images
    nographs = get_recipe("speedup-eager-step").for_task("fashion-mnist")
    assert _as(nographs, autotune, cuda_graphs="eager") == autotune
    lm = get_recipe("speedup").for_task("char-lm")
    lm_autotune = get_recipe("speedup-autotune").for_task("char-lm")
    assert lm_autotune.cuda_graphs is None and not lm_autotune.fused_optimizer
    graphed = _as(lm_autotune, lm, cuda_graphs="eager", fused_optimizer=True, callbacks=lm.callbacks)
    assert graphed == lm and lm.callbacks == (*lm_autotune.callbacks, attention_without_cudnn)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        (
            {"compile": "partial"},
            r"compile='partial'; choose one of \[False, True, 'full', 'regional', 'auto'\]",
        ),
        ({"cuda_graphs": "yes"}, "cuda_graphs='yes'; choose one of"),
        ({"cuda_graphs": "inductor"}, "set compile='full'"),
        ({"cuda_graphs": "eager", "compile": "regional"}, "set compile=False"),
    ],
)
def test_recipe_rejects_bad_compile_fields(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Recipe(name="x", description="x", **changes)


def test_compile_callbacks_only_on_cuda(shakespeare_path) -> None:  # type: ignore[no-untyped-def]
    from lightning_speedup.bench.tasks import compile_callbacks

    task = get_task("char-lm")
    ctx = RunContext(task=task, recipe=get_recipe("speedup-regional"), seed=0, accelerator="cpu")
    assert compile_callbacks(ctx) == []  # on CPU the module trains uncompiled, as `compile=True` does


def test_benchmark_recipes_load_from_the_repository_or_the_env(tmp_path) -> None:
    """The package alone registers its own recipes; benchmarks/recipes.py adds the ablations from the repo
    root (the cwd) or through $LIGHTNING_SPEEDUP_RECIPES."""
    import os
    import pathlib
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parents[2]
    code = "from lightning_speedup.bench import available_recipes; print(' '.join(available_recipes()))"
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("LIGHTNING_SPEEDUP_RECIPES", None)
    alone = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert alone.stdout.split() == [
        "baseline", "speedup", "speedup-auto", "speedup-autotune", "speedup-compiled", "speedup-eager-step",
        "speedup-levers", "speedup-regional",
    ]  # fmt: skip
    env["LIGHTNING_SPEEDUP_RECIPES"] = str(repo / "benchmarks" / "recipes.py")
    loaded = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    assert {"baseline-onecycle", "speedup-wsd", "speedup-async-metrics", "speedup-gpu-data"} <= set(
        loaded.stdout.split()
    )
    env["LIGHTNING_SPEEDUP_RECIPES"] = str(tmp_path / "missing.py")
    bad = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "missing.py', which is not a file" in bad.stderr


def test_fused_optimizer_lever() -> None:
    """make_optimizer passes fused=True to torch; the modules ask for it only with parameters on a GPU."""
    from lightning_speedup.bench.modules import CharLM, ImageClassifier, make_optimizer

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert make_optimizer("adam", params, lr=1e-3, weight_decay=0.0, fused=True).defaults["fused"] is True
    assert not make_optimizer("adam", params, lr=1e-3, weight_decay=0.0).defaults["fused"]
    for model in (
        ImageClassifier(width=4, fused_optimizer=True),
        CharLM(n_layer=1, n_embd=8, n_head=2, fused_optimizer=True),
    ):
        assert model.hparams.fused_optimizer and not model.configure_optimizers().defaults["fused"]  # on CPU


def test_unknown_names_suggest_the_closest() -> None:
    with pytest.raises(
        ValueError, match=r"Unknown recipe 'speedpu'.*'speedup'.*Available recipes: .*baseline"
    ):
        get_recipe("speedpu")
    with pytest.raises(ValueError, match=r"Unknown task 'fashion'.*fashion-mnist"):
        get_task("fashion")


def test_register_extend_and_build(fashion_mnist_dir) -> None:  # type: ignore[no-untyped-def]
    base = get_recipe("baseline")
    with pytest.raises(ValueError, match="exists"):
        register_recipe(base)
    extended = base.extended(
        name="test-lrmonitor",
        extra_callbacks=(lambda ctx: LearningRateMonitor(),),
        trainer_kwargs={"benchmark": True},
    )
    register_recipe(extended)
    try:
        task = get_task("fashion-mnist")
        ctx = RunContext(task=task, recipe=extended, seed=0, data_path=str(fashion_mnist_dir))
        module, _, callbacks, kwargs = build_trainer_parts(task, ctx)
        assert isinstance(module, L.LightningModule) and module.hparams.lr == 1e-3
        assert any(isinstance(c, LearningRateMonitor) for c in callbacks)
        assert kwargs["precision"] == "32-true" and kwargs["benchmark"] is True
        assert extended.summary()["callbacks"] == ["<lambda>"]
    finally:
        del _RECIPES["test-lrmonitor"]


def test_bad_overrides_and_pipeline() -> None:
    bad = Recipe(name="x", description="x", per_task={"fashion-mnist": {"nonsense": 1}})
    with pytest.raises(ValueError, match="unknown fields"):
        bad.for_task("fashion-mnist")
    task = get_task("fashion-mnist")
    ctx = RunContext(task=task, recipe=Recipe(name="y", description="y", data="teleport"), seed=0)
    with pytest.raises(ValueError, match=r"data pipeline 'teleport'.*Available: baseline"):
        task.pipeline(ctx)


def test_bench_config_validates_before_running(shakespeare_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="outside the range"):
        BenchConfig(
            task="char-lm", recipes=["baseline"], target=-1, data_path=str(shakespeare_path)
        ).resolve()
    with pytest.raises(DataError, match="char-lm needs a UTF-8 text file"):
        BenchConfig(task="char-lm", recipes=["baseline"], data_path=str(tmp_path / "none.txt")).resolve()
    with pytest.raises(ValueError, match="at least one"):
        BenchConfig(task="char-lm", recipes=[]).resolve()
    with pytest.raises(ValueError, match="seeds"):
        BenchConfig(task="char-lm", recipes=["baseline"], seeds=0, data_path=str(shakespeare_path)).resolve()
    with pytest.raises(ValueError, match=r"Unknown model argument\(s\) \['depth'\]"):
        BenchConfig(task="fashion-mnist", recipes=["baseline"], model_kwargs={"depth": 3}).resolve()


@pytest.mark.parametrize("task_name", ["fashion-mnist", "char-lm"])
def test_every_registered_recipe_builds(task_name: str, fashion_mnist_dir, shakespeare_path) -> None:  # type: ignore[no-untyped-def]
    from lightning_speedup.bench import available_recipes

    task = get_task(task_name)
    data = str(fashion_mnist_dir if task_name == "fashion-mnist" else shakespeare_path)
    for name in available_recipes():
        recipe = get_recipe(name).for_task(task_name)
        if recipe.data not in task.pipelines:
            continue  # a pipeline this task does not have (e.g. resident images for the LM)
        ctx = RunContext(task=task, recipe=recipe, seed=0, data_path=data)
        module, dm, callbacks, kwargs = build_trainer_parts(task, ctx)
        assert isinstance(module, L.LightningModule) and isinstance(dm, L.LightningDataModule), name
        assert kwargs["precision"] == recipe.precision
        assert len(callbacks) >= len(recipe.callbacks)


def test_gpu_data_recipes_wire_the_pipeline(fashion_mnist_dir) -> None:  # type: ignore[no-untyped-def]
    from lightning_speedup.data import DeviceResidentDataModule, GPUAugment, GPUPrefetcher

    task = get_task("fashion-mnist")
    ctx = RunContext(
        task=task, recipe=get_recipe("speedup-gpu-data"), seed=0, data_path=str(fashion_mnist_dir)
    )
    _, dm, callbacks, _ = build_trainer_parts(task, ctx)
    assert dm.output == "uint8" and not dm.augment  # type: ignore[attr-defined]
    assert [type(c) for c in callbacks] == [GPUPrefetcher, GPUAugment]
    ctx = RunContext(
        task=task, recipe=get_recipe("speedup-resident"), seed=0, data_path=str(fashion_mnist_dir)
    )
    _, dm, callbacks, _ = build_trainer_parts(task, ctx)
    assert isinstance(dm, DeviceResidentDataModule) and [type(c) for c in callbacks] == [GPUAugment]
    # Subsets are the ones the DataLoader pipeline draws (same seed), so reduced runs compare like for like.
    ctx.train_subset, ctx.val_subset = 100, 50
    _, dm, _, _ = build_trainer_parts(task, ctx)
    _, loader_dm, _, _ = build_trainer_parts(
        task, RunContext(task=task, recipe=get_recipe("baseline"), seed=0, data_path=str(fashion_mnist_dir),
                         train_subset=100, val_subset=50),
    )  # fmt: skip
    loader_dm.setup("fit")  # type: ignore[union-attr]
    resident_labels, loader_labels = dm.train_tensors[1], loader_dm.train_set.labels  # type: ignore[union-attr]
    assert len(resident_labels) == 100 and torch.equal(resident_labels, loader_labels)
    assert len(dm.val_tensors[1]) == 50  # type: ignore[union-attr]
    assert (
        get_recipe("speedup-onecycle").for_task("char-lm").batch_size == 128
    )  # keeps the levers' LM override
    # The final recipe: resident images with OneCycle, the LM on its own pipeline with WSD.
    fm, lm = get_recipe("speedup").for_task("fashion-mnist"), get_recipe("speedup").for_task("char-lm")
    assert (fm.data, fm.max_epochs, lm.data, lm.max_epochs) == ("resident", 10, "baseline", 40)


def test_every_registered_recipe_summarizes_to_json_for_every_task() -> None:
    """Reports embed the summary; per-task callback factories once broke json.dumps (on the device)."""
    import json

    for name in available_recipes():
        for task in ("fashion-mnist", "char-lm"):
            summary = json.loads(json.dumps(get_recipe(name).for_task(task).summary()))
            assert summary["name"] == name and isinstance(summary["callbacks"], list)
        json.dumps(get_recipe(name).summary())
    per_task = get_recipe("speedup-onecycle").summary()["per_task"]["char-lm"]
    assert per_task["callbacks"] == ["OneCycle(max_lr=0.001)"]


def test_the_no_sanity_candidate_skips_only_the_sanity_check(
    fashion_mnist_dir, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import json
    import pathlib

    from lightning_speedup.cli import EXIT_OK, main

    repo = pathlib.Path(__file__).resolve().parents[2]
    monkeypatch.setenv("LIGHTNING_SPEEDUP_RECIPES", str(repo / "benchmarks" / "recipes.py"))
    candidate = get_recipe("speedup-no-sanity").for_task("fashion-mnist")
    speedup = get_recipe("speedup-autotune").for_task("fashion-mnist")
    assert _as(candidate, speedup, trainer_kwargs=speedup.trainer_kwargs) == speedup
    tiny = ["--train-subset", "600", "--val-subset", "128", "--max-epochs", "1", "--model-arg", "width=4"]
    argv = ["bench", "--task", "fashion-mnist", "--data", str(fashion_mnist_dir), "--out", str(tmp_path / "o"),
            *tiny, "--target", "0.05", "--recipe", "speedup-autotune", "--recipe", "speedup-no-sanity"]  # fmt: skip
    assert main(argv) == EXIT_OK
    runs = {r["recipe"]: r for r in json.loads((tmp_path / "o" / "report.json").read_text())["runs"]}
    assert runs["speedup-autotune"]["sanity_s"] > 0 and runs["speedup-no-sanity"]["sanity_s"] == 0.0
    assert all(r["reached"] and r["error"] is None for r in runs.values())


def test_the_measured_candidates_are_todays_speedup_where_the_case_study_says_so(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The case study files the ablation's `speedup-autotune` minus cudnn-benchmark (fashion-mnist) under today's
    `speedup`, which must be exactly that recipe; and the LM's `speedup-lm-flash` of 2026-12-05, which was
    `speedup-lm-cudagraphs` (the LM's `speedup` before) with SDPABackends() added, and today's `speedup` is that."""
    import pathlib

    from lightning_speedup.bench.ablation import _resolved, ablation_recipes
    from lightning_speedup.bench.recipes import load_recipe_files
    from lightning_speedup.bench.tasks import get_task

    repo = pathlib.Path(__file__).resolve().parents[2]
    monkeypatch.setenv("LIGHTNING_SPEEDUP_RECIPES", str(repo / "benchmarks" / "recipes.py"))
    load_recipe_files()
    ablation_recipes("fashion-mnist", end="speedup-autotune")
    defaults = get_task("fashion-mnist").defaults  # the ablation's recipes spell out the task's defaults
    today = _resolved(get_recipe("speedup").for_task("fashion-mnist"), defaults)
    candidate = get_recipe("fashion-mnist:speedup-autotune-cudnn-benchmark").for_task("fashion-mnist")
    assert _as(_resolved(candidate, defaults), today) == today
    lm, before = (get_recipe(n).for_task("char-lm") for n in ("speedup", "speedup-lm-cudagraphs"))
    assert lm.callbacks == (*before.callbacks, attention_without_cudnn)
    assert _as(before, lm, callbacks=lm.callbacks) == lm


def test_the_lm_speedup_keeps_attention_off_cudnn(shakespeare_path, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The LM's `speedup` ends its callbacks with SDPABackends() (no cuDNN attention), images have none, and the
    LM's bench run trains with it (on the CPU, where it warns that it changes nothing)."""
    import json

    from lightning_speedup import SDPABackends
    from lightning_speedup.cli import EXIT_OK, main

    images, lm = (get_recipe("speedup").for_task(t) for t in ("fashion-mnist", "char-lm"))
    assert attention_without_cudnn not in images.callbacks and lm.callbacks[-1] is attention_without_cudnn
    ctx = RunContext(task=get_task("char-lm"), recipe=lm, seed=0, accelerator="cpu")
    made = lm.callbacks[-1](ctx)
    assert isinstance(made, SDPABackends) and made.backends == ("flash", "efficient", "math")
    tiny = ["--train-subset", "256", "--val-subset", "8", "--max-epochs", "1", "--model-arg", "n_layer=1",
            "--model-arg", "n_embd=32", "--model-arg", "n_head=2", "--model-arg", "block_size=32"]  # fmt: skip
    argv = ["bench", "--task", "char-lm", "--data", str(shakespeare_path), "--recipe", "speedup",
            "--seeds", "1", "--target", "9", "--out", str(tmp_path / "o"), *tiny]  # fmt: skip
    assert main(argv) == EXIT_OK
    (run,) = json.loads((tmp_path / "o" / "report.json").read_text())["runs"]
    assert run["recipe"] == "speedup" and run["reached"] and run["error"] is None
