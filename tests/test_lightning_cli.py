"""Every public callback, strategy and precision plugin can be configured from a LightningCLI YAML.

Each case builds a real ``LightningCLI`` (``run=False``) from a config with ``class_path`` + ``init_args``
and checks that the init args reached the instance the Trainer holds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, TensorDataset

import lightning_speedup as ls

pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse[signatures] (dev extra)")


class TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 4, generator=g)), batch_size=4)


def _callback(trainer: L.Trainer, cls: type) -> Any:
    found = [cb for cb in trainer.callbacks if isinstance(cb, cls)]
    assert len(found) == 1, trainer.callbacks
    return found[0]


Check = Callable[[L.Trainer], None]


def _async(t: L.Trainer) -> None:
    assert _callback(t, ls.AsyncProgressBarMetrics).max_lag == 3


def _stall(t: L.Trainer) -> None:
    cb = _callback(t, ls.DataStallMonitor)
    assert (cb.threshold, cb.window) == (0.25, 7)


def _gpu_augment(t: L.Trainer) -> None:
    cb = _callback(t, ls.GPUAugment)
    assert cb.seed == 5
    assert repr(cb.pipeline) == repr(
        ls.GPUAugment(ls.augment.RandomCrop(28, padding=2), ls.augment.RandomHorizontalFlip()).pipeline
    )


def _prefetch(t: L.Trainer) -> None:
    assert _callback(t, ls.GPUPrefetcher).depth == 3


def _one_cycle(t: L.Trainer) -> None:
    cb = _callback(t, ls.OneCycle)
    assert (cb.peak_lr, cb.total_steps, cb.pct_start) == (0.4, 50, 0.25)


def _one_cycle_auto(t: L.Trainer) -> None:
    cb = _callback(t, ls.OneCycle)
    assert cb.peak_lr == "auto"
    assert isinstance(cb.range_test, ls.LRRangeTest) and cb.range_test.num_steps == 12


def _cosine(t: L.Trainer) -> None:
    cb = _callback(t, ls.WarmupCosine)
    assert (cb.peak_lr, cb.warmup) == (0.2, 0.1)


def _wsd(t: L.Trainer) -> None:
    cb = _callback(t, ls.WarmupStableDecay)
    assert (cb.peak_lr, cb.decay, cb.decay_shape) == (0.3, 0.3, "linear")


def _compressed(t: L.Trainer) -> None:
    s = t.strategy
    assert isinstance(s, ls.CompressedDDPStrategy)
    assert (s.compression, s.powersgd_rank, s.start_iter, s.min_compression_rate) == ("powersgd", 8, 5, 1.5)


def _diloco(t: L.Trainer) -> None:
    s = t.strategy
    assert isinstance(s, ls.DiLoCoStrategy)
    assert (s.sync_every, s.outer_lr, s.warmup_steps) == (7, 0.5, 2)


def _gossip(t: L.Trainer) -> None:
    s = t.strategy
    assert isinstance(s, ls.GossipSGDStrategy)
    assert (s.topology, s.gossip_every) == ("exponential", 2)


def _local_sgd(t: L.Trainer) -> None:
    s = t.strategy
    assert isinstance(s, ls.LocalSGDStrategy)
    assert (s.sync_every, s.consensus_every) == (9, 0)


def _averaging(t: L.Trainer) -> None:
    s = t.strategy
    assert type(s) is ls.ParameterAveragingStrategy
    assert s.bucket_cap_mb == 8.0


def _qat(t: L.Trainer) -> None:
    p = t.precision_plugin
    assert isinstance(p, ls.QATPrecision)
    assert (p.precision, p.start_step) == ("32-true", 3)


def _pipeline(t: L.Trainer) -> None:
    s = t.strategy
    assert isinstance(s, ls.PipelineStrategy)
    assert (s.schedule_name, s.n_microbatches_arg, s.stages_per_rank, s.balance) == (
        "interleaved_1f1b",
        8,
        2,
        "time",
    )


def _compile(t: L.Trainer) -> None:
    (c,) = [c for c in t.callbacks if isinstance(c, ls.Compile)]
    assert (c.scope, c.auto, c.backend, c.measure_steps) == ("full", True, "eager", 3)


def _sdpa_backends(t: L.Trainer) -> None:
    (c,) = [c for c in t.callbacks if isinstance(c, ls.SDPABackends)]
    assert c.backends == ("flash", "math")


def _eager_graphs(t: L.Trainer) -> None:
    (c,) = [c for c in t.callbacks if isinstance(c, ls.EagerCUDAGraphs)]
    assert (c.module_attr, c.num_warmup_iters) == ("body", 5)


CASES: dict[str, tuple[dict[str, Any], Check]] = {
    "AsyncProgressBarMetrics": (
        {
            "callbacks": [
                {"class_path": "lightning_speedup.AsyncProgressBarMetrics", "init_args": {"max_lag": 3}}
            ]
        },
        _async,
    ),
    "DataStallMonitor": (
        {
            "callbacks": [
                {
                    "class_path": "lightning_speedup.DataStallMonitor",
                    "init_args": {"threshold": 0.25, "window": 7},
                }
            ]
        },
        _stall,
    ),
    "GPUAugment": (
        {
            "callbacks": [
                {
                    "class_path": "lightning_speedup.GPUAugment",
                    "init_args": {
                        "ops": [
                            {
                                "class_path": "lightning_speedup.augment.RandomCrop",
                                "init_args": {"size": 28, "padding": 2},
                            },
                            {"class_path": "lightning_speedup.augment.RandomHorizontalFlip"},
                        ],
                        "seed": 5,
                    },
                }
            ]
        },
        _gpu_augment,
    ),
    "GPUPrefetcher": (
        {"callbacks": [{"class_path": "lightning_speedup.GPUPrefetcher", "init_args": {"depth": 3}}]},
        _prefetch,
    ),
    "OneCycle": (
        {
            "callbacks": [
                {
                    "class_path": "lightning_speedup.OneCycle",
                    "init_args": {"max_lr": 0.4, "total_steps": 50, "pct_start": 0.25},
                }
            ]
        },
        _one_cycle,
    ),
    "OneCycle+LRRangeTest": (
        {
            "callbacks": [
                {
                    "class_path": "lightning_speedup.OneCycle",
                    "init_args": {
                        "max_lr": "auto",
                        "range_test": {
                            "class_path": "lightning_speedup.LRRangeTest",
                            "init_args": {"num_steps": 12},
                        },
                    },
                }
            ]
        },
        _one_cycle_auto,
    ),
    "WarmupCosine": (
        {
            "callbacks": [
                {"class_path": "lightning_speedup.WarmupCosine", "init_args": {"peak_lr": 0.2, "warmup": 0.1}}
            ]
        },
        _cosine,
    ),
    "WarmupStableDecay": (
        {
            "callbacks": [
                {
                    "class_path": "lightning_speedup.WarmupStableDecay",
                    "init_args": {"peak_lr": 0.3, "decay": 0.3, "decay_shape": "linear"},
                }
            ]
        },
        _wsd,
    ),
    "CompressedDDPStrategy": (
        {
            "accelerator": "cpu",
            "strategy": {
                "class_path": "lightning_speedup.CompressedDDPStrategy",
                "init_args": {
                    "compression": "powersgd",
                    "rank": 8,
                    "start_iter": 5,
                    "min_compression_rate": 1.5,
                },
            },
        },
        _compressed,
    ),
    "PipelineStrategy": (
        {
            "accelerator": "cpu",
            "strategy": {
                "class_path": "lightning_speedup.PipelineStrategy",
                "init_args": {
                    "schedule": "interleaved_1f1b",
                    "n_microbatches": 8,
                    "stages_per_rank": 2,
                    "balance": "time",
                },
            },
        },
        _pipeline,
    ),
    "Compile": (
        {
            "callbacks": [
                {
                    "class_path": "lightning_speedup.Compile",
                    "init_args": {"scope": "full", "auto": True, "backend": "eager", "measure_steps": 3},
                }
            ]
        },
        _compile,
    ),
    "EagerCUDAGraphs": (
        {
            "callbacks": [
                {
                    "class_path": "lightning_speedup.EagerCUDAGraphs",
                    "init_args": {"module_attr": "body", "num_warmup_iters": 5},
                }
            ]
        },
        _eager_graphs,
    ),
    "SDPABackends": (
        {
            "callbacks": [
                {"class_path": "lightning_speedup.SDPABackends", "init_args": {"backends": ["flash", "math"]}}
            ]
        },
        _sdpa_backends,
    ),
    "DiLoCoStrategy": (
        {
            "accelerator": "cpu",
            "strategy": {
                "class_path": "lightning_speedup.DiLoCoStrategy",
                "init_args": {"sync_every": 7, "outer_lr": 0.5, "warmup_steps": 2},
            },
        },
        _diloco,
    ),
    "GossipSGDStrategy": (
        {
            "accelerator": "cpu",
            "strategy": {
                "class_path": "lightning_speedup.GossipSGDStrategy",
                "init_args": {"topology": "exponential", "gossip_every": 2},
            },
        },
        _gossip,
    ),
    "LocalSGDStrategy": (
        {
            "accelerator": "cpu",
            "strategy": {
                "class_path": "lightning_speedup.LocalSGDStrategy",
                "init_args": {"sync_every": 9, "consensus_every": 0},
            },
        },
        _local_sgd,
    ),
    "ParameterAveragingStrategy": (
        {
            "accelerator": "cpu",
            "strategy": {
                "class_path": "lightning_speedup.ParameterAveragingStrategy",
                "init_args": {"bucket_cap_mb": 8.0},
            },
        },
        _averaging,
    ),
    "QATPrecision": (
        {
            "plugins": [
                {
                    "class_path": "lightning_speedup.QATPrecision",
                    "init_args": {"weights": "int8", "base": "32-true", "start_step": 3},
                }
            ]
        },
        _qat,
    ),
}


def test_every_public_class_has_a_case() -> None:
    """A new public callback, strategy or plugin must get a config case here."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.strategies import Strategy

    configurable = {
        name
        for name in ls.__all__
        if isinstance(getattr(ls, name), type)
        and issubclass(getattr(ls, name), (Callback, Strategy, Precision))
        and name != "LRScheduleCallback"  # the abstract base of the schedules
    }
    covered = {name.split("+")[0] for name in CASES}
    assert configurable == covered


@pytest.mark.parametrize("name", sorted(CASES))
def test_configurable_from_yaml(name: str, tmp_path: Path) -> None:
    trainer_config, check = CASES[name]
    config = {"trainer": {"logger": False, "enable_checkpointing": False, "devices": 1, **trainer_config}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = LightningCLI(TinyModule, run=False, args=["--config", str(path)], save_config_callback=None)
    check(cli.trainer)


def test_a_real_fit_from_yaml(tmp_path: Path) -> None:
    """``fit`` from a config with a schedule callback and a strategy of this project, on CPU."""
    config = {
        "trainer": {
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 4,
            "strategy": {"class_path": "lightning_speedup.DiLoCoStrategy", "init_args": {"sync_every": 2}},
            "callbacks": [{"class_path": "lightning_speedup.OneCycle", "init_args": {"max_lr": 0.3}}],
        }
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        cli = LightningCLI(TinyModule, args=["fit", "--config", str(path)], save_config_callback=None)
    finally:
        if torch.distributed.is_initialized():  # the one-process fit ran here
            torch.distributed.destroy_process_group()
    assert cli.trainer.global_step == 4
    assert isinstance(cli.trainer.strategy, ls.DiLoCoStrategy) and cli.trainer.strategy.sync_every == 2
    schedule = _callback(cli.trainer, ls.OneCycle)
    assert schedule.steps_taken == [4] and schedule.peak_lrs == [[0.3]]
