"""Shared fixtures and the hardware markers.

``gpu`` tests need one CUDA GPU and ``multigpu`` tests two; both are skipped elsewhere and run on the
device machine with ``pytest -m "gpu or multigpu"``.
"""

from __future__ import annotations

import importlib.abc
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.launch_env import LAUNCH_RANK_VARIABLES

HIDE_ENV = "LIGHTNING_SPEEDUP_HIDE"


class _HiddenPackages(importlib.abc.MetaPathFinder):
    """Makes the packages named in ``LIGHTNING_SPEEDUP_HIDE`` (e.g. ``ray,bitsandbytes``) unimportable.

    Runs the suite as on a machine without the optional extras (the lent GPU machines have neither Ray
    nor bitsandbytes), so that the skips of the extras' tests can be checked on a machine that has them.
    """

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> None:
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (hidden by {HIDE_ENV})", name=fullname)


_hidden = {name.strip() for name in os.environ.get(HIDE_ENV, "").split(",") if name.strip()}
if _hidden:
    sys.meta_path.insert(0, _HiddenPackages(_hidden))

REPO_ROOT = Path(__file__).resolve().parents[1]
# The shared data folder sits beside the checkout (../shared/data); `.data/` inside the repo is where
# it is copied for the device machine.
_DATA_CANDIDATES = [REPO_ROOT.parent / "shared" / "data", REPO_ROOT / ".data"]


_RAY_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
_ray_auth: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    """Every local Ray cluster of the suite uses one token file of its own.

    Ray (>= 2.5x) turns token authentication on for a new local cluster and keeps the token at
    ``~/.ray/auth_token``, caching it in the process. A test that points ``HOME`` elsewhere while a
    cluster starts leaves the process holding a token that a later cluster's GCS does not know
    ("InvalidAuthToken", seen in CI). A fixed token path makes the clusters agree whatever ``HOME`` is,
    keeps authentication on as users get it, and writes nothing to the user's home.
    """
    folder = Path(tempfile.mkdtemp(prefix="ls-ray-auth-"))
    token = folder / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    _ray_auth.update(folder=folder, saved={k: os.environ.get(k) for k in _RAY_AUTH_VARS})
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)


def pytest_unconfigure(config: pytest.Config) -> None:
    saved = _ray_auth.get("saved")
    if isinstance(saved, dict):
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    folder = _ray_auth.get("folder")
    if isinstance(folder, Path):
        shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    n_gpus = torch.cuda.device_count()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multi = pytest.mark.skip(reason="needs two or more CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords and n_gpus < 1:
            item.add_marker(skip_gpu)
        if "multigpu" in item.keywords and n_gpus < 2:
            item.add_marker(skip_multi)


def _find_shared(sub: str) -> Path | None:
    env = os.environ.get("LIGHTNING_SPEEDUP_TEST_DATA")
    roots = ([Path(env)] if env else []) + _DATA_CANDIDATES
    for root in roots:
        if (root / sub).exists():
            return root / sub
    return None


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """The real Fashion-MNIST IDX files (../shared/data/fashion-mnist, or wherever the package finds them)."""
    path = _find_shared("fashion-mnist")
    if path is not None:
        return path
    from lightning_speedup.bench.datasets import DataError, find_fashion_mnist

    try:  # $LIGHTNING_SPEEDUP_DATA, Debian's dataset-fashion-mnist, the user cache
        return Path(find_fashion_mnist(None, download=False))
    except DataError as err:
        pytest.fail(f"Fashion-MNIST not found in ../shared/data or .data, nor by the package: {err}")


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """The real Tiny Shakespeare text (../shared/data/tinyshakespeare/input.txt)."""
    path = _find_shared("tinyshakespeare/input.txt")
    if path is None:
        pytest.fail("Tiny Shakespeare not found in ../shared/data or .data; the tests need the real file.")
    return path


@pytest.fixture(autouse=True)
def _deterministic_seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_rendezvous_port() -> Iterator[None]:
    """Each multi-process test gets its own free port.

    Lightning's launchers write ``MASTER_PORT`` into this process's environment and reuse it for every
    later launch; one test's lingering store on that port then hangs the next test's ranks.
    """
    os.environ.pop("MASTER_PORT", None)
    yield
    os.environ.pop("MASTER_PORT", None)


def _one_thread_in_a_forked_child() -> None:
    """GNU OpenMP's thread pool, which this process's CPU work has started, is not fork-safe: a forked child
    that runs a parallel region with more than one thread stalls in it for good. Children start with one
    thread, and OMP_NUM_THREADS=1 keeps Lightning's launcher from raising it again (it sets the CPU count / the
    processes, e.g. 2 for a one-process fit in a child, when the variable is unset)."""
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


os.register_at_fork(after_in_child=_one_thread_in_a_forked_child)


# What a one-process Lightning fit run in this process leaves behind in os.environ, besides MASTER_PORT (see
# above): the launch variables (with LOCAL_RANK set, a later launch starts no peers) and OMP_NUM_THREADS.
_LEFT_BY_IN_PROCESS_FITS = ("MASTER_ADDR", *LAUNCH_RANK_VARIABLES, "OMP_NUM_THREADS")
_SESSION_ENV = {key: os.environ.get(key) for key in _LEFT_BY_IN_PROCESS_FITS}


def _no_distributed_state() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in _SESSION_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(autouse=True)
def _no_state_from_in_process_fits() -> Iterator[None]:
    """Every test starts and ends without a process group and with the session's OMP_NUM_THREADS and launch
    variables, whatever a one-process fit (DDP-type strategy, ``devices=1``) run in this process left.

    Such a fit leaves two things that each hang a later forked launch (``start_method="fork"``) in this
    process (tests/distributed/test_fork_after_in_process_fit.py):

    * its world-size-1 gloo process group, which Lightning never destroys. Forked ranks inherit it,
      Lightning's setup then skips ``init_process_group`` ("already initialized"), and the first collective
      waits forever on the inherited group, whose worker threads exist only in this process;
    * ``OMP_NUM_THREADS`` (Lightning's launcher sets it to the CPU count here, for one process). Forked
      ranks then keep that many OpenMP threads instead of taking CPUs / ranks, and GNU OpenMP, whose thread
      pool the fit used in this process, is not fork-safe: their first parallel region never ends.

    Either one alone hangs; MASTER_PORT is the fixture above's.
    """
    threads = torch.get_num_threads()
    _no_distributed_state()
    yield
    _no_distributed_state()
    torch.set_num_threads(threads)
