"""Lightning's private API that lightning_speedup relies on still exists and behaves as assumed.

Every private attribute or method the package touches goes through :mod:`lightning_speedup._compat`; each
test here checks one of those functions against the installed Lightning in a real (tiny, CPU) Trainer run,
so a Lightning release that changes one fails here, by name, instead of in a user's run. Run against the
oldest supported Lightning by ``make test-lightning-oldest`` and the newest by ``make test``.
"""

from __future__ import annotations

import csv
import inspect
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

import lightning_speedup  # noqa: F401  (registers the strategy strings)
from lightning_speedup._compat import (
    DDP_OVERRIDES,
    LAUNCHER_RECOVER,
    LAUNCHER_RECOVER_PARAMETERS,
    StrategyRegistryType,
    batches_done_on_resume,
    before_batch_transfer,
    check_ddp_overrides,
    current_hook,
    ddp_kwargs,
    ddp_layer_sync,
    has_trainer,
    launch_with_main_process_hook,
    logged_step,
    optimizer_to_device,
    reset_logged_results,
    running_hook,
    set_module_device,
)
from lightning_speedup.distributed import (
    CompressedDDPStrategy,
    DiLoCoStrategy,
    GossipSGDStrategy,
    LocalSGDStrategy,
)
from lightning_speedup.distributed.averaging import ParameterAveragingStrategy
from lightning_speedup.metrics import _TRAIN_STEP_HOOKS
from lightning_speedup.pipeline import PipelineStrategy
from tests.distributed.helpers import run_processes

REPO_ROOT = Path(__file__).resolve().parents[1]
OUR_STRATEGIES = [
    ParameterAveragingStrategy,
    LocalSGDStrategy,
    DiLoCoStrategy,
    GossipSGDStrategy,
    CompressedDDPStrategy,
    PipelineStrategy,
]


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: faster for these tiny models on a shared machine, and a process that ran
    multi-threaded CPU kernels can hang the processes it forks later (the DDP test, later test modules)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Tiny(L.LightningModule):
    """A linear model with BatchNorm on fixed random data; records which hook ``_compat`` says is running."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
        self.hooks: dict[str, set[str | None]] = {}
        self.attached: list[bool] = []

    def _seen(self, where: str) -> None:
        self.hooks.setdefault(where, set()).add(current_hook(self))
        self.attached.append(has_trainer(self))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self._seen("training_step")
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._seen("validation_step")

    @override
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        self._seen("optimizer_step")
        super().optimizer_step(*args, **kwargs)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def loader(n: int = 32, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)), batch_size
    )


def trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("accelerator", "cpu")
    kwargs.setdefault("devices", 1)
    return L.Trainer(
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


class HookProbe(L.Callback):
    """Records what ``current_hook`` says inside callback hooks (where the schedules and metrics callbacks log)."""

    def __init__(self) -> None:
        self.hooks: dict[str, set[str | None]] = {}

    @override
    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        self.hooks.setdefault("on_before_optimizer_step", set()).add(current_hook(pl_module))


# ---------------------------------------------------------------------------------------------- LightningModule


def test_current_hook_names_the_hook_the_trainer_is_running(tmp_path: Path) -> None:
    """``_current_fx_name`` is the running hook in steps, ``optimizer_step`` and callback hooks; None outside."""
    module, probe = Tiny(), HookProbe()
    assert current_hook(module) is None and not has_trainer(module)
    t = trainer(tmp_path, max_steps=3, limit_val_batches=1, val_check_interval=2, callbacks=[probe])
    t.fit(module, loader(), loader())
    assert module.hooks == {
        "training_step": {"training_step"},
        "validation_step": {"validation_step"},
        # averaging.py logs from the strategy's optimizer_step, which runs inside this hook
        "optimizer_step": {"optimizer_step"},
    }
    assert probe.hooks == {"on_before_optimizer_step": {"on_before_optimizer_step"}}
    assert all(module.attached)
    assert current_hook(module) is None  # restored after fit


def test_the_hooks_metrics_treats_as_per_step_log_on_step_by_default() -> None:
    """``metrics._TRAIN_STEP_HOOKS`` mirrors Lightning's table of where ``self.log`` defaults to on_step only."""
    from lightning.pytorch.trainer.connectors.logger_connector.fx_validator import _FxValidator

    for hook in _TRAIN_STEP_HOOKS:
        options = _FxValidator.functions[hook]
        assert options is not None, hook
        assert options["default_on_step"] and not options["default_on_epoch"], hook


class LogOutsideTheLoop(L.Callback):
    """Logs under ``running_hook`` before training (as the LR range test does), then drops it or not."""

    def __init__(self, reset: bool) -> None:
        self.reset = reset
        self.inside: str | None = None
        self.after: str | None = None

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        with running_hook(pl_module, "training_step"):
            self.inside = current_hook(pl_module)
            pl_module.log("probe", 123.0, prog_bar=True)
        self.after = current_hook(pl_module)
        if self.reset:
            reset_logged_results(trainer)


@pytest.mark.parametrize("reset", [False, True])
def test_running_hook_lets_log_work_and_reset_logged_results_drops_it(tmp_path: Path, reset: bool) -> None:
    probe = LogOutsideTheLoop(reset)
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    t.callbacks.append(probe)
    t.fit(Tiny(), loader())
    assert probe.inside == "training_step"
    assert probe.after == "on_train_start"  # the hook name in force before is restored
    if reset:
        assert "probe" not in t.callback_metrics and "probe" not in t.progress_bar_metrics
    else:  # without the reset the value would reach the first step's metrics
        assert t.callback_metrics["probe"].item() == 123.0


class TaggingModule(Tiny):
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return ("module", dataloader_idx, batch) if isinstance(batch, str) else batch


class TaggingData(L.LightningDataModule):
    def train_dataloader(self) -> Any:
        return loader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return ("datamodule", dataloader_idx, batch) if isinstance(batch, str) else batch


class BeforeTransferProbe(L.Callback):
    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen = before_batch_transfer(pl_module, "batch", 0)


@pytest.mark.parametrize("datamodule", [False, True])
def test_before_batch_transfer_calls_the_hook_the_training_loop_calls(
    tmp_path: Path, datamodule: bool
) -> None:
    """The module's ``on_before_batch_transfer``, or the datamodule's where it defines one (Lightning's choice)."""
    probe = BeforeTransferProbe()
    t = trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[probe])
    if datamodule:
        t.fit(TaggingModule(), datamodule=TaggingData())
    else:
        t.fit(TaggingModule(), loader())
    assert probe.seen == ("datamodule" if datamodule else "module", 0, "batch")
    assert before_batch_transfer(TaggingModule(), "batch") == ("module", 0, "batch")  # no Trainer: its own


def test_set_module_device_changes_device_without_moving_tensors() -> None:
    module = Tiny()
    set_module_device(module, torch.device("meta"))
    assert module.device == torch.device("meta")
    assert all(p.device.type == "cpu" for p in module.parameters())


# ---------------------------------------------------------------------------------------------- Trainer


class StepProbe(L.Callback):
    """Records ``logged_step`` and the optimizer steps taken so far at the start of every batch."""

    def __init__(self) -> None:
        self.seen: list[tuple[int | None, int]] = []

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int
    ) -> None:
        self.seen.append((logged_step(trainer), trainer.global_step))


def test_logged_step_counts_optimizer_steps_with_accumulation(tmp_path: Path) -> None:
    """``_batches_that_stepped`` counts optimizer steps, not batches, when gradients accumulate."""
    probe = StepProbe()
    t = trainer(
        tmp_path,
        max_epochs=1,
        accumulate_grad_batches=2,
        log_every_n_steps=1,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path),
        callbacks=[probe],
    )
    t.fit(Tiny(), loader(n=32))  # 8 batches, 4 optimizer steps
    assert [step for step, _ in probe.seen] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(step == global_step for step, global_step in probe.seen)


class _SaveMidEpoch(L.Callback):
    """Saves a checkpoint in ``on_train_batch_end`` of one batch (as ``ModelCheckpoint(every_n_train_steps=...)``
    does) and records what ``batches_done_on_resume`` says then; on a resumed fit, records the first batch."""

    def __init__(self, path: Path, at: int) -> None:
        self.path, self.at = path, at
        self.said: tuple[int, bool] | None = None
        self.first: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self.first is None:
            self.first = args[-1]  # batch_idx

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if args[-1] == self.at and self.said is None and trainer.current_epoch == 1:
            trainer.save_checkpoint(self.path)
            self.said = batches_done_on_resume(trainer)


def test_batches_done_on_resume_is_where_the_resumed_loop_starts(tmp_path: Path) -> None:
    """The count a mid-epoch loader resumes from is the batch the fit loop resumes at; where the release trains the
    saved batch again (before Lightning 2.5), the function says so."""
    path = tmp_path / "mid.ckpt"
    saving = _SaveMidEpoch(path, at=2)
    trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[saving]).fit(Tiny(), loader(n=32))
    assert saving.said is not None
    resumed = _SaveMidEpoch(tmp_path / "unused.ckpt", at=-1)
    trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[resumed]).fit(
        Tiny(), loader(n=32), ckpt_path=path
    )
    done, repeats = saving.said
    assert resumed.first == done
    assert done == (2 if repeats else 3)  # batches 0-2 ran before the save


def test_logged_step_is_where_learning_rate_monitor_logs(tmp_path: Path) -> None:
    """The steps with logs are those ``LearningRateMonitor`` writes at, so the schedules' values line up."""
    probe = StepProbe()
    logger = CSVLogger(tmp_path, name="lr")
    t = trainer(
        tmp_path,
        max_epochs=1,
        accumulate_grad_batches=2,
        log_every_n_steps=3,
        limit_val_batches=0,
        logger=logger,
        callbacks=[LearningRateMonitor("step"), probe],
    )
    t.fit(Tiny(), loader(n=64))  # 16 batches, 8 optimizer steps
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        monitor_steps = sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("lr-SGD")})
    ours = sorted({step for step, _ in probe.seen if step is not None})
    assert ours == monitor_steps == [2, 5]


def test_logged_step_is_none_without_a_logger(tmp_path: Path) -> None:
    probe = StepProbe()
    trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[probe]).fit(Tiny(), loader())
    assert probe.seen == [(None, 0), (None, 1)]


# ---------------------------------------------------------------------------------------------- optimizers


def test_optimizer_to_device_moves_state_but_not_step() -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    optimizer_to_device(opt, torch.device("meta"))
    for state in opt.state.values():
        assert state["exp_avg"].device.type == "meta" and state["exp_avg_sq"].device.type == "meta"
        assert state["step"].device.type == "cpu"


# ---------------------------------------------------------------------------------------------- registry


def test_strategy_registry_type_and_entry_layout() -> None:
    """``register_strategies`` receives a ``_StrategyRegistry``; ``_registry`` reads entries' ``"strategy"``."""
    assert isinstance(StrategyRegistry, StrategyRegistryType)
    assert StrategyRegistry["ddp"]["strategy"] is DDPStrategy
    assert StrategyRegistry["diloco"]["strategy"] is DiLoCoStrategy
    assert StrategyRegistry["diloco"]["init_params"]["sync_every"] == 100


# ---------------------------------------------------------------------------------------------- DDPStrategy


@pytest.mark.parametrize("cls", [DDPStrategy, *OUR_STRATEGIES], ids=lambda c: c.__name__)
def test_overridden_ddp_methods_exist_with_the_signatures_we_override(cls: type[DDPStrategy]) -> None:
    assert check_ddp_overrides(cls) == []


def test_check_ddp_overrides_reports_an_override_that_no_longer_fits() -> None:
    class Drifted(DDPStrategy):
        def _setup_model(self, model: nn.Module, extra: int = 0) -> nn.Module:  # type: ignore[override]
            return model

    assert check_ddp_overrides(Drifted) == [
        "Drifted._setup_model takes ('model', 'extra'), DDPStrategy's ('model',)"
    ]


def _assigned_private_attributes(cls: type) -> set[str]:
    """Private attribute names the source of ``cls`` (and its lightning_speedup bases) assigns on ``self``."""
    import inspect

    names: set[str] = set()
    for k in cls.__mro__:
        if k.__module__.startswith("lightning_speedup"):
            names |= set(re.findall(r"self\.(_\w+)\s*(?::[^=\n]+)?=(?!=)", inspect.getsource(k)))
    return names


@pytest.mark.parametrize("cls", OUR_STRATEGIES, ids=lambda c: c.__name__)
def test_our_strategies_shadow_no_private_name_of_ddp_strategy_but_the_overrides(cls: type) -> None:
    """A private name Lightning adds to ``DDPStrategy`` later must not collide with one of ours unnoticed."""
    theirs = {n for k in DDPStrategy.__mro__ for n in vars(k)} | set(vars(DDPStrategy()))
    ours = {
        n for k in cls.__mro__ if k.__module__.startswith("lightning_speedup") for n in vars(k)
    } | _assigned_private_attributes(cls)
    shared = {n for n in ours & theirs if n.startswith("_") and not n.startswith("__")} - {"_abc_impl"}
    assert shared <= set(DDP_OVERRIDES), sorted(shared - set(DDP_OVERRIDES))


def test_layer_sync_is_what_sync_batchnorm_gives_the_strategy() -> None:
    """``Trainer(sync_batchnorm=True)`` reaches the strategy as ``_layer_sync`` (the averaging strategies
    reject it there), and it converts BatchNorm to SyncBatchNorm."""
    plain = L.Trainer(accelerator="cpu", devices=1, strategy=DDPStrategy(), logger=False)
    assert ddp_layer_sync(plain.strategy) is None  # type: ignore[arg-type]
    synced = L.Trainer(
        accelerator="cpu", devices=1, strategy=LocalSGDStrategy(), sync_batchnorm=True, logger=False
    )
    layer_sync = ddp_layer_sync(synced.strategy)  # type: ignore[arg-type]
    assert layer_sync is not None
    assert isinstance(layer_sync.apply(Tiny()).net[1], nn.SyncBatchNorm)


class RecordingDDP(DDPStrategy):
    """DDP that records when Lightning calls the two private methods our strategies override."""

    calls: list[tuple[str, str]]
    find_unused: bool = False

    @override
    def _setup_model(self, model: nn.Module) -> DistributedDataParallel:
        self.calls.append(("_setup_model", type(model).__name__))
        return super()._setup_model(model)

    @override
    def _register_ddp_hooks(self) -> None:
        assert isinstance(self.model, DistributedDataParallel)
        self.calls.append(("_register_ddp_hooks", type(self.model).__name__))
        self.find_unused = self.model.find_unused_parameters
        super()._register_ddp_hooks()


def _ddp_fit_in_one_process(rank: int, world_size: int, root: Path) -> None:
    strategy = RecordingDDP(find_unused_parameters=True, process_group_backend="gloo")
    strategy.calls = []
    assert ddp_kwargs(strategy) == {"find_unused_parameters": True}
    trainer(root, strategy=strategy, max_steps=1, limit_val_batches=0).fit(Tiny(), loader())
    assert strategy.calls == [("_setup_model", "Tiny"), ("_register_ddp_hooks", "DistributedDataParallel")]
    assert strategy.find_unused  # the wrapper got _ddp_kwargs


def test_ddp_calls_setup_model_then_register_hooks_with_its_kwargs(tmp_path: Path) -> None:
    """In a real (one-process, gloo) DDP fit, Lightning wraps the module in ``_setup_model``, then calls
    ``_register_ddp_hooks`` on the wrapper, and forwards ``_ddp_kwargs`` to ``DistributedDataParallel``.

    The fit runs in a forked child, as the distributed tests' runs do, so that the test process is left with no
    process group of its own.
    """
    run_processes(_ddp_fit_in_one_process, 1, tmp_path)


# ---------------------------------------------------------------------------------------------- launcher

# What the hook saw in the launching process, one state dict per call (a module-level function and list: spawn
# pickles the launcher that holds the hook).
HOOK_STATES: list[dict[str, Tensor]] = []


def _record_state(module: nn.Module) -> None:
    HOOK_STATES.append({k: v.detach().clone() for k, v in module.state_dict().items()})


class HookedSpawnDDP(DDPStrategy):
    @override
    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        launch_with_main_process_hook(self, _record_state)


def test_the_launcher_method_we_override_takes_what_we_pass_on() -> None:
    method = getattr(_MultiProcessingLauncher, LAUNCHER_RECOVER, None)
    assert callable(method), f"_MultiProcessingLauncher.{LAUNCHER_RECOVER} no longer exists"
    assert tuple(inspect.signature(method).parameters)[1:] == LAUNCHER_RECOVER_PARAMETERS


def test_main_process_hook_runs_just_before_the_launcher_loads_the_trained_weights(tmp_path: Path) -> None:
    """With start method spawn, the launcher's ``_recover_results_in_main_process`` calls the hook once, with the
    launching process's own (untrained) module, and then loads the workers' weights file into that module.

    The launcher method is called here with the output a worker hands back (the end-to-end spawn run, with a
    module built on the meta device, is in tests/pipeline/test_strategy.py).
    """
    HOOK_STATES.clear()
    torch.manual_seed(0)
    model = Tiny()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = {k: v + 1 for k, v in before.items()}
    torch.save(trained, tmp_path / "weights.ckpt")
    run = trainer(tmp_path, strategy=HookedSpawnDDP(start_method="spawn", process_group_backend="gloo"))
    run.strategy.connect(model)
    extra = run.strategy.launcher.get_extra_results(run)  # type: ignore[union-attr]
    output = _WorkerOutput(None, str(tmp_path / "weights.ckpt"), run.state, None, extra)
    getattr(run.strategy.launcher, LAUNCHER_RECOVER)(output, run)
    assert len(HOOK_STATES) == 1
    for name, value in before.items():
        torch.testing.assert_close(HOOK_STATES[0][name], value, rtol=0, atol=0, msg=name)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)
    assert not (tmp_path / "weights.ckpt").exists()  # the launcher removes the file it loaded


def test_main_process_hook_leaves_the_popen_launcher_alone() -> None:
    """popen (the default): the launching process trains as rank 0, so there is nothing to load back."""
    plain = L.Trainer(accelerator="cpu", devices=1, strategy=HookedSpawnDDP(), logger=False)
    assert type(plain.strategy.launcher).__name__ == "_SubprocessScriptLauncher"


# ---------------------------------------------------------------------------------------------- the range


def test_the_supported_lightning_range_is_declared_once() -> None:
    """pyproject's lower bound on lightning is the version ``make test-lightning-oldest`` installs."""
    spec = re.search(r'^\s*"lightning([^"]*)"', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert spec, "pyproject.toml must list lightning in its dependencies"
    bounds = re.fullmatch(r">=([\d.]+),<([\d.]+)", spec.group(1))
    assert bounds, (
        f"pyproject.toml must bound lightning on both sides (>=oldest,<next minor), got {spec.group(1)!r}"
    )
    oldest = re.search(r"^LIGHTNING_OLDEST \?= (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE)
    assert oldest, "the Makefile must name the oldest supported Lightning as LIGHTNING_OLDEST"
    assert oldest.group(1) == bounds.group(1)
