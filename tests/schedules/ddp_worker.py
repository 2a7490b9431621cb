"""Run by ``test_ddp.py`` as a script: two CPU processes (gloo) train with ``OneCycle(max_lr="auto")``.

Lightning's ``strategy="ddp"`` starts rank 1 by re-running this script, so it must be a file run
directly, not a pytest test. Each rank writes what it saw to ``<out_dir>/rank<k>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `tests.schedules.common`

import lightning as L
import torch

from lightning_speedup.schedules import LRRangeTest, OneCycle
from tests.schedules.common import Recorder, Regressor, regression_loader


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    schedule = OneCycle(max_lr="auto", range_test=LRRangeTest(min_lr=1e-4, max_lr=10.0, num_steps=20))
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        accumulate_grad_batches=2,
        callbacks=[recorder, schedule],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = Regressor("adam", (1e-3,))
    # 20 batches of 4 -> 10 per rank -> 5 optimizer steps per epoch with accumulation 2 -> 10 steps in all.
    trainer.fit(model, regression_loader(n_batches=20, batch_size=4))
    assert schedule.range_test_result is not None
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "total_steps": schedule.schedule_total_steps,
        "global_step": trainer.global_step,
        "range_test_lr": schedule.range_test_result.lr,
        "range_test_losses": schedule.range_test_result.losses,
        "records": recorder.records,
        "weights": [p.detach().double().sum().item() for p in model.parameters()],
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    # Tear the gloo group down before the interpreter exits: left to exit-time destruction, its threads
    # can abort the process ("terminate called without an active exception", seen once in CI).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
