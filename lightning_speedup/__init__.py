"""lightning_speedup: callbacks, strategies and precision plugins that make Lightning training faster.

``__all__`` is what a user adds to a ``Trainer`` (callbacks, strategies, the QAT precision plugin), the
GPU augmentation ops (``ls.augment``), quantization (``ls.quantization``), sweeps (``ls.tune``) and
:func:`check_strategy_name`. Importing this package is cheap (no Ray, no bitsandbytes) and registers
the project's strategy strings with Lightning's ``StrategyRegistry``. Heavy optional parts are
imported on first use: ``ls.tune`` (Ray Tune, imported when the attribute is first read) and the
``lightning_speedup.quantization`` kernels (bitsandbytes).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from lightning_speedup import _registry, quantization
from lightning_speedup._registry import check_strategy_name
from lightning_speedup.compile import Compile, EagerCUDAGraphs, SDPABackends
from lightning_speedup.data import (
    DataStallMonitor,
    DeviceResidentDataModule,
    GPUAugment,
    GPUPrefetcher,
    augment,
)
from lightning_speedup.distributed import (
    CompressedDDPStrategy,
    DiLoCoStrategy,
    GossipSGDStrategy,
    LocalSGDStrategy,
    ParameterAveragingStrategy,
)
from lightning_speedup.metrics import AsyncProgressBarMetrics
from lightning_speedup.pipeline import PipelineStrategy
from lightning_speedup.quantization import QATPrecision
from lightning_speedup.schedules import (
    LRRangeTest,
    LRScheduleCallback,
    OneCycle,
    RangeTestDivergedError,
    WarmupCosine,
    WarmupStableDecay,
)

# ``ls.augment`` is the module ``lightning_speedup.data.augment`` under a second name, not a copy:
# registering the alias makes ``import lightning_speedup.augment`` and LightningCLI's
# ``class_path: lightning_speedup.augment.RandomCrop`` resolve to the same classes.
sys.modules[f"{__name__}.augment"] = augment

__version__ = "0.1.0.dev0"

__all__ = [
    "AsyncProgressBarMetrics",
    "Compile",
    "CompressedDDPStrategy",
    "DataStallMonitor",
    "DeviceResidentDataModule",
    "DiLoCoStrategy",
    "EagerCUDAGraphs",
    "GPUAugment",
    "GPUPrefetcher",
    "GossipSGDStrategy",
    "LRRangeTest",
    "LRScheduleCallback",
    "LocalSGDStrategy",
    "OneCycle",
    "ParameterAveragingStrategy",
    "PipelineStrategy",
    "QATPrecision",
    "RangeTestDivergedError",
    "SDPABackends",
    "WarmupCosine",
    "WarmupStableDecay",
    "__version__",
    "augment",
    "check_strategy_name",
    "quantization",
    "tune",
]

# Submodules read as attributes on first use: ``tune`` imports Ray, which a plain import must not.
_LAZY_SUBMODULES = ("tune",)


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_registry.register_strategies()
