"""Rebuild a bench folder's report from its stored runs, without running anything.

For result folders whose settings no longer match the registered recipes (``--resume`` refuses those):
the meta comes from the folder's own ``bench.json`` plus the recipe summaries stored in its
``report.json`` when there is one, the machine from the runs themselves.

    python benchmarks/rebuild_report.py benchmarks/results/schedules/2026-11-27-h200-schedules/fashion-mnist
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning_speedup.bench.report import table, write_report
from lightning_speedup.bench.runner import RunResult, _environment_of_runs
from lightning_speedup.bench.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    meta = json.loads((args.folder / "bench.json").read_text())
    old = args.folder / "report.json"
    stored = json.loads(old.read_text()) if old.exists() else {}
    task = get_task(meta["task"])
    runs = sorted((args.folder / "runs").glob("*.json"))
    results = [RunResult(**json.loads(p.read_text())) for p in runs]
    recipes = list(dict.fromkeys(r.recipe for r in results))
    meta = {
        "task_description": task.description,
        "metric": task.metric,
        "mode": task.mode,
        "seeds": sorted({r.seed for r in results}),
        "recipes": stored.get("recipes", {name: {"name": name} for name in recipes}),
        **meta,
        "environment": stored.get("environment", {}),
    }
    _environment_of_runs(meta, results)
    order = {(r.seed, recipes.index(r.recipe)): r for r in results}
    rows = write_report([order[k] for k in sorted(order)], meta, args.folder)
    print(table(rows, meta))


if __name__ == "__main__":
    main()
