"""Communication-efficient data parallelism: local SGD, DiLoCo, gossip SGD and compressed DDP.

Importing this package registers the strategy strings ``local_sgd``, ``diloco``, ``gossip_ring``,
``gossip_exponential``, ``ddp_bf16_compress`` and ``ddp_powersgd`` (through
:func:`lightning_speedup._registry.register_strategies`). The functional core (flat buckets,
topologies, collectives, comm hooks, cost model) is plain torch; the strategies are thin
Lightning adapters over it. :mod:`~lightning_speedup.distributed.costmodel` is imported on use.
"""

from lightning_speedup.distributed.averaging import CHECKPOINT_KEY, ParameterAveragingStrategy
from lightning_speedup.distributed.collectives import (
    CommGroup,
    NeighborExchange,
    Traffic,
    average_,
    consensus_distance,
    mean_,
)
from lightning_speedup.distributed.compressed_ddp import CompressedDDPStrategy
from lightning_speedup.distributed.diloco import DiLoCoStrategy
from lightning_speedup.distributed.flat import FlatBuckets
from lightning_speedup.distributed.gossip import GossipSGDStrategy
from lightning_speedup.distributed.hooks import (
    LowPrecisionState,
    PowerSGDState,
    low_precision_hook,
    powersgd_hook,
)
from lightning_speedup.distributed.local_sgd import LocalSGDStrategy
from lightning_speedup.distributed.topology import Topology, mixing_matrix

__all__ = [
    "CHECKPOINT_KEY",
    "CommGroup",
    "CompressedDDPStrategy",
    "DiLoCoStrategy",
    "FlatBuckets",
    "GossipSGDStrategy",
    "LocalSGDStrategy",
    "LowPrecisionState",
    "NeighborExchange",
    "ParameterAveragingStrategy",
    "PowerSGDState",
    "Topology",
    "Traffic",
    "average_",
    "consensus_distance",
    "low_precision_hook",
    "mean_",
    "mixing_matrix",
    "powersgd_hook",
]
