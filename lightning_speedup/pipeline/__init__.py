"""Pipeline parallelism: stage partitioning (functional core) and ``PipelineStrategy`` (Lightning adapter).

Importing :mod:`lightning_speedup` registers the strategy strings ``pipeline_gpipe``, ``pipeline_1f1b``,
``pipeline_interleaved_1f1b``, ``pipeline_zero_bubble``, ``pipeline_zbv`` and ``pipeline_dualpipev``.
"""

from lightning_speedup.pipeline.contract import PipelineLayers, collect_layers, split_batch
from lightning_speedup.pipeline.partition import (
    StagePlan,
    layer_param_counts,
    layer_times,
    partition_costs,
    plan_stages,
    theoretical_bubble,
)
from lightning_speedup.pipeline.strategy import SCHEDULES, PipelineStrategy

__all__ = [
    "SCHEDULES",
    "PipelineLayers",
    "PipelineStrategy",
    "StagePlan",
    "collect_layers",
    "layer_param_counts",
    "layer_times",
    "partition_costs",
    "plan_stages",
    "split_batch",
    "theoretical_bubble",
]
