"""The reference tasks of docs/design.md: what to train, on which data, to which target.

A task builds the LightningModule and the data pipeline for a resolved :class:`Recipe`. Data
pipelines are registered per task by name (``recipe.data``), so a feature that adds a faster
pipeline registers it here instead of writing a new script.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback

from lightning_speedup.bench.datamodules import CharLMDataModule, FashionMNISTDataModule
from lightning_speedup.bench.datasets import ENV_VAR, DataError, find_fashion_mnist
from lightning_speedup.bench.modules import CharLM, ImageClassifier
from lightning_speedup.bench.recipes import Recipe

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Everything a recipe's factories may need for one run."""

    task: Task
    recipe: Recipe
    seed: int
    data_path: str | None = None
    train_subset: int | None = None
    val_subset: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    accelerator: str = "auto"

    @property
    def on_cuda(self) -> bool:
        return self.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def compile_callbacks(ctx: RunContext) -> list[Callback]:
    """The callbacks of the recipe's ``compile="regional"|"auto"`` and ``cuda_graphs="eager"`` (CUDA only;
    ``compile=True|"full"`` is applied by the module itself)."""
    from lightning_speedup.compile import Compile, EagerCUDAGraphs

    r = ctx.recipe
    if not ctx.on_cuda:
        return []
    out: list[Callback] = []
    if r.compile in ("regional", "auto"):
        out.append(
            Compile(scope="regional", auto=r.compile == "auto", mode=r.compile_mode, cache=r.compile_cache)
        )
    if r.cuda_graphs == "eager":
        out.append(EagerCUDAGraphs(module_attr="net"))
    return out


PipelineBuilder = Callable[[RunContext], tuple[L.LightningDataModule, list[Callback]]]


@dataclass
class Task:
    """A reference workload. ``metric``/``mode`` say what the target is measured on."""

    name: str
    description: str
    metric: str
    mode: str  # "max" or "min"
    default_target: float
    metric_range: tuple[float, float]
    default_max_epochs: int
    defaults: dict[str, Any]
    build_module: Callable[[RunContext, L.LightningDataModule], L.LightningModule]
    module_class: type[L.LightningModule]
    locate_data: Callable[[str | None], Path]
    pipelines: dict[str, PipelineBuilder] = field(default_factory=dict)

    def register_pipeline(self, name: str, builder: PipelineBuilder, replace: bool = False) -> None:
        if name in self.pipelines and not replace:
            raise ValueError(f"Task {self.name!r} already has a data pipeline {name!r}.")
        self.pipelines[name] = builder

    def pipeline(self, ctx: RunContext) -> tuple[L.LightningDataModule, list[Callback]]:
        name = ctx.recipe.data
        if name not in self.pipelines:
            raise ValueError(
                f"Recipe {ctx.recipe.name!r} asks for data pipeline {name!r}, which task {self.name!r} "
                f"does not have. Available: {', '.join(sorted(self.pipelines))}."
            )
        dm, callbacks = self.pipelines[name](ctx)
        return dm, callbacks + compile_callbacks(ctx)

    def check_target(self, target: float) -> None:
        lo, hi = self.metric_range
        if not lo <= target <= hi:
            raise ValueError(
                f"Target {target} is outside the range of {self.metric} for task {self.name!r} "
                f"([{lo}, {hi}]). Pass --target within that range (the default is {self.default_target})."
            )

    def check_model_kwargs(self, model_kwargs: dict[str, Any]) -> None:
        recipe_owned = {"self", "compile", "channels_last", "optimizer", "lr", "weight_decay", "vocab_size"}
        allowed = set(inspect.signature(self.module_class).parameters) - recipe_owned
        unknown = sorted(set(model_kwargs) - allowed)
        if unknown:
            raise ValueError(
                f"Unknown model argument(s) {unknown} for task {self.name!r}; "
                f"{self.module_class.__name__} accepts {sorted(allowed)}."
            )
        # The command line gives ints, floats, bools or strings; each must be of its argument's default's kind, or
        # the run would fail later, recorded as a failed run instead of refused as bad input.
        parameters = inspect.signature(self.module_class).parameters
        for key, value in model_kwargs.items():
            default = parameters[key].default
            kinds: tuple[type, ...] | None = (
                (bool,) if isinstance(default, bool) else (int,) if isinstance(default, int)
                else (int, float) if isinstance(default, float) else (str,) if isinstance(default, str) else None
            )  # fmt: skip
            wrong_bool = isinstance(value, bool) and bool not in (kinds or ())
            if kinds is not None and (wrong_bool or not isinstance(value, kinds)):
                raise ValueError(
                    f"--model-arg {key}={value!r}: {self.module_class.__name__}'s {key} takes "
                    f"{' or '.join(k.__name__ for k in kinds)} values like its default, {default!r}."
                )

    def reached(self, value: float, target: float) -> bool:
        return value >= target if self.mode == "max" else value <= target

    def setting(self, recipe: Recipe, key: str) -> Any:
        value = getattr(recipe, key)
        return self.defaults[key] if value is None else value


def _fashion_module(ctx: RunContext, dm: L.LightningDataModule) -> L.LightningModule:
    r, t = ctx.recipe, ctx.task
    return ImageClassifier(
        optimizer=t.setting(r, "optimizer"),
        lr=t.setting(r, "lr"),
        weight_decay=t.setting(r, "weight_decay"),
        channels_last=r.channels_last,
        compile=r.compile in (True, "full") and ctx.on_cuda,
        compile_mode="reduce-overhead" if r.cuda_graphs == "inductor" else r.compile_mode,
        fused_optimizer=r.fused_optimizer,
        **ctx.model_kwargs,
    )


def _fashion_datamodule(ctx: RunContext, **kwargs: Any) -> FashionMNISTDataModule:
    return FashionMNISTDataModule(
        data_dir=ctx.data_path,
        batch_size=ctx.task.setting(ctx.recipe, "batch_size"),
        num_workers=ctx.recipe.num_workers,
        train_subset=ctx.train_subset,
        val_subset=ctx.val_subset,
        seed=ctx.seed,
        drop_last=ctx.recipe.drop_last,
        **kwargs,
    )


def _fashion_baseline(ctx: RunContext) -> tuple[L.LightningDataModule, list[Callback]]:
    """Per-sample CPU augmentation in the Dataset, normalised float batches."""
    return _fashion_datamodule(ctx, augment=True, output="float"), []


def _gpu_augment(ctx: RunContext) -> Callback:
    from lightning_speedup import augment
    from lightning_speedup.bench.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD
    from lightning_speedup.data import GPUAugment

    return GPUAugment(
        augment.RandomCrop(28, padding=2),
        augment.RandomHorizontalFlip(),
        augment.Normalize(FASHION_MNIST_MEAN, FASHION_MNIST_STD),
        seed=ctx.seed,
    )


def _fashion_gpu(ctx: RunContext) -> tuple[L.LightningDataModule, list[Callback]]:
    """uint8 batches from the usual DataLoader (no CPU work), side-stream copies, GPU augmentation."""
    from lightning_speedup.data import GPUPrefetcher

    # Pinned by the DataLoader's pin thread: unpinned batches would be pinned by GPUPrefetcher on the
    # training thread, which made this pipeline slower than the plain DataLoader.
    dm = _fashion_datamodule(ctx, augment=False, output="uint8")
    return dm, [GPUPrefetcher(depth=2), _gpu_augment(ctx)]


def _fashion_resident(ctx: RunContext) -> tuple[L.LightningDataModule, list[Callback]]:
    """The whole data set in GPU memory as uint8, shuffled and batched there, GPU augmentation."""
    from lightning_speedup.data import DeviceResidentDataModule

    dm = DeviceResidentDataModule.from_fashion_mnist(
        ctx.data_path,
        train_subset=ctx.train_subset,
        val_subset=ctx.val_subset,
        subset_seed=ctx.seed,  # the subsets the DataLoader pipelines use
        batch_size=ctx.task.setting(ctx.recipe, "batch_size"),
        drop_last=ctx.recipe.drop_last,
        seed=ctx.seed,
    )
    return dm, [_gpu_augment(ctx)]


def _default_text_path(data_path: str | None) -> Path:
    """``data_path`` may be the text file, or a folder holding ``tinyshakespeare/input.txt``."""
    roots = [Path(data_path)] if data_path else []
    if os.environ.get(ENV_VAR):
        roots.append(Path(os.environ[ENV_VAR]))
    for root in roots:
        if root.is_file():
            return root
        for cand in (root / "tinyshakespeare" / "input.txt", root / "input.txt"):
            if cand.is_file():
                return cand
    raise DataError(
        "char-lm needs a UTF-8 text file. Looked at "
        + (", ".join(str(r) for r in roots) or "nothing (no --data and no $" + ENV_VAR + ")")
        + ". Pass --data path/to/input.txt (Tiny Shakespeare: https://raw.githubusercontent.com/karpathy/"
        f"char-rnn/master/data/tinyshakespeare/input.txt) or set {ENV_VAR} to a folder with tinyshakespeare/input.txt."
    )


def _charlm_datamodule(ctx: RunContext) -> CharLMDataModule:
    samples = ctx.train_subset
    return CharLMDataModule(
        _default_text_path(ctx.data_path),
        block_size=ctx.model_kwargs.get("block_size", 256),
        batch_size=ctx.task.setting(ctx.recipe, "batch_size"),
        num_workers=ctx.recipe.num_workers,
        samples_per_epoch=samples,
        val_windows=ctx.val_subset,
    )


def _charlm_module(ctx: RunContext, dm: L.LightningDataModule) -> L.LightningModule:
    r, t = ctx.recipe, ctx.task
    return CharLM(
        vocab_size=dm.vocab_size,  # type: ignore[attr-defined]
        optimizer=t.setting(r, "optimizer"),
        lr=t.setting(r, "lr"),
        weight_decay=t.setting(r, "weight_decay"),
        compile=r.compile in (True, "full") and ctx.on_cuda,
        compile_mode="reduce-overhead" if r.cuda_graphs == "inductor" else r.compile_mode,
        fused_optimizer=r.fused_optimizer,
        **ctx.model_kwargs,
    )


def _charlm_baseline(ctx: RunContext) -> tuple[L.LightningDataModule, list[Callback]]:
    return _charlm_datamodule(ctx), []


FASHION_MNIST = Task(
    name="fashion-mnist",
    description="Fashion-MNIST 60k/10k 28x28, ResNet-9-style CNN (6.6M params), target test accuracy 0.94",
    metric="val_acc",
    mode="max",
    default_target=0.94,
    metric_range=(0.0, 1.0),
    default_max_epochs=30,
    defaults={"batch_size": 128, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    build_module=_fashion_module,
    module_class=ImageClassifier,
    locate_data=find_fashion_mnist,
    pipelines={"baseline": _fashion_baseline, "gpu": _fashion_gpu, "resident": _fashion_resident},
)

CHAR_LM = Task(
    name="char-lm",
    description="Tiny Shakespeare (last 10% val), GPT 6 layers x 6 heads x 384, context 256, target val loss 1.47",
    metric="val_loss",
    mode="min",
    default_target=1.47,
    metric_range=(0.0, 10.0),
    default_max_epochs=120,
    defaults={"batch_size": 128, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01},
    build_module=_charlm_module,
    module_class=CharLM,
    locate_data=_default_text_path,
    pipelines={"baseline": _charlm_baseline},
)

TASKS: dict[str, Task] = {t.name: t for t in (FASHION_MNIST, CHAR_LM)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown task {name!r}.{hint} Available tasks: {', '.join(sorted(TASKS))}."
        ) from None
