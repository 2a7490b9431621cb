"""Every pipeline test ends with the environment it started with.

The process group and Lightning's launch variables that one-process runs leave behind are cleared around
every test of the suite by ``tests/conftest.py``; the pipeline tests also put back any other variable a run
set in this process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _environment_restored() -> Iterator[None]:
    environ = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environ)
