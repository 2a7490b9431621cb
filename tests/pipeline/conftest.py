"""Every pipeline test starts and ends without a process group or Lightning's launch variables in this process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from tests.pipeline.common import LAUNCH_VARIABLES


@pytest.fixture(autouse=True)
def _no_process_group_left() -> Iterator[None]:
    """One-process runs initialise a process group and set Lightning's launch variables (LOCAL_RANK, ...) in
    this process; later multi-process runs must inherit neither (with LOCAL_RANK set, Lightning launches no
    peers). Earlier test modules may have left either behind too."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in LAUNCH_VARIABLES:
        os.environ.pop(key, None)
    environ = dict(os.environ)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)
