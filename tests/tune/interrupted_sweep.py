"""A sweep run as its own process, so a test can kill it in the middle of a trial and resume it.

``python -m tests.tune.interrupted_sweep SEARCHER STORAGE MARKERS DATA_DIR [resume]`` runs 4 trials one
at a time on a new local Ray cluster and prints the finished sweep's trial ids and statuses as JSON.
"""

from __future__ import annotations

import json
import sys

from ray import tune

from lightning_speedup.tune import tune_lightning
from tests.tune.tasks import build_mlp

NUM_SAMPLES = 4


def main(argv: list[str]) -> None:
    searcher, storage, markers, data_dir = argv[:4]
    resume = argv[4:] == ["resume"]
    space = {
        "lr": tune.loguniform(1e-4, 3e-2),
        "data_dir": data_dir,
        "marker_dir": markers,
        "batch_sleep_s": 0.05,  # 16 batches: a trial runs for about a second, long enough to be killed in
    }
    results = tune_lightning(
        build_mlp, space, "val_acc", "max", NUM_SAMPLES,
        searcher=searcher, scheduler=None, seed=0, max_concurrent=1, n_initial=1,
        trainer_kwargs={"max_epochs": 1}, storage_path=storage, name="killed", resume=resume, verbose=0,
    )  # fmt: skip
    df = results.dataframe()
    print(json.dumps({"complete": results.complete, "status": dict(zip(df["trial_id"], df["status"]))}))


if __name__ == "__main__":
    main(sys.argv[1:])
