"""A one-process fit run in the test process, then a forked two-process fit in that same process: no hang.

This sequence used to hang (e.g. ``test_world_size_one_warns_and_is_single_device_training`` followed by any
2-process test of ``test_strategies.py``). The one-process fit leaves its gloo process group and
``OMP_NUM_THREADS`` behind; the forked ranks inherit both, then wait forever on the inherited group's first
collective, or, with the group destroyed, inside GNU OpenMP's first parallel region (see
``_no_state_from_in_process_fits`` in ``tests/conftest.py``, which clears both between tests).

The two steps are two tests, as in the suite, run by ``test_..._does_not_hang`` in a pytest process of their
own with a time limit, so that a regression fails instead of hanging the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from tests.distributed.helpers import CharMLP, loaders, run_processes, trainer
from tests.launch_env import LAUNCH_RANK_VARIABLES

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = "LIGHTNING_SPEEDUP_FORK_SEQUENCE"
steps = pytest.mark.skipif(
    os.environ.get(STEPS) != "1", reason="a step of test_a_forked_fit_after_an_in_process_fit_does_not_hang"
)


def _fit(strategy: DDPStrategy, devices: int, data: Path, tmp_path: Path) -> None:
    train, _, vocab = loaders(data, batch_size=32, n_train=1024)
    t = trainer(strategy, devices, tmp_path, max_steps=5, precision="64-true", limit_val_batches=0)
    t.fit(CharMLP(vocab, optimizer="sgd", lr=0.1, momentum=0.9), train)
    assert t.state.finished


@steps
def test_step_1_one_process_fit_in_this_process(shakespeare_path: Path, tmp_path: Path) -> None:
    _fit(DDPStrategy(), 1, shakespeare_path, tmp_path)


@steps
def test_step_2_forked_two_process_fit(shakespeare_path: Path, tmp_path: Path) -> None:
    assert not torch.distributed.is_initialized()
    assert "OMP_NUM_THREADS" not in os.environ
    _fit(DDPStrategy(start_method="fork"), 2, shakespeare_path, tmp_path)


def _one_process_fit_in_a_child(rank: int, world_size: int, data: Path, tmp_path: Path) -> None:
    _fit(DDPStrategy(), 1, data, tmp_path)


@steps
def test_step_3_one_process_fit_in_a_forked_child(shakespeare_path: Path, tmp_path: Path) -> None:
    """A forked child's one-process fit: with OMP_NUM_THREADS unset, Lightning's launcher raised the child to
    two OpenMP threads of the pool this process had used, and its first parallel region never ended (CI,
    tests/test_compat.py); conftest's at-fork hook keeps children at one thread."""
    torch.randn(512, 512) @ torch.randn(512, 512)  # this process's OpenMP pool is in use, as after any test
    run_processes(_one_process_fit_in_a_child, 1, shakespeare_path, tmp_path / "child")


def test_a_forked_fit_after_an_in_process_fit_does_not_hang(tmp_path: Path) -> None:
    env = {**os.environ, STEPS: "1", "PYTHONPATH": str(REPO_ROOT), "PYTHONWARNINGS": "ignore"}
    for key in ("OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT", *LAUNCH_RANK_VARIABLES):
        env.pop(key, None)  # as a user's session starts
    here = Path(__file__).relative_to(REPO_ROOT)
    log = tmp_path / "pytest.log"
    with log.open("w") as out:
        # A session of its own: on a hang, its forked ranks (which ignore SIGTERM there) are killed with it.
        proc = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q",
             f"{here}::test_step_1_one_process_fit_in_this_process",
             f"{here}::test_step_2_forked_two_process_fit",
             f"{here}::test_step_3_one_process_fit_in_a_forked_child"],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the leader is still alive: the group is this run's
            proc.wait()
            pytest.fail("the forked fit after the in-process fit hung (180 s):\n" + log.read_text()[-3000:])
    text = log.read_text()
    assert rc == 0 and "3 passed" in text, text[-4000:]
