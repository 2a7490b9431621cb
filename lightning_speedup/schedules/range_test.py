"""LR range test (Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017).

Before training, run ``num_steps`` optimizer steps while the LR grows exponentially from
``min_lr`` to ``max_lr``, record the loss of every step, stop once the loss diverges, pick a peak
LR from the curve (:func:`lightning_speedup.schedules.functional.select_lr`), then put the model,
the optimizer, the AMP grad scaler and the RNGs back exactly as they were, so the real run starts
from the same state as a run without the test.

The sweep runs the module's own ``training_step`` through the Trainer's strategy (DDP gradient
sync, the precision plugin's autocast, ``gradient_clip_val`` and ``accumulate_grad_batches`` all
apply) but calls no other callback, so nothing else in the run sees the sweep; the one exception is
``GPUAugment``, whose ops the sweep's batches pass through as training batches do (from a stream of
their own, so the training run's augmentation is unchanged). Lightning's own
``LearningRateFinder`` instead saves a checkpoint to disk, swaps out every callback and the
logger, runs the fit loop and restores the checkpoint; the direct loop here avoids the disk
round trip and leaves the loops' progress untouched.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_speedup.schedules.functional import (
    SELECTION_RULES,
    LRSuggestion,
    SelectionRule,
    check_positive,
    exponential_lrs,
    select_lr,
)

if TYPE_CHECKING:
    import lightning.pytorch as pl


class RangeTestDivergedError(RuntimeError):
    """The LR range test diverged before it found any LR at which the loss falls."""


@dataclass(frozen=True)
class LRRangeTest:
    """Settings of the LR range test run for ``max_lr="auto"`` / ``peak_lr="auto"``.

    Args:
        min_lr: LR of the first sweep step (the reference LR: param groups keep their ratios to it).
        max_lr: LR of the last sweep step; the sweep usually stops earlier, when the loss diverges.
        num_steps: optimizer steps in the sweep (each uses ``accumulate_grad_batches`` batches).
        rule: how the LR is picked from the curve: ``"minimum"`` (LR at the smoothed loss minimum
            divided by ``divisor``), ``"valley"`` (fastai) or ``"steepest"`` (Lightning).
        divisor: divisor of the ``"minimum"`` rule (2; see :func:`select_lr` for how it was chosen).
        divergence_threshold: stop once the running loss exceeds this multiple of its best value.
        smoothing: factor of the exponential average used for that stop test only.
        save_plot: write ``lr_range_test.png`` and ``lr_range_test.json`` to the trainer's log dir.

    Raises:
        ValueError: non-positive LRs, ``min_lr >= max_lr``, fewer than 10 steps, an unknown rule,
            ``divisor <= 0``, ``divergence_threshold <= 1`` or ``smoothing`` outside [0, 1).
    """

    min_lr: float = 1e-6
    max_lr: float = 10.0
    num_steps: int = 100
    rule: SelectionRule = "minimum"
    divisor: float = 2.0
    divergence_threshold: float = 4.0
    smoothing: float = 0.9
    save_plot: bool = True

    def __post_init__(self) -> None:
        check_positive(
            "LRRangeTest.min_lr", self.min_lr, "The sweep starts here; 1e-6 or 1e-7 suit most models."
        )
        check_positive("LRRangeTest.max_lr", self.max_lr, "The sweep ends here; 1 to 10 suit most models.")
        if self.min_lr >= self.max_lr:
            raise ValueError(
                f"LRRangeTest.min_lr ({self.min_lr}) must be below max_lr ({self.max_lr}): the sweep grows the LR."
            )
        if not isinstance(self.num_steps, int) or isinstance(self.num_steps, bool) or self.num_steps < 10:
            raise ValueError(f"LRRangeTest.num_steps must be an integer >= 10, got {self.num_steps!r}.")
        if self.rule not in SELECTION_RULES:
            raise ValueError(f"LRRangeTest.rule must be one of {SELECTION_RULES}, got {self.rule!r}.")
        check_positive("LRRangeTest.divisor", self.divisor)
        if not (isinstance(self.divergence_threshold, (int, float)) and self.divergence_threshold > 1):
            raise ValueError(
                f"LRRangeTest.divergence_threshold must be > 1 (a multiple of the best loss), got "
                f"{self.divergence_threshold!r}."
            )
        if not (isinstance(self.smoothing, (int, float)) and 0 <= self.smoothing < 1):
            raise ValueError(f"LRRangeTest.smoothing must be in [0, 1), got {self.smoothing!r}.")

    @property
    def min_points(self) -> int:
        """Finite losses the sweep must record before a divergence for the curve to be usable."""
        return max(5, self.num_steps // 10)


@dataclass
class RangeTestResult:
    """The recorded curve and the choice made from it.

    ``lrs[i]`` is the reference LR of sweep step ``i`` and ``losses[i]`` its loss (averaged over the
    accumulated batches and, under DDP, over ranks); the lists stop where the sweep stopped.
    """

    lrs: list[float]
    losses: list[float]
    suggestion: LRSuggestion
    stopped_early: bool
    config: LRRangeTest
    files: list[str] = field(default_factory=list)

    @property
    def lr(self) -> float:
        """The chosen LR."""
        return self.suggestion.lr

    def to_dict(self) -> dict[str, Any]:
        s = self.suggestion
        return {
            "lr": s.lr,
            "rule": s.rule,
            "lr_at_minimum": s.lr_at_minimum,
            "lr_steepest": s.lr_steepest,
            "lr_valley": s.lr_valley,
            "minimum_at_end": s.minimum_at_end,
            "stopped_early": self.stopped_early,
            "lrs": self.lrs,
            "losses": self.losses,
            "smoothed": s.smoothed,
            "config": {k: getattr(self.config, k) for k in self.config.__dataclass_fields__},
        }


# ----------------------------------------------------------------------------------------------
# exact save/restore of everything the sweep touches
# ----------------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else copy.deepcopy(value)


class TrainingStateSnapshot:
    """Copies of the module's tensors and of every other tensor the optimizers train (values and grads), the
    optimizers' state and hyper-parameters, the AMP grad scaler, the modules' train/eval flags, the RNG states
    and the given generators (the training loaders'); :meth:`restore` writes them back in place, so references
    held elsewhere (the optimizer's params, LightningOptimizer) stay valid."""

    def __init__(
        self,
        module: nn.Module,
        optimizers: list[torch.optim.Optimizer],
        scaler: Any = None,
        generators: Iterable[torch.Generator] = (),
    ) -> None:
        self.module, self.optimizers, self.scaler = module, optimizers, scaler
        # named_* with remove_duplicate=False would copy tied weights twice; once is enough.
        self.tensors = [(t, t.detach().clone()) for _, t in module.named_parameters()]
        self.tensors += [(b, b.detach().clone()) for _, b in module.named_buffers()]
        # The optimizers may also train tensors the module does not register (a learnable temperature held as a
        # plain attribute, a tensor of a helper object): the sweep changes them too.
        trained = list(module.parameters())
        seen = {id(t) for t, _ in self.tensors}
        for opt in optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        trained.append(p)
                        self.tensors.append((p, p.detach().clone()))
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in trained]
        self.modes = [(m, m.training) for m in module.modules()]
        self.opt_state = [
            {p: {k: _clone(v) for k, v in st.items()} for p, st in opt.state.items()} for opt in optimizers
        ]
        self.opt_groups = [
            [{k: _clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
            for opt in optimizers
        ]
        self.scaler_state = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
        self.rng = _rng_state()
        # A seeded DataLoader(generator=...) draws its shuffle order and workers' base seed from its own
        # generator, which the global RNG state does not cover.
        self.generators = [(g, g.get_state()) for g in generators]
        self.fresh_metrics = self._fresh_metrics(module)

    @staticmethod
    def _fresh_metrics(module: nn.Module) -> list[nn.Module]:
        # torchmetrics states are plain attributes, not buffers; metrics nobody has updated yet are
        # reset afterwards, so steps of the sweep do not count towards the first epoch's metrics.
        try:
            from torchmetrics import Metric
        except ImportError:  # pragma: no cover - torchmetrics is a Lightning dependency
            return []
        return [m for m in module.modules() if isinstance(m, Metric) and m.update_count == 0]

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in self.tensors:
            live.copy_(saved)
        for p, g in self.grads:
            p.grad = g
        for m, training in self.modes:
            m.training = training
        for opt, state, groups in zip(self.optimizers, self.opt_state, self.opt_groups):
            opt.state.clear()
            opt.state.update(state)
            for live_group, saved_group in zip(opt.param_groups, groups):
                for key in [k for k in live_group if k != "params" and k not in saved_group]:
                    del live_group[key]
                for key, value in saved_group.items():
                    if isinstance(live_group.get(key), Tensor) and isinstance(value, Tensor):
                        live_group[key].copy_(value)
                    else:
                        live_group[key] = value
        if self.scaler is not None:
            self.scaler.load_state_dict(self.scaler_state)
        _set_rng_state(self.rng)
        for generator, state in self.generators:
            generator.set_state(state)
        for metric in self.fresh_metrics:
            metric.reset()  # type: ignore[operator]


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------


@contextmanager
def _training_step_scope(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Let ``self.log`` inside ``training_step`` work during the sweep, then drop what it logged.

    ``self.log`` refuses to run outside a hook the Trainer called, and what it records lands in the fit
    loop's results; both go through Lightning's private API, in :mod:`lightning_speedup._compat`.
    """
    from lightning_speedup._compat import reset_logged_results, running_hook

    try:
        with running_hook(pl_module, "training_step"):
            yield
    finally:
        reset_logged_results(trainer)


def _private_loader(loader: DataLoader) -> DataLoader:
    """A loader over the same data that shares no iterator with ``loader``.

    A DataLoader with ``persistent_workers=True`` keeps one iterator for its lifetime and hands it to
    every ``iter()``. The sweep runs after the fit loop has started iterating the training loader, so
    sweeping the same object would advance the fit loop's own iterator: the first epoch would then
    see only the batches the sweep left over and end without validation. The copy has the same
    dataset, batch sampler, collate function and workers, and closes its workers when the sweep ends.
    """
    if not (loader.num_workers > 0 and loader.persistent_workers):
        return loader
    extra = {"in_order": loader.in_order} if hasattr(loader, "in_order") else {}  # torch >= 2.6
    return DataLoader(
        loader.dataset,
        batch_sampler=loader.batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=False,
        pin_memory_device=loader.pin_memory_device,
        **extra,
    )


def _training_loaders(trainer: pl.Trainer) -> Any:
    if trainer.train_dataloader is None:
        # The loaders are built lazily: with max_steps (or total_steps) nothing has asked for them before
        # on_fit_start. Load them the way trainer.estimated_stepping_batches does.
        trainer.fit_loop.setup_data()
    iterables = trainer.train_dataloader
    if iterables is None:
        raise ValueError("The LR range test needs a training dataloader, and the Trainer has none.")
    return iterables


def _loader_generators(iterables: Any) -> list[torch.Generator]:
    """The distinct generators of the loaders in ``iterables``: the loader's own and its samplers'."""
    from lightning_utilities.core.apply_func import apply_to_collection

    found: dict[int, torch.Generator] = {}

    def collect(loader: DataLoader) -> DataLoader:
        batch_sampler = loader.batch_sampler
        for owner in (loader, loader.sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator):
                found.setdefault(id(generator), generator)
        return loader

    apply_to_collection(iterables, DataLoader, collect)
    return list(found.values())


def _endless_batches(iterables: Any) -> Iterator[tuple[Any, int, int]]:
    from lightning.pytorch.utilities.combined_loader import CombinedLoader
    from lightning_utilities.core.apply_func import apply_to_collection

    combined = CombinedLoader(
        apply_to_collection(iterables, DataLoader, _private_loader), mode="max_size_cycle"
    )
    while True:
        produced = False
        for batch, batch_idx, dataloader_idx in combined:
            produced = True
            yield batch, batch_idx, dataloader_idx
        if not produced:
            raise ValueError("The training dataloader yielded no batch; the LR range test needs data.")


def _loss_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    raise ValueError(
        "During the LR range test training_step returned "
        f"{type(output).__name__}; the range test needs the loss (a Tensor or a dict with 'loss') every "
        "step. Pass a number as the peak LR instead of 'auto'."
    )


def _set_group_lr(group: dict[str, Any], lr: float) -> None:
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


def run_range_test(
    trainer: pl.Trainer, pl_module: pl.LightningModule, config: LRRangeTest, reference_lr: float
) -> RangeTestResult:
    """Run the sweep on the Trainer's single optimizer and return the curve and the chosen LR.

    Each param group's LR is ``sweep_lr * group_lr / reference_lr``, so groups keep their ratios.
    Call it after Lightning built the optimizers (``on_fit_start``). Every rank must call it.

    Raises:
        ValueError: manual optimization, several optimizers, no data or no loss.
        RangeTestDivergedError: the loss diverged before ``config.min_points`` steps, or never fell.
    """
    from lightning.pytorch.plugins.precision.precision import Precision
    from lightning.pytorch.utilities.enums import GradClipAlgorithmType

    from lightning_speedup._compat import before_batch_transfer

    if not pl_module.automatic_optimization:
        raise ValueError(
            "The LR range test ('auto') needs automatic optimization; this module steps its optimizers itself. "
            "Pass a number as the peak LR."
        )
    optimizers = list(trainer.optimizers)
    if len(optimizers) != 1:
        raise ValueError(
            f"The LR range test ('auto') needs exactly one optimizer, found {len(optimizers)}. Pass a number "
            "(or one per param group) as the peak LR."
        )
    optimizer = optimizers[0]
    strategy = trainer.strategy
    precision: Precision = trainer.precision_plugin
    scaler = getattr(precision, "scaler", None)
    accumulate = max(1, int(trainer.accumulate_grad_batches))
    clip_val = trainer.gradient_clip_val
    clip_algorithm = GradClipAlgorithmType(trainer.gradient_clip_algorithm or "norm")
    ratios = [float(g["lr"]) / reference_lr for g in optimizer.param_groups]
    lrs = exponential_lrs(config.min_lr, config.max_lr, config.num_steps)
    losses: list[float] = []
    stopped_early = False

    # The training batches reach training_step through GPUAugment (uint8 images become floats there), so the
    # sweep's batches do too; the training run's augmentation stream is left as it was.
    from lightning_speedup.data.gpu_augment import GPUAugment

    augmenters = [cb for cb in trainer.callbacks if isinstance(cb, GPUAugment)]
    loaders = _training_loaders(trainer)
    snapshot = TrainingStateSnapshot(pl_module, optimizers, scaler, _loader_generators(loaders))
    batches = _endless_batches(loaders)
    try:
        with _training_step_scope(trainer, pl_module), torch.enable_grad():
            pl_module.train()
            running, best = math.nan, math.inf
            for lr in lrs:
                for group, ratio in zip(optimizer.param_groups, ratios):
                    _set_group_lr(group, lr * ratio)
                optimizer.zero_grad(set_to_none=True)
                total = torch.zeros((), device=strategy.root_device)
                for micro in range(accumulate):
                    batch, batch_idx, dataloader_idx = next(batches)
                    # The training loop's path to training_step: the precision's input conversion, the
                    # on_before_batch_transfer hook, then the transfer (which runs on_after_batch_transfer).
                    batch = precision.convert_input(batch)
                    batch = before_batch_transfer(pl_module, batch, dataloader_idx)
                    batch = strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)
                    for augmenter in augmenters:
                        augmenter.augment_outside_stream(trainer, batch, len(losses) * accumulate + micro)
                    loss = _loss_of(strategy.training_step(batch, batch_idx)) / accumulate
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    total += loss.detach().float()
                if clip_val:
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    precision.clip_gradients(optimizer, clip_val, clip_algorithm)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                # Averaged over ranks, so every rank sees the same curve and stops at the same step.
                value = float(strategy.reduce(total, reduce_op="mean"))
                losses.append(value)
                if not math.isfinite(value):
                    stopped_early = True
                    break
                running = (
                    value
                    if math.isnan(running)
                    else config.smoothing * running + (1 - config.smoothing) * value
                )
                best = min(best, running)
                # running - best > (k - 1) |best| is running > k * best for positive losses, and still
                # meaningful for losses that can go negative (log-likelihoods).
                if running - best > (config.divergence_threshold - 1) * abs(best):
                    stopped_early = True
                    break
    finally:
        batches.close()  # releases the DataLoader iterator (and its workers, unless persistent)
        snapshot.restore()

    finite = next((i for i, v in enumerate(losses) if not math.isfinite(v)), len(losses))
    curve_lrs, curve = lrs[:finite], losses[:finite]
    fix = (
        f"Start the sweep lower (LRRangeTest(min_lr={config.min_lr / 100:g})), check that the loss is finite at "
        "small LRs, or pass a number as the peak LR instead of 'auto'."
    )
    if len(curve) < config.min_points:
        last = losses[-1] if losses else math.nan
        raise RangeTestDivergedError(
            f"The LR range test diverged immediately: the loss was {last:.4g} at lr={lrs[len(losses) - 1]:.3g} "
            f"after {len(losses)} of {config.num_steps} sweep steps (at least {config.min_points} finite, "
            f"non-diverging steps are needed). {fix}"
        )
    suggestion = select_lr(curve_lrs, curve, rule=config.rule, divisor=config.divisor)
    if suggestion.index_minimum == 0:
        raise RangeTestDivergedError(
            f"The LR range test found no LR at which the loss falls: the smoothed loss is lowest at the first "
            f"sweep step (lr={curve_lrs[0]:.3g}) and only rises after it. {fix}"
        )
    # Identical on every rank already (the losses are reduced); broadcasting guards against float drift.
    lr = float(strategy.broadcast(suggestion.lr, src=0))
    if lr != suggestion.lr:
        suggestion = LRSuggestion(**{**suggestion.__dict__, "lr": lr})
    return RangeTestResult(
        lrs=curve_lrs, losses=curve, suggestion=suggestion, stopped_early=stopped_early, config=config
    )


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------


def save_range_test(
    result: RangeTestResult, directory: str | Path, name: str = "lr_range_test"
) -> list[Path]:
    """Write the curve as ``<name>.json`` and a loss-vs-LR plot as ``<name>.png``; return the paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{name}.json"
    json_path.write_text(json.dumps(result.to_dict(), indent=1))

    s = result.suggestion
    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
    ax.plot(result.lrs, s.smoothed, color="C0", lw=2, label="smoothed")
    ax.axvline(s.lr_at_minimum, color="C3", ls=":", label=f"minimum {s.lr_at_minimum:.2g}")
    ax.axvline(s.lr, color="C2", ls="--", label=f"chosen {s.lr:.2g} ({s.rule})")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    lo, hi = min(s.smoothed), max(s.smoothed[: s.index_minimum + 1])
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-12), hi + 0.3 * (hi - lo + 1e-12))
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    png_path = directory / f"{name}.png"
    fig.savefig(png_path)
    return [json_path, png_path]


def describe(result: RangeTestResult) -> str:
    """One paragraph for the log: the choice, the rule and a coarse view of the curve."""
    s = result.suggestion
    n = len(result.lrs)
    picks = sorted({round(i * (n - 1) / 7) for i in range(8)})
    curve = ", ".join(f"{result.lrs[i]:.1e}:{result.losses[i]:.3g}" for i in picks)
    end = "stopped at divergence" if result.stopped_early else "reached the end of the sweep"
    return (
        f"LR range test: {n} steps from {result.lrs[0]:.1e} to {result.lrs[-1]:.1e} ({end}); smoothed loss "
        f"lowest at lr={s.lr_at_minimum:.3g}, steepest at {s.lr_steepest:.3g}, valley at {s.lr_valley:.3g}; "
        f"chosen lr={s.lr:.3g} by rule {s.rule}. Curve (lr:loss): {curve}"
    )
