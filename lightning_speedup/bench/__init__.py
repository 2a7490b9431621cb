"""The time-to-target bench (`lightning-speedup bench`): tasks, recipes, the runner and reports.

The reference tasks' data live here too: :mod:`~lightning_speedup.bench.datasets` (Fashion-MNIST, the
char-LM corpus) and :mod:`~lightning_speedup.bench.datamodules` (their LightningDataModules).
"""

from lightning_speedup.bench.recipes import Recipe, available_recipes, get_recipe, register_recipe
from lightning_speedup.bench.runner import BenchConfig, RunResult, run_bench, run_one
from lightning_speedup.bench.tasks import TASKS, RunContext, Task, get_task
from lightning_speedup.bench.timing import TimeToTarget

__all__ = [
    "TASKS",
    "BenchConfig",
    "Recipe",
    "RunContext",
    "RunResult",
    "Task",
    "TimeToTarget",
    "available_recipes",
    "get_recipe",
    "get_task",
    "register_recipe",
    "run_bench",
    "run_one",
]
