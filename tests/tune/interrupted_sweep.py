"""A sweep run as its own process, so a test can kill it in the middle of a trial and resume it.

``python -m tests.tune.interrupted_sweep SEARCHER STORAGE MARKERS DATA_DIR [EPOCHS [VAL_MARKERS]] [resume]``
runs 4 trials of EPOCHS epochs (default 1) one at a time on a new local Ray cluster and prints the finished
sweep's trial ids, statuses and each trial's reported validation numbers as JSON. VAL_MARKERS gets a file
per finished validation.
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
    resume = argv[-1] == "resume"
    extra = argv[4:-1] if resume else argv[4:]
    epochs = int(extra[0]) if extra else 1
    space = {
        "lr": tune.loguniform(1e-4, 3e-2),
        "data_dir": data_dir,
        "marker_dir": markers,
        "batch_sleep_s": 0.05,  # 16 batches: a trial runs for about a second, long enough to be killed in
    }
    if len(extra) > 1:
        space["val_marker_dir"] = extra[1]
    results = tune_lightning(
        build_mlp, space, "val_acc", "max", NUM_SAMPLES,
        searcher=searcher, scheduler=None, seed=0, max_concurrent=1, n_initial=1,
        trainer_kwargs={"max_epochs": epochs}, storage_path=storage, name="killed", resume=resume, verbose=0,
    )  # fmt: skip
    df = results.dataframe()
    history = results.history()
    validations = {t: [int(v) for v in g["validation"]] for t, g in history.groupby("trial_id")}
    print(json.dumps({
        "complete": results.complete,
        "status": dict(zip(df["trial_id"], df["status"])),
        "iterations": {t: int(n) for t, n in zip(df["trial_id"], df["iterations"])},
        "validations": validations,
    }))  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
