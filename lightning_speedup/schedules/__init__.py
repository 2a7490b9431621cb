"""Learning-rate schedules: pure schedule functions, per-step schedule callbacks, LR range test.

``OneCycle``, ``WarmupCosine`` and ``WarmupStableDecay`` take over the LR (and momentum) of the
optimizers a LightningModule already returns; ``max_lr="auto"`` / ``peak_lr="auto"`` picks the
peak with an LR range test. The functions in :mod:`~lightning_speedup.schedules.functional` give
the same values without Lightning.
"""

from lightning_speedup.schedules.callbacks import (
    LRScheduleCallback,
    OneCycle,
    WarmupCosine,
    WarmupStableDecay,
)
from lightning_speedup.schedules.functional import (
    LRSuggestion,
    one_cycle,
    select_lr,
    warmup_cosine,
    warmup_stable_decay,
)
from lightning_speedup.schedules.range_test import (
    LRRangeTest,
    RangeTestDivergedError,
    RangeTestResult,
    run_range_test,
    save_range_test,
)

__all__ = [
    "LRRangeTest",
    "LRScheduleCallback",
    "LRSuggestion",
    "OneCycle",
    "RangeTestDivergedError",
    "RangeTestResult",
    "WarmupCosine",
    "WarmupStableDecay",
    "one_cycle",
    "run_range_test",
    "save_range_test",
    "select_lr",
    "warmup_cosine",
    "warmup_stable_decay",
]
