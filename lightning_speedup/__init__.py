"""lightning_speedup: callbacks, strategies and precision plugins that make Lightning training faster.

Importing this package is cheap (no Ray, no bitsandbytes) and registers the project's strategy
strings with Lightning's ``StrategyRegistry``. Heavy optional parts are imported on first use:
``lightning_speedup.tune`` (Ray Tune) and ``lightning_speedup.quantization`` kernels (bitsandbytes).
"""

from __future__ import annotations

from lightning_speedup import augment, quantization
from lightning_speedup._registry import (
    check_strategy_name,
    register_strategies,
    registered_strategy,
    strategy_names,
)
from lightning_speedup.compile import Compile, EagerCUDAGraphs
from lightning_speedup.data import (
    DataStallMonitor,
    DeviceResidentDataModule,
    GPUAugment,
    GPUPrefetcher,
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
    "WarmupCosine",
    "WarmupStableDecay",
    "__version__",
    "augment",
    "check_strategy_name",
    "quantization",
    "register_strategies",
    "registered_strategy",
    "strategy_names",
]

register_strategies()
