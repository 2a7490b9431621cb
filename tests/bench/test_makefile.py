"""`make demo` says that it will apt-install as root before it does, and can be told not to."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.skipif(Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="the Debian data is installed")
def test_make_data_announces_apt_before_running_it(tmp_path: Path) -> None:
    # A stand-in apt-get on PATH records when it was called, relative to what make printed before.
    log = tmp_path / "calls"
    for tool in ("apt-get", "sudo"):
        exe = tmp_path / tool
        exe.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexit 1\n')
        exe.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    proc = subprocess.Popen(
        ["make", "-s", "-C", str(REPO), "data"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    first = proc.stdout.readline() if proc.stdout else ""
    proc.communicate(timeout=60)
    assert "installing Debian's dataset-fashion-mnist with apt-get as root" in first
    assert "apt-get install" in log.read_text()
    log.unlink()
    out = subprocess.run(["make", "-s", "-C", str(REPO), "data", "NO_APT=1"], env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "apt-get" not in out and not log.exists()
