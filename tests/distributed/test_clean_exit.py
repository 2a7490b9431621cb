"""Every process of this project's strategies destroys its process group before the interpreter finalises.

Left to finalisation, a gloo group can abort the process (SIGABRT, "terminate called without an active
exception"; see ``lightning_speedup/_process_group.py``), which fails a finished ``fit``. Whether that abort
happens is a race, so the test checks its cause instead: each process's last exit handler sees no process
group left. Each launch is a script in a fresh interpreter, launched by Lightning's default launcher for
``devices=2`` on the CPU (the script runs again as rank 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.pipeline.common import in_fresh_interpreter

SCRIPT = """
import atexit, json, os, sys
from pathlib import Path

import torch.distributed as dist

out = Path(sys.argv[1])
rank = os.environ.get("LOCAL_RANK", "0")

def record():  # registered first, so it runs last of the exit handlers
    (out / f"rank{rank}.json").write_text(json.dumps({"initialized_at_exit": dist.is_initialized()}))

atexit.register(record)

import lightning_speedup  # noqa: F401  (registers the strategy strings)
from tests.pipeline.common import fit, loader

fit(out / "run", strategy=sys.argv[2], devices=2, max_steps=2, data=loader(n=32))
"""


@pytest.mark.parametrize("strategy", ["pipeline_1f1b", "local_sgd", "ddp_bf16_compress"])
def test_no_process_group_is_left_to_interpreter_exit(strategy: str, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    in_fresh_interpreter(str(script), str(tmp_path), strategy)
    seen = {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)}
    assert seen == {r: {"initialized_at_exit": False} for r in range(2)}
