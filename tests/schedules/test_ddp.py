"""Two real CPU processes with gloo: every rank runs the same schedule over the right number of steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.schedules.common import assert_close_sequences, torch_one_cycle_reference

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]


def test_two_process_ddp_runs_one_schedule_on_every_rank(tmp_path: Path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")
    }
    env |= {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    r0, r1 = ranks
    assert r0["world_size"] == 2 and {r0["rank"], r1["rank"]} == {0, 1}
    # 10 batches per rank per epoch, accumulation 2, 2 epochs: 10 optimizer steps, not the 20 of one process.
    assert r0["total_steps"] == r1["total_steps"] == r0["global_step"] == 10
    # The range test averages the loss over ranks, so both see one curve and choose one LR.
    assert r0["range_test_losses"] == r1["range_test_losses"] and r0["range_test_lr"] == r1["range_test_lr"]
    assert r0["records"] == r1["records"]
    expected = torch_one_cycle_reference("adam", (1e-3,), 10, max_lr=r0["range_test_lr"])
    assert_close_sequences([(lrs, moms) for _, lrs, moms in r0["records"]], expected)
    assert r0["weights"] == r1["weights"]  # DDP kept the replicas in sync through the test and training
